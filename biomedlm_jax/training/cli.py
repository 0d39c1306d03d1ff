"""Flags shared by the training entry points (pretrain, finetune_seq2seq, ...).

    python -m biomedlm_jax.<entry> --config=configs/x.py:variant --workdir=DIR [--config.key=value ...]
        [--verbose] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I --init_timeout_s=300
         --heartbeat_timeout_s=60]

The config is locked (a misspelled `--config.*` key is an error). Multi-process runs join the process
group before anything touches the JAX backend (see training/distributed.py).
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from biomedlm_jax.core import errors
from biomedlm_jax.training import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/")
_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address)")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address)")
_TIMEOUT = flags.DEFINE_integer("init_timeout_s", 300, "Seconds to wait for all processes to join")
_VERBOSE = flags.DEFINE_bool("verbose", False, errors.VERBOSE_HELP)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", distributed.HEARTBEAT_TIMEOUT_S,
    "Multi-process runs: a process silent this long is declared lost and every other process exits non-zero")
flags.mark_flags_as_required(["config", "workdir"])


def run(get_entry: Callable[[], Callable]) -> None:
    """Parse flags, join the process group, then call `get_entry()(config, workdir)` and print its summary.

    `get_entry` imports the training code lazily, after `jax.distributed.initialize`."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
        if _VERBOSE.value:
            errors.set_verbose()
        distributed.initialize(_COORD.value, _NPROC.value, _PID.value, _TIMEOUT.value, _HEARTBEAT.value)
        try:
            summary = get_entry()(_CONFIG.value, _WORKDIR.value)
        except errors.CheckpointDamaged as e:  # every step damaged, or a damaged base: one line, no traceback
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        import jax

        print(f"[done process {jax.process_index()}/{jax.process_count()}] "
              + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)

    app.run(main)
