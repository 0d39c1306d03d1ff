"""The project's error types, importable from anywhere without pulling in JAX or a checkpoint module.

`DataError` is bad input data and `CheckpointError` a checkpoint that cannot be loaded as asked; both
are ValueErrors whose message names the file (and line, record or tensor). `one_line` turns any
exception into the single line the tools print for it.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and tensor."""


def one_line(e: BaseException, full: bool = False) -> str:
    """One line: the error's type and message (tensorstore's spec dumps dropped; the middle of a long
    message elided unless `full`, keeping its start and its end, where the cause is)."""
    text = " ".join(str(e).split())
    for marker in (" [tensorstore_spec", "; tensorstore_spec"):
        text = text.split(marker)[0]
    if not full and len(text) > 320:
        text = text[:120] + " ... " + text[-200:]
    return f"{type(e).__name__}: {text}"
