"""Pretraining data: documents -> token rows -> deterministic, resumable, per-process batches.

The design is index-based (as levanter and grain do it), not a checkpoint of a streaming iterator:

  1. documents are tokenized once, each followed by `<|endoftext|>`, concatenated, and cut into rows
     of `seq_len + 1` tokens (`inputs = row[:-1]`, `targets = row[1:]`); the tail that does not fill a
     row is dropped and counted. `PackedRows` keeps the rows plus, per row, the id of the document
     that starts in it (a side index for contamination audits; never in the token stream).
  2. `BatchIterator` walks an infinite stream of row *positions*. Epoch `e` visits the rows in the
     order `permutation(seed, e)`; global position `p` is row `perm_{p // N}[p % N]`. Its whole state
     is `position` (rows consumed), so saving it is one integer and resuming is a seek: a restored
     iterator yields exactly the batches the uninterrupted one would, across epoch boundaries too.
  3. The global batch at step s is positions `[s*G, (s+1)*G)`, laid out as (grad_accum, micro, T);
     each process gathers only the rows its devices hold. The global batch does not depend on the
     number of processes, so a run resumed on another topology still sees each row once per epoch.

Nothing here imports TensorFlow; the model, trainer and generation run without it.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from biomedlm_jax import readers
from biomedlm_jax import tokenizer as tokenizer_lib


# Reading lives in readers.py; re-exported here because the pipeline is where users look for it.
DataError = readers.DataError
expand_files = readers.expand_files
read_documents = readers.read_documents
read_jsonl = readers.read_jsonl


# ----------------------------------------------------------------------------------------------------
# Splitting and packing
# ----------------------------------------------------------------------------------------------------


def in_eval_split(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out split by a hash of the document id (stable across runs and machines)."""
    return (zlib.crc32(doc_id.encode("utf-8")) % 10_000) < fraction * 10_000


@dataclass
class PackedRows:
    """(N, row_len) token rows and the id of the first document starting in each row."""

    rows: np.ndarray
    row_doc_ids: list = field(default_factory=list)
    num_documents: int = 0
    num_empty: int = 0
    dropped_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.rows.size)

    def fingerprint(self) -> str:
        """sha256 of the token rows: a resumed run checks it still trains on the same data."""
        return hashlib.sha256(np.ascontiguousarray(self.rows).tobytes()).hexdigest()[:16]


