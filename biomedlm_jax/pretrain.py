"""Pretraining entry point (flags only; the loop is `train.train_and_evaluate`).

    python -m biomedlm_jax.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny \\
        [--config.num_train_steps=300 --config.model.n_layer=4 ...]

Multi-process: on SLURM or a multi-host TPU slice the process group is found from the environment;
elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""
from biomedlm_jax.training import cli


def _entry():
    from biomedlm_jax.training import trainer

    return trainer.train_and_evaluate


if __name__ == "__main__":
    cli.run(_entry)
