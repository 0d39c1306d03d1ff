"""The one pad-to-batch loop behind every scorer (MCQA heads, zero-shot option scores, LM loss).

Rows are grouped into batches of exactly `batch_size`, the last one padded, so a jitted scorer
compiles once for a whole evaluation; the padded rows' outputs are dropped (or carry zero weight).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np


def batches(rows: Iterable[tuple], batch_size: int, fill: str = "zeros") -> Iterator[tuple[tuple, int]]:
    """(fields stacked to (batch_size, ...), number of real rows) for each batch of `rows` (tuples of
    arrays, one per field). The last batch is padded with zero rows (`fill="zeros"`, e.g. zero
    weights) or copies of its last row (`fill="last"`, for models that need a real-looking input)."""
    if fill not in ("zeros", "last"):
        raise ValueError(f"fill={fill!r}: choose zeros or last")
    buf: list[tuple] = []
    for row in rows:
        buf.append(row)
        if len(buf) == batch_size:
            yield _stack(buf, batch_size, fill), batch_size
            buf = []
    if buf:
        yield _stack(buf, batch_size, fill), len(buf)


def _stack(buf: list[tuple], batch_size: int, fill: str) -> tuple:
    out = []
    for field in zip(*buf):
        a = np.stack([np.asarray(x) for x in field])
        missing = batch_size - len(a)
        if missing:
            pad = np.zeros((missing,) + a.shape[1:], a.dtype) if fill == "zeros" else np.repeat(a[-1:], missing, 0)
            a = np.concatenate([a, pad])
        out.append(a)
    return tuple(out)


def score(fn: Callable, rows: Iterable[tuple], batch_size: int, fill: str = "zeros") -> np.ndarray:
    """fn(*fields) over `rows` in padded batches; the per-row outputs of the real rows, concatenated."""
    outs = [np.asarray(fn(*fields))[:n] for fields, n in batches(rows, batch_size, fill)]
    if not outs:
        raise ValueError("nothing to score")
    return np.concatenate(outs)
