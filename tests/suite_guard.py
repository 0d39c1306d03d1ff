"""Which tests were running when the run was stopped (issue 44).

`.ci/run` bounds `make test` with coreutils' `timeout`, which sends SIGTERM to the whole process group:
pytest's controller, its xdist workers and their subprocesses. These hooks (imported by
tests/conftest.py) keep the tests that have started and not finished, as the process that reports
them sees them (under xdist the controller hears every worker's start and finish), and on SIGTERM
print them with how long each had run, then end the process. And when crashed workers (which
`--max-worker-restart=0` does not replace) leave collected tests unrun, the summary says how many. A hung test is normally failed first by
`--timeout` (Makefile); this names what was running when even that did not happen in time.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

# the hooks a conftest takes with `from suite_guard import *` (tests/conftest.py, test_suite_guard's trees)
__all__ = ["pytest_runtest_logstart", "pytest_runtest_logfinish", "pytest_xdist_node_collection_finished",
           "pytest_terminal_summary", "pytest_sessionstart"]

_running: dict[str, float] = {}
_collected: set[str] = set()  # under xdist, what the workers collected (the controller collects nothing)
_finished: set[str] = set()


def pytest_runtest_logstart(nodeid, location):
    _running[nodeid] = time.monotonic()


def pytest_runtest_logfinish(nodeid, location):
    _running.pop(nodeid, None)
    _finished.add(nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _collected.update(ids)


def pytest_terminal_summary(terminalreporter):
    """With --max-worker-restart=0 a crashed worker's last queued tests may never run (when no worker
    is left to take them): say so, since pytest's counts leave them out."""
    crashed = {r.nodeid for r in terminalreporter.stats.get("failed", []) if "crashed while running" in str(r.longrepr)}
    missing = sorted(_collected - _finished - crashed)
    if missing:
        terminalreporter.write_line(f"{len(missing)} collected tests did not run (no worker was left to run them "
                                    f"after a crash): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
                                    red=True, bold=True)


def running_report() -> list[str]:
    now = time.monotonic()
    return [f"  {nodeid} (running {now - t0:.0f} s)" for nodeid, t0 in sorted(_running.items(), key=lambda kv: kv[1])]


def pytest_sessionstart(session):
    config = session.config
    if hasattr(config, "workerinput") or threading.current_thread() is not threading.main_thread():
        return  # an xdist worker (its controller reports) or an embedded run

    def stopped(signum, frame):
        lines = running_report() or ["  (none: between tests)"]
        text = "\n".join([f"pytest stopped by {signal.Signals(signum).name}; tests running then:"] + lines)
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(text, red=True, bold=True)
            reporter.flush()
        else:
            os.write(2, (text + "\n").encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
