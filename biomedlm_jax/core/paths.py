"""One path layer for everything a run reads or writes: local paths and object stores (`gs://`, `s3://`).

Workdirs, prepared data, tokenizers and `convert` outputs may live on an object store, as TPU pod
users keep them. File operations go through `etils.epath` (which orbax uses for its own files); the
array data of orbax checkpoints goes through tensorstore, which reads and writes `gs://` itself.

Two things an object store cannot do are handled here rather than at each call site:
  * libraries that only take local file names (safetensors, `tokenizers`' file loaders, numpy's
    memory map) read a local copy (`local_copy`) and write into a local staging folder that is
    uploaded when complete (`staged`);
  * there is no append: `append_lines` rewrites the object with the new lines added.

Only local paths are made absolute; `gs://bucket/run` stays as it is.

One file layer in every process: object stores go through fsspec (gcsfs for gs://, s3fs for s3://),
whether TensorFlow is installed or not. etils.epath would otherwise pick TensorFlow's gfile when
TensorFlow is importable, a layer that spools each written object to local disk and cannot copy on
the server; importing this module sets `EPATH_USE_TF=false` unless the user set it (and so do the
Beam workers and subprocesses it starts, which inherit the environment). `s3://` buckets are read
anonymously when no AWS credentials are found (public buckets such as PMC's), and an
`AWS_ENDPOINT_URL` in the environment (a mirror, a test server) is honoured by botocore.
"""
from __future__ import annotations

import contextlib
import functools
import glob as glob_lib
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from typing import Iterator, Sequence

os.environ.setdefault("EPATH_USE_TF", "false")  # before etils.epath decides its backend (see above)

from etils import epath  # noqa: E402

try:  # a process that used epath before importing this module may have decided already
    from etils.epath import gpath as _gpath

    _gpath._is_tf_installed.cache_clear()
except (ImportError, AttributeError):  # another etils layout: its own default stands
    pass


@functools.lru_cache(maxsize=1)
def _s3_defaults() -> None:
    """Anonymous s3:// reads where botocore finds no credentials (fsspec's per-protocol defaults, which
    epath's fsspec backend uses too). A user's own `anon` setting is kept."""
    import fsspec

    conf = fsspec.config.conf.setdefault("s3", {})
    # botocore's connection pool (10 by default) would cap concurrent reads (readers.FETCH_CONCURRENCY)
    conf.setdefault("config_kwargs", {}).setdefault("max_pool_connections", 64)
    if "anon" not in conf:
        try:
            import botocore.session

            conf["anon"] = botocore.session.get_session().get_credentials() is None
        except Exception:  # noqa: BLE001 - no botocore, or a broken config: try anonymously
            conf["anon"] = True


def _prepare(path) -> None:
    if str(path).startswith("s3://"):
        _s3_defaults()


def is_remote(path) -> bool:
    """True for URLs such as gs://bucket/x (anything with a scheme), False for local paths."""
    return "://" in str(path)


def resolve(path) -> str:
    """`path` as a string: local paths absolute, remote ones unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> str:
    return posixpath.join(os.fspath(path), *parts) if is_remote(path) else os.path.join(path, *parts)


def Path(path) -> epath.Path:  # noqa: N802 - a constructor
    _prepare(path)
    return epath.Path(os.fspath(path))


def exists(path) -> bool:
    return Path(path).exists()


def isdir(path) -> bool:
    return Path(path).is_dir()


def listdir(path) -> list[str]:
    return sorted(p.name for p in Path(path).iterdir())


def makedirs(path) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
    return Path(path).read_text(encoding="utf-8")


def temporary_name(path) -> str:
    """A sibling name for writing `path` before the rename that publishes it: unique per process,
    thread and call, so two writers of one file (two threads, or two workers retrying one task)
    never write into each other's temporary file."""
    return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def open_write(path) -> Iterator:
    """A binary file to stream `path`'s content into. Local: a temporary name renamed over `path` when
    the block ends without error (a reader never sees half a file). Object store: the backend's
    streaming upload, which becomes visible only when closed."""
    if is_remote(path):
        with Path(path).open("wb") as f:
            yield f
        return
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def open_read(path):
    """A binary file object for reading `path` (local or an object store), streamed."""
    return open(path, "rb") if not is_remote(path) else Path(path).open("rb")


def filesystem(path):
    """(fsspec file system, path without the scheme) of a remote path."""
    import fsspec

    _prepare(path)
    return fsspec.core.url_to_fs(os.fspath(path))


