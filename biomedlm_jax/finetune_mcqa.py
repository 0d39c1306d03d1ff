"""MCQA fine-tuning entry point: the shared trainer with BioMedLM's choice / seqcls heads.

    python -m biomedlm_jax.finetune_mcqa --config=configs/mcqa.py:pubmedqa --workdir=DIR \\
        --config.init_from=hf:/path/to/BioMedLM [--config.key=value ...]

Logs train loss and dev accuracy. The latest checkpoints (for resuming) are kept in
`WORKDIR/checkpoints`, and the best one by dev accuracy in `WORKDIR/best`. `evaluate_mcqa` reads the
best one by default.
"""
from biomedlm_jax.training import cli


def _entry():
    from biomedlm_jax.tasks import mcqa

    return mcqa.finetune


if __name__ == "__main__":
    cli.run(_entry)
