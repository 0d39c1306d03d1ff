"""The project's error types, importable from anywhere without pulling in JAX or a checkpoint module.

`DataError` is bad input data, `CheckpointError` a checkpoint that cannot be loaded as asked and
`CheckpointDamaged` one whose files are damaged; all are ValueErrors whose message names the file (and
line, record or tensor). `one_line` turns any
exception into the single line the tools print for it.
"""
from __future__ import annotations

import argparse
import os

VERBOSE_ENV = "BIOMEDLM_VERBOSE"  # set: a one-line checkpoint report also prints the error underneath
VERBOSE_HELP = ("print the underlying orbax/TensorStore error behind a one-line damaged-checkpoint report "
                f"(the same as {VERBOSE_ENV}=1)")


class DataError(ValueError):
    """Bad input data; the message names the file and line (or record)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and tensor."""


class CheckpointDamaged(ValueError):
    """A checkpoint step whose files do not read back as written (flipped bytes, a truncated or missing
    file, metadata that does not parse); the message names the step and, where known, the array and file."""


def one_line(e: BaseException, full: bool = False) -> str:
    """One line: the error's type and message (tensorstore's spec dumps dropped; the middle of a long
    message elided unless `full`, keeping its start and its end, where the cause is)."""
    text = " ".join(str(e).split())
    for marker in (" [tensorstore_spec", "; tensorstore_spec"):
        text = text.split(marker)[0]
    if not full and len(text) > 320:
        text = text[:120] + " ... " + text[-200:]
    return f"{type(e).__name__}: {text}"


def verbose() -> bool:
    """Whether the underlying errors behind a one-line checkpoint report are printed too."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def set_verbose() -> None:
    """What a command's `--verbose` does: read where the error happens, in this process and its children."""
    os.environ[VERBOSE_ENV] = "1"


class _Verbose(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, help=VERBOSE_HELP)

    def __call__(self, parser, namespace, values, option_string=None):
        set_verbose()
        setattr(namespace, self.dest, True)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """`--verbose` for a command that reads checkpoints (sets BIOMEDLM_VERBOSE=1)."""
    parser.add_argument("--verbose", action=_Verbose)
