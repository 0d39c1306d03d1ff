"""Prepared corpora on disk or on an object store: the manifest, `.npy` row shards and their readers.

`load_prepared(path, split)` gives the rows of a `prepare_data` output as one `ShardedRows`: local
shards are memory-mapped; remote ones (`gs://...`) are read by concurrent byte ranges of exactly the
rows a batch needs, through one bounded cache.
"""
from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from biomedlm_jax.core import paths as paths_lib
from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import readers

MANIFEST = "manifest.json"

PREPARED_FORMAT = "biomedlm_jax.prepared/1"

REMOTE_CACHE_BYTES = 64 << 20  # rows kept of a prepared split on an object store, all its shards together


@dataclass(frozen=True)
class ShardInfo:
    """What a reader needs to know of a shard without opening it (from the manifest)."""
    path: str
    rows: int
    row_len: int
    dtype: str
    header_bytes: Optional[int] = None  # where the rows start; read from the file when unknown (old manifests)


class ShardedRows:
    """Rows spread over .npy shards, indexed like one (N, row_len) array.

    Only the rows a process asks for are read, so each host of a pod touches only its part. Local
    shards are memory-mapped. Shards on an object store (gs://...) are never opened as files: their
    shapes come from the manifest, and each batch's missing rows are fetched as concurrent byte-range
    reads of exactly those rows (consecutive rows of a shard in one range), with no read-ahead.
    Recently read rows are kept in one LRU cache of at most `cache_bytes` for all the shards together.
    `bytes_read` and `requests` count what was fetched. `by_range=True` reads local shards the same
    way (a network file system where a memory map would page in more than asked)."""

    def __init__(self, shards: Sequence[str | ShardInfo], cache_bytes: int = REMOTE_CACHE_BYTES,
                 by_range: bool = False):
        infos = [s if isinstance(s, ShardInfo) else _info_from_file(s) for s in shards]
        widths = {s.row_len for s in infos}
        if len(widths) > 1:
            raise DataError(f"shards {[s.path for s in infos]} have different row lengths {sorted(widths)}")
        self.infos = infos
        self.row_len = widths.pop() if widths else 0
        self.starts = np.cumsum([0] + [s.rows for s in infos])
        self.dtype = np.dtype(infos[0].dtype) if infos else np.dtype(np.uint16)
        self._row_bytes = self.row_len * self.dtype.itemsize
        self._local = {k: _memmap(s) for k, s in enumerate(infos) if not (by_range or paths_lib.is_remote(s.path))}
        self._offsets = {k: s.header_bytes for k, s in enumerate(infos) if s.header_bytes is not None}
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_rows = cache_bytes // max(self._row_bytes, 1)
        self._lock = threading.Lock()  # the batch iterator's read-ahead thread and the caller
        self.bytes_read = 0
        self.requests = 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def remote(self) -> bool:
        return len(self._local) < len(self.infos)

    @property
    def cached_bytes(self) -> int:
        return len(self._cache) * self._row_bytes

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.row_len

    @property
    def size(self) -> int:
        return len(self) * self.row_len

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        flat = idx.reshape(-1).astype(np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)})")
        shard = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((len(flat), self.row_len), self.dtype)
        remote = np.zeros(len(flat), bool)
        for k in np.unique(shard).tolist():
            sel = shard == k
            if k in self._local:
                out[sel] = self._local[k][flat[sel] - self.starts[k]]
            else:
                remote |= sel
        if remote.any():
            with self._lock:
                out[remote] = self._read_remote(flat[remote])
        return out.reshape(idx.shape + (self.row_len,))

    def _offset(self, k: int) -> int:
        if k not in self._offsets:  # a manifest without header_bytes: one small read of the header
            with paths_lib.Path(self.infos[k].path).open("rb") as f:
                _read_header(f, self.infos[k].path)
                self._offsets[k] = f.tell()
            self.requests += 1
        return self._offsets[k]

    def _read_remote(self, rows: np.ndarray) -> np.ndarray:
        missing = sorted(set(rows.tolist()) - self._cache.keys())
        shard_of = (np.searchsorted(self.starts, missing, side="right") - 1).tolist()
        runs: list[list[int]] = []  # [shard, first, last]: consecutive rows within one shard
        for r, k in zip(missing, shard_of):
            if runs and runs[-1][0] == k and runs[-1][2] == r - 1:
                runs[-1][2] = r
            else:
                runs.append([k, r, r])
        ranges = []
        for k, first, last in runs:
            a = self._offset(k) + (first - int(self.starts[k])) * self._row_bytes
            ranges.append((self.infos[k].path, a, a + (last - first + 1) * self._row_bytes))
        fetched: dict[int, np.ndarray] = {}
        for (k, first, last), (path, a, b), data in zip(runs, ranges, paths_lib.read_ranges(ranges)):
            if len(data) != b - a:
                raise DataError(f"{path}: truncated (rows {first - int(self.starts[k])}.. not there: "
                                f"{len(data)} of {b - a} bytes)")
            block = np.frombuffer(data, self.dtype).reshape(last - first + 1, self.row_len)
            fetched.update((first + i, block[i]) for i in range(len(block)))
        self.bytes_read += sum(b - a for _, a, b in ranges)
        self.requests += len(ranges)
        out = np.empty((len(rows), self.row_len), self.dtype)
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


def _read_header(f, path: str):
    try:
        version = np.lib.format.read_magic(f)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = header(f)
    except ValueError as e:
        raise DataError(f"{path}: not a .npy file ({e})") from None
    if fortran or len(shape) != 2 or dtype.hasobject:
        raise DataError(f"{path}: expected a C-ordered 2-D array of token ids, found shape {shape} {dtype}")
    return shape, dtype


def _info_from_file(path: str) -> ShardInfo:
    """A shard's shape read from its header (one small read): for shards not listed in a manifest."""
    with paths_lib.Path(path).open("rb") as f:
        shape, dtype = _read_header(f, path)
        return ShardInfo(path, int(shape[0]), int(shape[1]), dtype.str, f.tell())


def _memmap(info: ShardInfo) -> np.ndarray:
    rows = np.load(info.path, mmap_mode="r")
    if rows.ndim != 2 or rows.shape != (info.rows, info.row_len):
        raise DataError(f"{info.path}: shape {rows.shape}, the manifest says ({info.rows}, {info.row_len})")
    return rows



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



def load_prepared(path: str, split: str, cache_bytes: int = REMOTE_CACHE_BYTES) -> PreparedSplit:
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        raise DataError(f"{path}/{MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    dtype = np.dtype(manifest.get("dtype", "uint16")).str
    shards = [ShardInfo(paths_lib.join(path, s["file"]), int(s["rows"]), int(manifest["row_len"]), dtype,
                        s.get("header_bytes")) for s in info["shards"]]
    rows = ShardedRows(shards, cache_bytes) if shards else None
    if rows is not None and len(rows) != info["rows"]:
        raise DataError(f"{path}/{MANIFEST}: split {split!r} lists shards of {len(rows)} rows in all, "
                        f"but {info['rows']} rows")
    if rows is None:
        rows = np.zeros((0, manifest["row_len"]), np.uint16)
    return PreparedSplit(rows, dict(info, row_len=manifest["row_len"], tokenizer=manifest["tokenizer"]))



def tokenizer_sha256(tok) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
