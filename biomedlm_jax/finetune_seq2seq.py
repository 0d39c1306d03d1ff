"""Seq2seq fine-tuning entry point: the shared trainer with answer-only loss, then a generation eval.

    python -m biomedlm_jax.finetune_seq2seq --config=configs/seq2seq.py:medquad --workdir=DIR \\
        --config.init_from=hf:/path/to/BioMedLM [--config.key=value ...]

After training, the latest checkpoint answers `data.generate_examples` dev questions (greedy,
no-repeat n-grams). The answers go to `workdir/generations_dev.jsonl` and their ROUGE-L goes to
`metrics.jsonl` (split "generate").
"""
from biomedlm_jax.training import cli


def _entry():
    from biomedlm_jax.tasks import seq2seq

    return seq2seq.finetune


if __name__ == "__main__":
    cli.run(_entry)
