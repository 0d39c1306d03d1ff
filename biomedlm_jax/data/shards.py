"""Prepared corpora on disk or on an object store: the manifest, `.npy` row shards and their readers.

`load_prepared(path, split)` gives the rows of a `prepare_data` output: local shards are memory-mapped,
remote ones (`gs://...`) are read row by row through a bounded cache (`RemoteShard`). `ShardedRows`
indexes several shards as one array of rows.
"""
from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from biomedlm_jax.core import paths as paths_lib
from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import readers

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
