"""The suite never hangs (issue 44): `make test`'s own pytest flags, run on small test trees of their
own, end promptly and name the culprit when a test kills its process, hangs, or the run is stopped."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import llama_side
import pytest
from conftest import REPO
from isolation import run_isolated

CONFTEST = f"""import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from suite_guard import *
"""


def make_flags(**overrides) -> list[str]:
    """The flags `make test` passes to pytest (Makefile), with make variables overridden."""
    r = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "pytest-flags"]
                       + [f"{k}={v}" for k, v in overrides.items()], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def tree(root: pathlib.Path, files: dict) -> pathlib.Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(CONFTEST)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def clean_env() -> dict:
    """This environment without the outer pytest's (and xdist worker's) variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTEST_XDIST"))}


def run_pytest(root, flags, timeout=240):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *flags], cwd=root, env=clean_env(),
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


PASSING = "def test_one():\n    pass\n\ndef test_two():\n    pass\n\ndef test_three():\n    pass\n"


def test_a_test_that_kills_its_process_fails_the_run_promptly_naming_itself(tmp_path):
    root = tree(tmp_path / "t", {
        "test_crash.py": "import os, signal\n\ndef test_dies():\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        "test_other.py": PASSING, "test_more.py": PASSING})
    r, took = run_pytest(root, make_flags())
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "test_crash.py::test_dies" in out and "crashed" in out, out
    assert "6 passed" in out, out  # the other worker ran every other file
    assert took < 120, (took, out)  # a replaced worker once left a run idle for ten minutes


def test_tests_a_crash_left_unrun_are_counted(tmp_path):
    """With no worker left after a crash, pytest's counts omit the tests never run: the summary names them."""
    root = tree(tmp_path / "t", {"test_crash.py": "import os, signal\n\ndef test_dies():\n    os.kill(os.getpid(), "
                                                  "signal.SIGKILL)\n\ndef test_after():\n    pass\n"})
    r, took = run_pytest(root, make_flags(TEST_WORKERS=1))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "test_crash.py::test_dies" in out, out
    assert "1 collected tests did not run (no worker was left to run them after a crash): test_crash.py::test_after" in out, out


def test_a_hung_test_fails_at_the_timeout_naming_itself(tmp_path):
    root = tree(tmp_path / "t", {
        "test_hang.py": "import time\n\ndef test_hangs():\n    time.sleep(600)\n", "test_other.py": PASSING})
    r, took = run_pytest(root, make_flags(TEST_TIMEOUT=10))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "test_hang.py::test_hangs" in out and "Timeout" in out, out
    assert "3 passed" in out, out
    assert took < 120, (took, out)


def test_a_stopped_run_prints_the_tests_it_was_running(tmp_path):
    """What `.ci/run`'s time bound does: SIGTERM to the run's process group."""
    marker = tmp_path / "started"
    root = tree(tmp_path / "t", {
        "test_slow.py": f"import pathlib, time\n\ndef test_sleeps():\n    pathlib.Path({str(marker)!r}).touch()\n"
                        "    time.sleep(600)\n",
        "test_other.py": PASSING})
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *make_flags()], cwd=root,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    assert "pytest stopped by SIGTERM; tests running then:" in out and "test_slow.py::test_sleeps (running" in out, out


def test_a_crash_in_a_native_call_fails_only_its_own_test(tmp_path):
    """tests/isolation.py: a llama.cpp call that segfaults fails the calling test, naming the signal,
    and the test's process (an xdist worker) lives on; an exception comes back with its traceback."""
    path = str(tmp_path / "missing.gguf")
    with pytest.raises(pytest.fail.Exception, match=r"llama_side\.crash crashed its process: signal SIGSEGV"):
        run_isolated(llama_side.crash, path, segfault_first=True)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)raised in its own process:\nValueError: .*missing\.gguf"):
        run_isolated(llama_side.crash, path)
