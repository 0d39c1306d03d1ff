"""Seq2seq fine-tuning entry point: the shared trainer with answer-only loss, then a generation eval.

    python -m biomedlm_jax.finetune_seq2seq --config=configs/seq2seq.py:medquad --workdir=DIR \\
        --config.init_from=hf:/path/to/BioMedLM [--config.key=value ...]

After training, the latest checkpoint answers `data.generate_examples` dev questions (greedy,
no-repeat n-grams). The answers go to `workdir/generations_dev.jsonl` and their ROUGE-L goes to
`metrics.jsonl` (split "generate").
"""
from biomedlm_jax import cli


def finetune(config, workdir: str) -> dict:
    import jax

    from biomedlm_jax import metrics, seq2seq, train

    if config.data.task != "seq2seq":
        raise ValueError(f"config.data.task={config.data.task!r}: this entry point needs a seq2seq config")
    if not config.init_from and jax.process_index() == 0:
        print("[seq2seq] warning: no init_from; fine-tuning a randomly initialised model", flush=True)
    summary = train.train_and_evaluate(config, workdir, task=seq2seq.Seq2SeqTask(config))
    if config.data.generate_examples and not summary.get("preempted"):
        gen = seq2seq.evaluate_generation(config, workdir)
        if gen.get("examples"):
            writer = metrics.MetricsWriter(workdir, tensorboard=False)
            writer.write(summary["step"], {"rougeL": gen["rougeL"], "examples": gen["examples"]}, "generate")
            writer.close()
            if jax.process_index() == 0:
                print(f"[generate] Q: {gen['first_question']}\n[generate] A: {gen['first_generated']}\n"
                      f"[generate] ROUGE-L on {gen['examples']} dev questions: {gen['rougeL']:.4f}", flush=True)
            summary["rougeL"] = gen["rougeL"]
    return summary


if __name__ == "__main__":
    cli.run(lambda: finetune)
