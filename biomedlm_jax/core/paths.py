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
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator

from etils import epath


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


def write_text(path, text: str) -> None:
    """Write a whole file. Local files go through a temporary name and a rename, so a reader never
    sees half of one; an object store's upload is atomic already."""
    if is_remote(path):
        Path(path).write_text(text, encoding="utf-8")
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_bytes(path, data: bytes) -> None:
    """Like `write_text`, for bytes: a local file appears whole (temporary name, then a rename)."""
    if is_remote(path):
        Path(path).write_bytes(data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
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
    """Move a file or folder. Local: one atomic rename. Object store: copy every object, then delete
    the source (object stores have no rename)."""
    if not (is_remote(src) or is_remote(dst)):
        os.rename(src, dst)
        return
    folder = isdir(src)
    _copy(src, dst)
    rmtree(src) if folder else Path(src).unlink()


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
    """Copy a local folder's files into `out_dir` (any path), the files named in COMMIT_FILES last, so
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
