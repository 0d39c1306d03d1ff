"""Run a call that goes into a native library that can crash (llama.cpp) in a process of its own.

A segfault inside the test's own process kills the pytest-xdist worker, and with it every test still
queued on that worker (and, with worker restarts, it once hung the whole suite: issue 44). Here the
call runs in a fresh `spawn`ed process: its result comes back through a pipe, an exception comes back
as this test's failure with the child's traceback, and a death by signal fails only this test, naming
the signal. `fn` must be importable by name (a module-level function), and so must its arguments'
types; keep such functions in modules that do not import JAX (tests/llama_side.py).
"""
from __future__ import annotations

import multiprocessing
import signal
import traceback

import pytest


def _child(conn, fn, args, kwargs):
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the test
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    conn.send(result)
    conn.close()


def run_isolated(fn, *args, timeout: float = 600, **kwargs):
    """fn(*args, **kwargs) in a spawned process; its return value, or this test fails."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, kwargs), daemon=True)
    proc.start()
    send.close()
    name = f"{fn.__module__}.{fn.__qualname__}"
    try:
        if not receive.poll(timeout):
            if proc.is_alive():
                proc.kill()
                proc.join(30)
                pytest.fail(f"{name} did not finish in its own process within {timeout:.0f} s (killed)")
        try:
            status, value = receive.recv()
        except EOFError:  # the child died before sending anything
            proc.join(30)
            code = proc.exitcode
            if code is not None and code < 0:
                pytest.fail(f"{name} crashed its process: signal {signal.Signals(-code).name} ({-code})")
            pytest.fail(f"{name} ended its process with exit code {code} and no result")
    finally:
        receive.close()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    if status == "error":
        pytest.fail(f"{name} raised in its own process:\n{value}", pytrace=False)
    return value