def _with_scheme(path: str, like: str) -> str:
    scheme = like.split("://", 1)[0]
    return path if "://" in path else f"{scheme}://{path}"


def _version(info: dict) -> str:
    """What identifies one version of an object: GCS's generation, else an ETag or a modification time."""
    for key in ("generation", "ETag", "etag", "mtime", "LastModified", "updated", "md5Hash"):
        if info.get(key) not in (None, ""):
            return str(info[key])
    return ""


def forget_listings(path) -> None:
    """Drops what fsspec remembers of an object store's listings (its file systems are cached per
    process), so that a listing made now sees objects written since: a second run in one process
    (a notebook) over a bucket that changed."""
    if is_remote(path):
        filesystem(path)[0].invalidate_cache()


def names_with_prefix(folder, prefix: str) -> list[str]:
    """Names of the files in `folder` (not below it) that start with `prefix`, sorted. On an object store
    one listing restricted to the prefix (gcsfs and s3fs list by prefix), not of the whole folder."""
    if not is_remote(folder):
        return sorted(n for n in os.listdir(folder) if n.startswith(prefix)) if os.path.isdir(folder) else []
    fs, bare = filesystem(folder)
    bare = bare.rstrip("/")
    try:
        found = fs.find(bare, prefix=prefix, maxdepth=1)
    except TypeError:  # a file system without prefix listing
        found = [f for f in fs.find(bare, maxdepth=1) if posixpath.basename(f).startswith(prefix)]
    return sorted(posixpath.basename(f) for f in found if posixpath.dirname(f).rstrip("/") == bare)


def glob_files(pattern: str) -> list[tuple[str, int, str]]:
    """(path, size, version) of every file matching `pattern` (a glob, `**` recursing) or below it when
    `pattern` is a folder, sorted by path. Local paths: glob and stat, the version being the mtime in
    ns. Object stores: one listing, whose entries carry the size and generation, so nothing is asked
    per object."""
    if not is_remote(pattern):
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            hits = glob_lib.glob(os.path.join(pattern, "**", "*"), recursive=True)
        else:
            hits = glob_lib.glob(pattern, recursive=True)
        out = []
        for h in hits:
            if os.path.isfile(h):
                st = os.stat(h)
                out.append((os.path.abspath(h), st.st_size, str(st.st_mtime_ns)))
        return sorted(out)
    fs, bare = filesystem(pattern)
    fs.invalidate_cache()  # a listing is of the store as it is now (see forget_listings)
    if any(c in bare for c in "*?["):
        found = fs.glob(bare, detail=True)
    elif fs.isdir(bare):
        found = fs.find(bare, detail=True)
    else:
        found = {bare: fs.info(bare)} if fs.exists(bare) else {}
    return sorted((_with_scheme(name, pattern), int(info.get("size") or 0), _version(info))
                  for name, info in found.items() if info.get("type", "file") == "file")


