"""Pretraining entry point (flags only; the loop is `train.train_and_evaluate`).

    python -m biomedlm_jax.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny \\
        [--config.num_train_steps=300 --config.model.n_layer=4 ...]

Multi-process: on SLURM or a multi-host TPU slice the process group is found from the environment;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from biomedlm_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tensorboard/")
_COORD = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs)")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address)")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address)")
_TIMEOUT = flags.DEFINE_integer("init_timeout_s", 300, "Seconds to wait for all processes to join")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value, _TIMEOUT.value)
    from biomedlm_jax import train  # after initialize: nothing may touch the JAX backend before it

    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    import jax

    print(f"[done process {jax.process_index()}/{jax.process_count()}] "
          + " ".join(f"{k}={v}" for k, v in summary.items()), flush=True)


if __name__ == "__main__":
    app.run(main)
