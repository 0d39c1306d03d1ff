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

import collections
import concurrent.futures
import hashlib
import threading
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from biomedlm_jax import paths as paths_lib
from biomedlm_jax import readers
from biomedlm_jax import tokenizer as tokenizer_lib
from biomedlm_jax.errors import DataError

# ----------------------------------------------------------------------------------------------------
# Splitting and packing
# ----------------------------------------------------------------------------------------------------


def in_eval_split(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out split by a hash of the document id (stable across runs and machines): the
    one split formula, also behind MCQA's seeded dev carve (`mcqa_data.seeded_split`)."""
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


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


class Packer:
    """Streams documents into rows of `row_len` tokens: each document's tokens + EOS, concatenated.

    `pack(docs)` tokenizes a batch (in parallel, in Rust) and returns the rows it completed plus each
    document's start offset in the token stream (row = offset // row_len). Tokens that do not fill a
    last row stay in the tail; `dropped_tokens` counts them once the stream ends.
    """

    def __init__(self, tok, row_len: int):
        self.tok, self.row_len = tok, row_len
        self.eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
        if self.eos is None:
            raise DataError(f"the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
        self.dtype = token_dtype(tok.get_vocab_size())
        self.tokens_seen = 0
        self.num_documents = 0
        self._tail = np.zeros(0, self.dtype)

    def pack(self, docs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, list[tuple[str, int]]]:
        pieces, starts = [self._tail], []
        for (doc_id, _), enc in zip(docs, self.tok.encode_batch([text for _, text in docs])):
            starts.append((doc_id, self.tokens_seen))
            ids = np.asarray(enc.ids + [self.eos], self.dtype)
            self.tokens_seen += len(ids)
            pieces.append(ids)
        self.num_documents += len(docs)
        flat = np.concatenate(pieces)
        n = len(flat) // self.row_len
        self._tail = flat[n * self.row_len:]
        return flat[: n * self.row_len].reshape(n, self.row_len), starts

    @property
    def dropped_tokens(self) -> int:
        return len(self._tail)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def pack_documents(docs: Iterable[tuple[str, str]], tok, row_len: int, batch_size: int = 256) -> PackedRows:
    """In memory: tokenize, append EOS to each document, concatenate, cut into rows of `row_len` tokens."""
    packer = Packer(tok, row_len)
    chunks, starts, n_empty = [], [], 0

    def non_empty():
        nonlocal n_empty
        for doc in docs:
            if doc[1].strip():
                yield doc
            else:
                n_empty += 1

    for batch in batched(non_empty(), batch_size):
        rows, batch_starts = packer.pack(batch)
        chunks.append(rows)
        starts += batch_starts
    rows = np.concatenate(chunks) if chunks else np.zeros((0, row_len), packer.dtype)
    row_doc_ids = [None] * len(rows)
    for doc_id, offset in starts:
        r = offset // row_len
        if r < len(rows) and row_doc_ids[r] is None:
            row_doc_ids[r] = doc_id
    return PackedRows(rows, row_doc_ids, packer.num_documents, n_empty, packer.dropped_tokens)


# ----------------------------------------------------------------------------------------------------
# Prepared (offline-tokenized) corpora: see prepare_data.py for the writer
# ----------------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
PREPARED_FORMAT = "biomedlm_jax.prepared/1"
REMOTE_CACHE_BYTES = 64 << 20  # recently read rows kept per prepared split on an object store


class ShardedRows:
    """Rows spread over .npy shards, indexed like one (N, row_len) array.

    Only the rows a process asks for are read, so each host of a pod touches only its part: local
    shards are memory-mapped; shards on an object store (gs://...) are `RemoteShard`s, read by byte
    range with at most `cache_bytes` of recently read rows kept (split over the shards)."""

    def __init__(self, paths: Sequence[str], cache_bytes: int = REMOTE_CACHE_BYTES):
        per_shard = cache_bytes // max(len(paths), 1)
        self.shards = [_load_shard(p, per_shard) for p in paths]
        widths = {s.shape[1] for s in self.shards}
        if len(widths) > 1:
            raise DataError(f"shards {list(paths)} have different row lengths {sorted(widths)}")
        self.row_len = widths.pop() if widths else 0
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.dtype = self.shards[0].dtype if self.shards else np.uint16

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from remote shards so far (0 for local, memory-mapped ones)."""
        return sum(getattr(s, "bytes_read", 0) for s in self.shards)

    @property
    def remote(self) -> bool:
        return any(isinstance(s, RemoteShard) for s in self.shards)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.row_len

    @property
    def size(self) -> int:
        return len(self) * self.row_len

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        flat = idx.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((len(flat), self.row_len), self.dtype)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k][flat[sel] - self.starts[k]]
        return out.reshape(idx.shape + (self.row_len,))


def _load_shard(path: str, cache_bytes: int):
    if not paths_lib.is_remote(path):
        return np.load(path, mmap_mode="r")
    return RemoteShard(path, cache_bytes)


class RemoteShard:
    """A 2-D .npy shard on an object store, read by rows through the path layer: its header once, then
    byte ranges, each run of consecutive rows asked for in one read. Memory: the rows asked for, plus
    an LRU cache of recently read rows of at most `cache_bytes` (eval batches, rows read again soon).
    `bytes_read` counts what was fetched. One reader at a time (the batch iterator's)."""

    def __init__(self, path: str, cache_bytes: int = 0):
        self.path = path
        self._f = paths_lib.Path(path).open("rb")
        try:
            version = np.lib.format.read_magic(self._f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(self._f)
        except ValueError as e:
            raise DataError(f"{path}: not a .npy file ({e})") from None
        if fortran or len(shape) != 2 or dtype.hasobject:
            raise DataError(f"{path}: expected a C-ordered 2-D array of token ids, found shape {shape} {dtype}")
        self.shape, self.dtype = tuple(shape), dtype
        self._offset = self._f.tell()
        self._row_bytes = shape[1] * dtype.itemsize
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_rows = cache_bytes // max(self._row_bytes, 1)
        self._lock = threading.Lock()  # the batch iterator's read-ahead thread and the caller
        self.bytes_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self._row_bytes

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row index out of range [0, {self.shape[0]})")
        with self._lock:
            return self._read(rows)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        fetched = {}
        missing = sorted(set(rows.tolist()) - self._cache.keys())
        start = 0
        while start < len(missing):  # one read per run of consecutive rows
            stop = start + 1
            while stop < len(missing) and missing[stop] == missing[stop - 1] + 1:
                stop += 1
            first, n = missing[start], stop - start
            self._f.seek(self._offset + first * self._row_bytes)
            data = self._f.read(n * self._row_bytes)
            if len(data) != n * self._row_bytes:
                raise DataError(f"{self.path}: truncated (rows {first}..{first + n - 1} of {self.shape[0]} not there)")
            self.bytes_read += len(data)
            block = np.frombuffer(data, self.dtype).reshape(n, self.shape[1])
            fetched.update((first + i, block[i]) for i in range(n))
            start = stop
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for i, r in enumerate(rows.tolist()):
            if r in fetched:
                out[i] = fetched[r]
            else:
                out[i] = self._cache[r]
                self._cache.move_to_end(r)
        if self._cache_rows:
            for r, row in fetched.items():
                self._cache[r] = row.copy()
            while len(self._cache) > self._cache_rows:
                self._cache.popitem(last=False)
        return out


@dataclass
class PreparedSplit:
    rows: ShardedRows
    info: dict

    def fingerprint(self) -> str:
        return self.info["fingerprint"]


def read_manifest(path: str) -> dict:
    mpath = paths_lib.join(path, MANIFEST)
    if not paths_lib.exists(mpath):
        raise FileNotFoundError(f"{path}: no {MANIFEST}; not a directory written by `python -m biomedlm_jax.prepare_data`")
    manifest = readers.read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: format {found!r}, expected {PREPARED_FORMAT!r}")
    return manifest


def load_prepared(path: str, split: str) -> PreparedSplit:
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise DataError(f"{path}/{MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    shards = [paths_lib.join(path, s["file"]) for s in info["shards"]]
    rows = ShardedRows(shards) if shards else None
    if rows is not None and len(rows) != info["rows"]:
        raise DataError(f"{path}: split {split!r} has {len(rows)} rows on disk, the manifest says {info['rows']}")
    if rows is None:
        rows = np.zeros((0, manifest["row_len"]), np.uint16)
    return PreparedSplit(rows, dict(info, row_len=manifest["row_len"], tokenizer=manifest["tokenizer"]))


def tokenizer_sha256(tok) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def load_train_eval(data_cfg, seq_len: int, tok):
    """Rows for training and evaluation from a config's `data` section.

    With `data.prepared_dir` (from `prepare_data`): its `train` and `validation` splits, memory-mapped.
    Otherwise `data.train_files` (comma-separated globs, any format readers.py knows) tokenized in
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


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


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