def read_ranges(ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """The bytes [start, end) of each (path, start, end), exactly those: local files by seek and read;
    on an object store all of them at once as concurrent ranged GETs (fsspec's `cat_ranges`), with no
    read-ahead block around them."""
    if not ranges:
        return []
    remote = [is_remote(p) for p, _, _ in ranges]
    out: list = [None] * len(ranges)
    if any(remote):
        idx = [i for i, r in enumerate(remote) if r]
        fs, _ = filesystem(ranges[idx[0]][0])
        bare = [filesystem(ranges[i][0])[1] for i in idx]
        got = fs.cat_ranges(bare, [ranges[i][1] for i in idx], [ranges[i][2] for i in idx], on_error="raise")
        for i, data in zip(idx, got):
            out[i] = data
    files: dict = {}
    try:
        for i, (path, a, b) in enumerate(ranges):
            if not remote[i]:
                f = files.get(path) or files.setdefault(path, open(path, "rb"))
                f.seek(a)
                out[i] = f.read(b - a)
    finally:
        for f in files.values():
            f.close()
    return out


def read_bytes(path) -> bytes:
    """A whole file's bytes. On an object store one GET (fsspec's `cat_file`): no HEAD first, as
    opening a file object costs, which doubles the requests for millions of small objects."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, bare = filesystem(path)
    if "s3" in fs.protocol:  # else s3fs asks for the size first (a HEAD), to split large objects
        return fs.cat_file(bare, max_concurrency=1)
    return fs.cat_file(bare)


def write_text(path, text: str) -> None:
    """Write a whole file. Local files go through a temporary name and a rename, so a reader never
    sees half of one; an object store's upload is atomic already."""
    if is_remote(path):
        Path(path).write_text(text, encoding="utf-8")
        return
    tmp = temporary_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_bytes(path, data: bytes) -> None:
    """Like `write_text`, for bytes: a local file appears whole (temporary name, then a rename)."""
    if is_remote(path):
        Path(path).write_bytes(data)
        return
    tmp = temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def append_lines(path, lines: list[str]) -> None:
    """Add lines to a text file (created if missing). On an object store, which cannot append, the
    object is rewritten with the lines added: fine for small logs such as metrics.jsonl."""
    text = "".join(line + "\n" for line in lines)
    if not is_remote(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = Path(path)
    p.write_text((p.read_text(encoding="utf-8") if p.exists() else "") + text, encoding="utf-8")


def rmtree(path) -> None:
    """Remove a folder and everything in it; nothing happens when it does not exist."""
    p = Path(path)
    if p.exists():
        p.rmtree()


def rename(src, dst) -> None:
    """Move a file or folder. Local: one atomic rename. Object store: copy every object (a folder's
    COMMIT_FILES last, as `upload` does), then delete the source (object stores have no rename)."""
    if not (is_remote(src) or is_remote(dst)):
        os.rename(src, dst)
        return
    if isdir(src):
        upload(src, dst)
        rmtree(src)
    else:
        _copy(src, dst)
        Path(src).unlink()


def files_under(root) -> list[tuple[str, str]]:
    """(path relative to `root` with "/" separators, full path) of every file below `root`, sorted."""
    out = []

    def walk(p, rel):
        for child in p.iterdir():
            r = f"{rel}/{child.name}" if rel else child.name
            walk(child, r) if child.is_dir() else out.append((r, str(child)))

    walk(Path(root), "")
    return sorted(out)


def _copy(src, dst) -> None:
    """Copy a file or a folder from anywhere to anywhere."""
    copytree(src, dst) if isdir(src) else Path(src).copy(Path(dst), overwrite=True)


def copytree(src, dst) -> None:
    """Copy a folder (files and subfolders) from anywhere to anywhere."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copytree(child, dst / child.name)
        else:
            child.copy(dst / child.name, overwrite=True)


_DOWNLOADS: dict[str, str] = {}


def downloaded(path) -> str:
    """A local copy of `path` (file or folder) that lasts until the process exits; `path` itself when
    it is local. Each remote path is downloaded once per process."""
    if not is_remote(path):
        return os.fspath(path)
    key = os.fspath(path)
    if key not in _DOWNLOADS:
        import atexit

        tmp = tempfile.mkdtemp(prefix="biomedlm_jax-")
        atexit.register(shutil.rmtree, tmp, True)
        local = os.path.join(tmp, Path(path).name or "data")
        _copy(path, local)
        _DOWNLOADS[key] = local
    return _DOWNLOADS[key]


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
    """A local path with the content of `path` (a file or a folder): `path` itself when it is local,
    else a temporary download, removed afterwards."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="biomedlm_jax-") as tmp:
        local = os.path.join(tmp, Path(path).name or "data")
        _copy(path, local)
        yield local


COMMIT_FILES = ("manifest.json", "config.json")  # what readers look for first: uploaded last


def upload(local_dir: str, out_dir) -> None:
    """Copy a folder's files (`local_dir` may be remote too) into `out_dir` (any path), the files named in COMMIT_FILES last, so
    a reader that finds the manifest or config finds everything it lists."""
    makedirs(out_dir)
    for rel, src in sorted(files_under(local_dir), key=lambda f: (posixpath.basename(f[0]) in COMMIT_FILES, f[0])):
        dst = Path(join(out_dir, *rel.split("/")))
        dst.parent.mkdir(parents=True, exist_ok=True)
        Path(src).copy(dst, overwrite=True)


@contextlib.contextmanager
def staged(out_dir) -> Iterator[str]:
    """A local folder to write `out_dir`'s files into: `out_dir` itself when it is local; for an
    object store a temporary folder that is uploaded into `out_dir` (`upload`) once the block has
    finished without error."""
    if not is_remote(out_dir):
        os.makedirs(out_dir, exist_ok=True)
        yield os.fspath(out_dir)
        return
    tmp = tempfile.mkdtemp(prefix="biomedlm_jax-")
    try:
        yield tmp
        upload(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
