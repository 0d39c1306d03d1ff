"""Pretraining data: documents -> token rows -> deterministic, resumable, per-process batches.

The design is index-based (as levanter and grain do it), not a checkpoint of a streaming iterator:

  1. (`packing.py`) documents are tokenized once, each followed by `<|endoftext|>`, concatenated, and cut into rows
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

Prepared corpora (`prepare_data` output) are read through `shards.py`. Nothing here imports TensorFlow,
except the `tf_dataset` wrapper when it is called; the model, trainer and generation run without it.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Iterator, Optional

import numpy as np

from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import readers
from biomedlm_jax.data.packing import PackedRows, in_eval_split, pack_documents
from biomedlm_jax.data.shards import load_prepared, tokenizer_sha256


def load_train_eval(data_cfg, seq_len: int, tok):
    """Rows for training and evaluation from a config's `data` section.

    With `data.prepared_dir` (from `prepare_data`): its `train` and `validation` splits, memory-mapped.
    Otherwise `data.train_files` (comma-separated globs, any format data/readers.py knows) tokenized in
    memory; held-out rows from `data.eval_files`, or the documents whose id hashes into
    `data.eval_fraction`.
    """
    if data_cfg.get("prepared_dir"):
        path = data_cfg.prepared_dir
        train, evals = load_prepared(path, "train"), load_prepared(path, "validation")
        if train.info["row_len"] != seq_len + 1:
            raise DataError(f"{path}: rows of {train.info['row_len']} tokens fit seq_len={train.info['row_len'] - 1}, "
                            f"but the config has seq_len={seq_len}; prepare the data again with --seq_len={seq_len}")
        if train.info["tokenizer"]["sha256"] != tokenizer_sha256(tok):
            raise DataError(f"{path}: prepared with another tokenizer than this run's (see its tokenizer/ folder)")
        if len(train.rows) == 0:
            raise DataError(f"{path}: the train split is empty")
        return train, evals
    return _load_raw(data_cfg, seq_len, tok)



def _load_raw(data_cfg, seq_len: int, tok) -> tuple[PackedRows, PackedRows]:
    train_files = readers.expand_files(data_cfg.train_files)
    docs = list(readers.read_documents(train_files))
    if data_cfg.eval_files:
        eval_docs = list(readers.read_documents(readers.expand_files(data_cfg.eval_files)))
    else:
        eval_docs = [d for d in docs if in_eval_split(d[0], data_cfg.eval_fraction)]
        docs = [d for d in docs if not in_eval_split(d[0], data_cfg.eval_fraction)]
    train = pack_documents(docs, tok, seq_len + 1)
    if len(train.rows) == 0:
        raise DataError(f"{train_files}: fewer than {seq_len + 1} tokens of training text")
    return train, pack_documents(eval_docs, tok, seq_len + 1)



def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)



def num_rows(rows) -> int:
    """Rows of an array, or of a dict of equally long named fields."""
    if isinstance(rows, dict):
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"fields have different lengths {sorted(lengths)}")
        return lengths.pop()
    return len(rows)



class BatchIterator:
    """Deterministic, seekable batches of `PackedRows` for one process.

    Each `next()` returns {"inputs", "targets"} int32 arrays of shape (grad_accum, rows_per_process, T)
    with this process's rows of the global batch at the current position, then advances the
    position by `global_batch` rows. `local_rows` is the range of micro-batch rows this process owns
    (see `train_state.process_batch_rows`); by default the whole micro-batch.

    `read_ahead` (default: on for a corpus on an object store) builds the next batch in a background
    thread while the caller works on this one, so remote reads overlap the train step. A batch is a
    pure function of its position, so this changes nothing but timing; `restore` drops it.
    """

    def __init__(self, rows: np.ndarray, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 grad_accum: int = 1, local_rows: Optional[tuple[int, int]] = None, position: int = 0,
                 weights: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None,
                 positions: Optional[np.ndarray] = None, read_ahead: Optional[bool] = None):
        if global_batch % grad_accum:
            raise ValueError(f"global batch {global_batch} is not divisible by grad_accum_steps={grad_accum}")
        if num_rows(rows) == 0:
            raise ValueError("no rows to iterate over")
        self.rows, self.global_batch, self.seed, self.shuffle = rows, global_batch, seed, shuffle
        self.weights = weights  # optional (N, T) per-target loss weights (seq2seq: answer tokens only)
        # optional (N, T + 1) segment ids / positions of rows packing several examples
        self.segments, self.positions = segments, positions
        self.num_rows = num_rows(rows)
        self.grad_accum, self.micro = grad_accum, global_batch // grad_accum
        self.local_rows = local_rows or (0, self.micro)
        self.position = position
        self._perms: dict[int, np.ndarray] = {}
        self._perms_lock = threading.Lock()
        if read_ahead is None:
            read_ahead = bool(getattr(rows, "remote", False))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "batch-read-ahead") if read_ahead else None
        self._ahead: Optional[tuple[int, concurrent.futures.Future]] = None

    def _row_index(self, positions: np.ndarray) -> np.ndarray:
        n = self.num_rows
        epochs, offsets = np.divmod(positions, n)
        if not self.shuffle:
            return offsets
        out = np.empty_like(positions)
        with self._perms_lock:  # the read-ahead thread computes indices too
            for e in np.unique(epochs):
                if e not in self._perms:
                    self._perms = {k: v for k, v in self._perms.items() if k >= e - 1}  # keep memory bounded
                    self._perms[e] = epoch_permutation(n, self.seed, int(e))
                sel = epochs == e
                out[sel] = self._perms[e][offsets[sel]]
        return out

    def indices_at(self, position: int) -> np.ndarray:
        """Row indices (grad_accum, local rows) of the batch that starts at global row `position`."""
        positions = position + np.arange(self.global_batch, dtype=np.int64)
        start, stop = self.local_rows
        return self._row_index(positions.reshape(self.grad_accum, self.micro)[:, start:stop])

    def peek_indices(self) -> np.ndarray:
        return self.indices_at(self.position)

    def batch_at(self, position: int) -> dict:
        """The batch at `position` (a pure function of position and seed: what makes resume a seek)."""
        idx = self.indices_at(position)
        if isinstance(self.rows, dict):  # named fields (e.g. MCQA ids/mask/labels), gathered as they are
            return {k: np.asarray(v[idx]) for k, v in self.rows.items()}
        rows = self.rows[idx].astype(np.int32)  # (A, b, T + 1)
        batch = {"inputs": rows[..., :-1], "targets": rows[..., 1:]}
        if self.weights is not None:
            batch["weights"] = self.weights[idx].astype(np.float32)
        if self.segments is not None:
            batch["segment_ids"] = self.segments[idx][..., :-1].astype(np.int32)
            batch["positions"] = self.positions[idx][..., :-1].astype(np.int32)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._ahead is not None and self._ahead[0] == self.position:
            batch = self._ahead[1].result()
        else:
            batch = self.batch_at(self.position)
        self.position += self.global_batch
        if self._pool is not None:
            self._ahead = (self.position, self._pool.submit(self.batch_at, self.position))
        return batch

    @property
    def epoch(self) -> float:
        return self.position / self.num_rows

    def state(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed), "num_rows": int(self.num_rows)}

    def restore(self, state: dict) -> None:
        if int(state["num_rows"]) != self.num_rows or int(state["seed"]) != self.seed:
            raise DataError(
                f"saved data position is for {state['num_rows']} rows / seed {state['seed']}, "
                f"but this run has {self.num_rows} rows / seed {self.seed}: the training data changed"
            )
        self.position = int(state["position"])
        self._ahead = None  # a batch read ahead for another position is dropped



def eval_batches(rows: np.ndarray, batch: int, local_rows: Optional[tuple[int, int]] = None,
                 max_batches: int = 0, weights: Optional[np.ndarray] = None, segments: Optional[np.ndarray] = None,
                 positions: Optional[np.ndarray] = None) -> Iterator[dict]:
    """Fixed, ordered held-out batches; the last one padded with weight-0 rows. (1, b, T) like training."""
    start, stop = local_rows or (0, batch)
    n = num_rows(rows)
    n_batches = -(-n // batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for i in range(n_batches):
        idx = np.arange(i * batch, (i + 1) * batch)[start:stop]
        valid = idx < n
        if isinstance(rows, dict):
            out = {k: np.asarray(v[np.where(valid, idx, 0)])[None] for k, v in rows.items()}
            yield dict(out, valid=valid[None].astype(np.float32))
            continue
        chunk = rows[np.where(valid, idx, 0)].astype(np.int32)
        w = np.broadcast_to(valid[:, None], chunk[:, 1:].shape).astype(np.float32)
        if weights is not None:
            w = w * weights[np.where(valid, idx, 0)]
        out = {"inputs": chunk[None, :, :-1], "targets": chunk[None, :, 1:], "weights": w[None]}
        if segments is not None:
            out["segment_ids"] = segments[np.where(valid, idx, 0)][None, :, :-1].astype(np.int32)
            out["positions"] = positions[np.where(valid, idx, 0)][None, :, :-1].astype(np.int32)
        yield out



def tf_dataset(iterator: BatchIterator, num_batches: Optional[int] = None):
    """The iterator's batches from its current position on, as a prefetching `tf.data.Dataset`.

    Batches are built from a `range` of positions with a parallel, order-preserving map, so they equal
    what `next(iterator)` would return, and resuming is starting the range at the saved position. The
    consumer's position after k batches is `iterator.position + k * global_batch`. The `iterator` itself is
    not advanced. TensorFlow is imported here, and only here.
    """
    import tensorflow as tf

    start, g = iterator.position, iterator.global_batch
    a, (lo, hi), t = iterator.grad_accum, iterator.local_rows, iterator.rows.shape[1] - 1

    def make(k):
        b = iterator.batch_at(start + int(k) * g)
        return b["inputs"], b["targets"]

    def to_dict(k):
        inputs, targets = tf.numpy_function(make, [k], (tf.int32, tf.int32), stateful=False)
        inputs.set_shape((a, hi - lo, t))
        targets.set_shape((a, hi - lo, t))
        return {"inputs": inputs, "targets": targets}

    ds = tf.data.Dataset.range(num_batches) if num_batches is not None else tf.data.Dataset.range(2**62)
    return ds.map(to_dict, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
