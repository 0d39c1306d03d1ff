# Quickstart: `make demo` and `make test`. Each sets up .venv (with the current python3) and the
# pinned dependencies from setup.py on first use; nothing else needs installing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test test-fast pytest-flags install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when setup.py changes; a failed install fails the target.
$(VENV)/.installed: setup.py | $(PY)
	$(PIP) -e .
	$(PY) -c "import jax, flax, optax, orbax.checkpoint, chex, ml_collections, tokenizers, safetensors, tensorflow, tensorflow_datasets, tensorboardX, tqdm, qwix, gguf, fastapi, uvicorn, prometheus_client"
	touch $@

$(VENV)/.installed-test: setup.py $(VENV)/.installed
	$(PIP) -e '.[test]'
	$(PY) -c "import torch, transformers, pytest, xdist, lm_eval, accelerate, gcsfs, s3fs, moto, datasketch, lingua, gcp_storage_emulator, peft, apache_beam, llama_cpp, libtpu, openai, httpx2"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m biomedlm_jax.demo

# pytest exits non-zero (5) when it collects no tests, so an empty run fails too.
# --durations: CI's log names the slowest tests, the ones to look at when the suite grows.
# TEST_WORKERS=N runs the suite on N pytest-xdist processes, a test file per worker at a time
# (--dist=loadfile keeps a module's fixtures in one process). The default is 2, one per core of the CI
# box: 418 tests in 2,635 s on a clean clone (2026-12-07; 406 in 2,159 s the evening before) against about
# 1,400-1,600 s for 329 tests in one process. TEST_WORKERS=0 runs
# one process. An early 2-worker run once aborted at XLA:CPU's 40 s collective timeout in the demo's
# 8-device subprocess; the tests now give collectives 600 s and that subprocess one device (README, Tests).
#
# The suite never hangs (issue 44; tests/test_suite_guard.py runs these flags on a tree whose tests crash
# and hang):
# - --max-worker-restart=0: a worker killed by a crash (a segfault in native code) is not replaced. The
#   test it was running fails, naming the worker and the test; its queued files go to the other worker.
#   A replaced worker once left a run idle for more than ten minutes on an AMX Xeon.
# - --timeout=TEST_TIMEOUT with the thread method: a test still running after TEST_TIMEOUT seconds
#   (20 minutes, about 10x the slowest test's ~110 s) has every thread's stack dumped and its process
#   ended: a failure that names it, even when it is stuck in native code, which a signal cannot interrupt.
#   Under xdist that failure reads "worker 'gwN' crashed while running 'TEST'", and pytest-timeout's own
#   stack dump goes to the worker's stdout, which nobody reads; so pytest's faulthandler dumps every
#   thread's stack to stderr (which does reach the log, headed "Timeout") 5 s before.
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 1200
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist=loadfile --max-worker-restart=0)
PYTEST_FLAGS = -q -ra --durations=25 --timeout=$(TEST_TIMEOUT) --timeout-method=thread \
	-o faulthandler_timeout=$$(($(TEST_TIMEOUT) - 5)) $(XDIST)

test: $(VENV)/.installed-test
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS)

# The developer loop (174 tests, 203 s on 2 cores): everything not marked slow. CI runs `make test`.
test-fast: $(VENV)/.installed-test
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -m "not slow" $(PYTEST_FLAGS) $(PYTEST_ARGS)

# The flags `make test` gives pytest, for tests/test_suite_guard.py (which runs them on a tree of its own).
pytest-flags:
	@echo $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) demo_out *.egg-info
