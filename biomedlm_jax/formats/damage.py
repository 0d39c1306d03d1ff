"""Damaged checkpoints: detecting them, naming the damage in one line, and failing quietly.

Three jobs, all used by `formats.checkpoint`:

* **Digests.** orbax stores arrays as zstd-compressed zarr chunks inside OCDBT files. Only the chunk
  *indexes* carry a CRC-32C: bytes flipped inside a chunk's data decode silently into wrong weights
  (measured on a tiny run: the resumed loss went to NaN, and `verify` said "ok"). So every step's meta
  records `digest`, one 32-bit checksum per array (`state_digest`), and each restore compares the
  arrays it read with it (`check_digest`). The checksum is a position-weighted sum of the array's bits,
  mod 2**32, computed on the devices where the array lives: integer sums do not depend on the
  reduction order, so the value is the same for every mesh and process count, and any change to one
  element always changes it (the weights are odd, hence invertible mod 2**32).

* **One line.** `describe` turns the exception chain of a failed read (orbax's wrapper with its
  TensorStore spec dump, tensorstore's status, a JSON decoder's complaint) into one line naming the
  array chunk and file when the underlying error names them.

* **No noise.** When one array of a restore fails, orbax gives up while tensorstore is still reading
  the others, and closes its event loop with those reads pending. Each abandoned read then surfaces
  later as an "Exception ignored in: <coroutine ... _read_array_index_and_device_put>" traceback (the
  coroutine turns the GeneratorExit of its garbage collection into an exception) or as "Event loop is
  closed" (a read completing into the closed loop). `reading` runs a restore with event loops that,
  when closed, first cancel and await the tasks still pending on them and afterwards drop callbacks
  arriving from other threads; so the abandoned reads end where they started, and nothing is printed.

`BIOMEDLM_VERBOSE=1` (or `--verbose` on the commands) prints the underlying orbax / TensorStore error
in full beside the one-line report.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
import traceback
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.core import errors

# ----------------------------------------------------------------------------------------------------
# Digests
# ----------------------------------------------------------------------------------------------------


def _key(path) -> str:
    """'params/h/0/attn/c_attn/kernel' for a tree path, the same for dicts, lists, tuples and namedtuples
    (a step restored without a target comes back as dicts and lists)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _bits(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize * 8
    if width > 32:
        raise TypeError(f"no digest for {x.dtype} arrays")
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)


def _one(x: jax.Array) -> jax.Array:
    bits = _bits(x)
    index = jnp.zeros(x.shape, jnp.uint32)  # the row-major position, built without a reshape of a 1-D iota
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % (1 << 32))
        stride *= x.shape[dim]
    weight = (index * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x9E3779B1)  # odd: invertible mod 2**32
    return jnp.sum(bits * weight, dtype=jnp.uint32) ^ jnp.uint32(x.size % (1 << 32))


class DigestFailed(RuntimeError):
    """Computing a digest failed: a bug or a device problem here, never taken for a damaged step."""


# What a failed read may raise that is not damage: a model that does not fit the checkpoint, our own
# digest failing, and the process being stopped or short of memory.
NOT_DAMAGE = (errors.CheckpointError, DigestFailed, KeyboardInterrupt, MemoryError, SystemExit)


@jax.jit
def _digests(leaves: list) -> list:
    """One program for the whole tree. Keep it so: with one program per array (86 for the tiny train
    state), the two-process preemption save hung at the digest (test_train's sigterm test, reproduced
    twice, cause not investigated); one program per tree passes it."""
    return [_one(x) for x in leaves]


def _mesh_of(x) -> jax.sharding.Mesh:
    """The mesh to compute `x`'s digest under (a caller's `jax.set_mesh` may name other devices)."""
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
        return sharding.mesh
    devices = sorted(sharding.device_set, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.array(devices), ("devices",))


def state_digest(tree) -> dict[str, int]:
    """{array path: 32-bit checksum} of every array in `tree`, computed on the devices that hold it (every
    process calls it for a tree of global arrays). Leaves on the same mesh are reduced in one program."""
    flat = [(p, x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x), jax.devices()[0]))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    groups: dict[jax.sharding.Mesh, list[int]] = {}
    for i, (_, x) in enumerate(flat):
        groups.setdefault(_mesh_of(x), []).append(i)
    values = [None] * len(flat)
    try:
        for mesh, idx in groups.items():
            with jax.set_mesh(mesh):
                out = jax.device_get(_digests([flat[i][1] for i in idx]))
            for i, v in zip(idx, out):
                values[i] = int(v)
    except Exception as e:  # noqa: BLE001 - reported as what it is, not as damage
        raise DigestFailed(f"computing the checkpoint digest failed ({errors.one_line(e)})") from e
    return {_key(p): v for (p, _), v in zip(flat, values)}


