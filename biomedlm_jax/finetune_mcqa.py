"""MCQA fine-tuning entry point: the shared trainer with BioMedLM's choice / seqcls heads.

    python -m biomedlm_jax.finetune_mcqa --config=configs/mcqa.py:pubmedqa --workdir=DIR \\
        --config.init_from=hf:/path/to/BioMedLM [--config.key=value ...]

Logs train loss and dev accuracy. The latest checkpoints (for resuming) are kept in
`WORKDIR/checkpoints`, and the best one by dev accuracy in `WORKDIR/best`. `evaluate_mcqa` reads the
best one by default.
"""
from biomedlm_jax import cli


def finetune(config, workdir: str) -> dict:
    from biomedlm_jax import mcqa, train

    if config.data.task != "mcqa":
        raise ValueError(f"config.data.task={config.data.task!r}: this entry point needs an MCQA config")
    return train.train_and_evaluate(config, workdir, task=mcqa.MCQATask(config))


if __name__ == "__main__":
    cli.run(lambda: finetune)