def pack_documents(docs: Iterable[tuple[str, str]], tok, row_len: int, batch_size: int = 256) -> PackedRows:
    """Tokenize, append EOS to each document, concatenate, cut into rows of `row_len` tokens."""
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    if eos is None:
        raise DataError(f"the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
    stream: list[int] = []
    starts: list[tuple[int, str]] = []  # (offset in stream, doc id)
    n_docs = n_empty = 0
    pending: list[tuple[str, str]] = []

    def flush():
        for (doc_id, _), enc in zip(pending, tok.encode_batch([t for _, t in pending])):
            starts.append((len(stream), doc_id))
            stream.extend(enc.ids)
            stream.append(eos)
        pending.clear()

    for doc_id, text in docs:
        if not text.strip():
            n_empty += 1
            continue
        n_docs += 1
        pending.append((doc_id, text))
        if len(pending) >= batch_size:
            flush()
    flush()
    n_rows = len(stream) // row_len
    dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    rows = np.asarray(stream[: n_rows * row_len], dtype=dtype).reshape(n_rows, row_len)
    row_doc_ids = [None] * n_rows
    for offset, doc_id in starts:
        r = offset // row_len
        if r < n_rows and row_doc_ids[r] is None:
            row_doc_ids[r] = doc_id
    return PackedRows(rows, row_doc_ids, n_docs, n_empty, len(stream) - n_rows * row_len)


def load_train_eval(data_cfg, seq_len: int, tok) -> tuple[PackedRows, PackedRows]:
    """Rows for training and evaluation from a config's `data` section.

    `data.train_files` (comma-separated globs of JSONL). Held-out rows come from `data.eval_files`
    when given, otherwise from the documents whose id hashes into `data.eval_fraction`.
    """
    train_files = expand_files(data_cfg.train_files)
    docs = list(read_documents(train_files))
    if data_cfg.eval_files:
        eval_docs = list(read_documents(expand_files(data_cfg.eval_files)))
    else:
        eval_docs = [d for d in docs if in_eval_split(d[0], data_cfg.eval_fraction)]
        docs = [d for d in docs if not in_eval_split(d[0], data_cfg.eval_fraction)]
    train = pack_documents(docs, tok, seq_len + 1)
    if len(train.rows) == 0:
        raise DataError(f"{train_files}: fewer than {seq_len + 1} tokens of training text")
    return train, pack_documents(eval_docs, tok, seq_len + 1)


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class BatchIterator:
    """Deterministic, seekable batches of `PackedRows` for one process.

    Each `next()` returns {"inputs", "targets"} int32 arrays of shape (grad_accum, rows_per_process, T)
    with this process's rows of the global batch at the current position, then advances the
    position by `global_batch` rows. `local_rows` is the range of micro-batch rows this process owns
    (see `train.process_batch_rows`); by default the whole micro-batch.
    """

    def __init__(self, rows: np.ndarray, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 grad_accum: int = 1, local_rows: Optional[tuple[int, int]] = None, position: int = 0):
        if global_batch % grad_accum:
            raise ValueError(f"global batch {global_batch} is not divisible by grad_accum_steps={grad_accum}")
        if len(rows) == 0:
            raise ValueError("no rows to iterate over")
        self.rows, self.global_batch, self.seed, self.shuffle = rows, global_batch, seed, shuffle
        self.grad_accum, self.micro = grad_accum, global_batch // grad_accum
        self.local_rows = local_rows or (0, self.micro)
        self.position = position
        self._perms: dict[int, np.ndarray] = {}

    def _row_index(self, positions: np.ndarray) -> np.ndarray:
        n = len(self.rows)
        epochs, offsets = np.divmod(positions, n)
        if not self.shuffle:
            return offsets
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            if e not in self._perms:
                self._perms = {k: v for k, v in self._perms.items() if k >= e - 1}  # keep memory bounded
                self._perms[e] = epoch_permutation(n, self.seed, int(e))
            sel = epochs == e
            out[sel] = self._perms[e][offsets[sel]]
        return out

    def peek_indices(self) -> np.ndarray:
        """Row indices (grad_accum, local rows) that the next batch reads."""
        positions = self.position + np.arange(self.global_batch, dtype=np.int64)
        start, stop = self.local_rows
        return self._row_index(positions.reshape(self.grad_accum, self.micro)[:, start:stop])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self.rows[self.peek_indices()].astype(np.int32)  # (A, b, T + 1)
        self.position += self.global_batch
        return {"inputs": rows[..., :-1], "targets": rows[..., 1:]}

    @property
    def epoch(self) -> float:
        return self.position / len(self.rows)

    def state(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed), "num_rows": int(len(self.rows))}

    def restore(self, state: dict) -> None:
        if int(state["num_rows"]) != len(self.rows) or int(state["seed"]) != self.seed:
            raise DataError(
                f"saved data position is for {state['num_rows']} rows / seed {state['seed']}, "
                f"but this run has {len(self.rows)} rows / seed {self.seed}: the training data changed"
            )
        self.position = int(state["position"])


def eval_batches(rows: np.ndarray, batch: int, local_rows: Optional[tuple[int, int]] = None,
                 max_batches: int = 0) -> Iterator[dict]:
    """Fixed, ordered held-out batches; the last one padded with weight-0 rows. (1, b, T) like training."""
    start, stop = local_rows or (0, batch)
    n_batches = -(-len(rows) // batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for i in range(n_batches):
        idx = np.arange(i * batch, (i + 1) * batch)[start:stop]
        valid = idx < len(rows)
        chunk = rows[np.where(valid, idx, 0)].astype(np.int32)
        weights = np.broadcast_to(valid[:, None], chunk[:, 1:].shape).astype(np.float32)
        yield {"inputs": chunk[None, :, :-1], "targets": chunk[None, :, 1:], "weights": weights[None]}