def check_digest(tree, saved: Optional[dict], where: str) -> None:
    """CheckpointDamaged naming the first array of `tree` (restored from `where`) whose checksum differs
    from the one saved with it. Steps written before digests existed (`saved` None) are not checked."""
    if not saved:
        return
    now = state_digest(tree)
    bad = [k for k, v in now.items() if k in saved and int(saved[k]) != v]
    if bad:
        raise errors.CheckpointDamaged(
            f"{where}: {bad[0]} does not match the checksum saved with it ({len(bad)} of {len(now)} arrays "
            "differ; bytes changed on disk after the step was written)")


# ----------------------------------------------------------------------------------------------------
# One line
# ----------------------------------------------------------------------------------------------------

_STATUS = re.compile(r"^([A-Z_]{4,}): ")
_OCDBT = re.compile(r'Error reading "([^"]+)" in OCDBT database at (?:local file )?"([^"]+)": ')


def _chain(e: BaseException) -> list[BaseException]:
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def describe(e: BaseException) -> str:
    """One line for a failed read: the message of a CheckpointDamaged in the chain (which names where it
    was read), else the innermost error with a status (tensorstore's), else the innermost one; an OCDBT
    read is rewritten as 'STATUS: array chunk KEY in FOLDER: what'."""
    chain = _chain(e)
    ours = next((c for c in chain if isinstance(c, errors.CheckpointDamaged)), None)
    if ours is not None:  # already described, with the place it was read from
        return " ".join(str(ours).split())
    root = next((c for c in reversed(chain) if _STATUS.match(str(c))), chain[-1])
    text = " ".join(str(root).split())
    m = _OCDBT.search(text)
    if m:
        status = _STATUS.match(text)
        rest = text[m.end():]
        text = f"{status.group(1) + ': ' if status else ''}array chunk {m.group(1)} in {m.group(2)}: {rest}"
        return errors.one_line(RuntimeError(text)).split(": ", 1)[1]
    return errors.one_line(root)


def details(e: BaseException) -> str:
    """The whole chain, tracebacks included: what REASON.txt keeps and what verbose mode prints."""
    return "".join(traceback.format_exception(e))


def damaged(where: str, e: BaseException) -> errors.CheckpointDamaged:
    """The error a failed read of `where` becomes (raised `from e`, so the details stay reachable)."""
    if errors.verbose():
        print(f"[checkpoint] reading {where} failed; the underlying error:\n{details(e)}", file=sys.stderr, flush=True)
    return errors.CheckpointDamaged(f"{where}: {describe(e)}")


# ----------------------------------------------------------------------------------------------------
# No noise
# ----------------------------------------------------------------------------------------------------


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that cancels and awaits the tasks still pending on it when it is closed, then
    ignores callbacks that other threads (tensorstore's) schedule onto it after that."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():  # a read abandoned by a failed restore finished after its loop closed
                return None
            raise


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _DrainingLoop()


_policy_lock = threading.Lock()
_policy_users = 0
_policy_before = None


@contextlib.contextmanager
def _draining_loops() -> Iterator[None]:
    global _policy_users, _policy_before
    with _policy_lock:
        if _policy_users == 0:
            _policy_before = asyncio.get_event_loop_policy()
            if type(_policy_before) is asyncio.DefaultEventLoopPolicy:  # leave a user's own policy alone
                asyncio.set_event_loop_policy(_DrainingPolicy())
        _policy_users += 1
    try:
        yield
    finally:
        with _policy_lock:
            _policy_users -= 1
            if _policy_users == 0 and isinstance(asyncio.get_event_loop_policy(), _DrainingPolicy):
                asyncio.set_event_loop_policy(_policy_before)


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Run a checkpoint read: abandoned reads of a failed restore are cancelled and awaited (no
    tracebacks later), and a failure that is damage becomes `errors.CheckpointDamaged` naming `where`.
    A model that does not fit the checkpoint (errors.CheckpointError) and a failure to compute a digest
    (DigestFailed: not the step's fault) pass through unchanged."""
    with _draining_loops():
        try:
            yield
        except (*NOT_DAMAGE, errors.CheckpointDamaged):
            raise
        except Exception as e:  # noqa: BLE001 - whatever stops the step from reading is damage
            raise damaged(where, e) from e
