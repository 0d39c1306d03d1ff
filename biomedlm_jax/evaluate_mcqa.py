"""MCQA evaluation harness: per-task accuracy as a paper-style table, and per-item predictions.

    python -m biomedlm_jax.evaluate_mcqa --workdir=runs/pubmedqa --tasks=pubmedqa
    python -m biomedlm_jax.evaluate_mcqa --init_from=hf:/path/to/finetuned-medqa --tasks=medqa=test.json \
        --predictions=medqa_predictions.jsonl
    python -m biomedlm_jax.evaluate_mcqa --init_from=hf:/path/to/BioMedLM --zero_shot \
        --tasks=pubmedqa,medqa=my/phrases_no_exclude_test.jsonl,mmlu_medical=mmlu/test:test

`--tasks` takes `name=PATH` for a file or folder in that task's format, or BioMedLM's processed
`*_hf` JSON lines (`PATH:SPLIT` selects a PubMedQA / MMLU split). A bare name uses the file shipped
in the repository's data/ folder (`--data_dir`, default ./data); only PubMedQA has one (`SHIPPED`).
`--dtype=float32` scores a bf16-trained run in fp32 (to compare it with an fp32 export, say).

There are two modes:

- with a head: a fine-tuned classifier scores each task. `--workdir` (or `--init_from=orbax:WORKDIR`)
  is a finetune_mcqa run (WORKDIR/best when present, else the latest checkpoint);
  `--init_from=hf:DIR` is a fine-tuned HF classifier: BioMedLM's GPT2ForMultipleChoice /
  GPT2ForSequenceClassification (`classifier.*`), transformers' GPT2ForSequenceClassification
  (`score.weight`), or our `convert` export. Inputs are encoded as BioMedLM's scripts encode them. A
  head only fits tasks of its own kind and label set; other tasks are reported as skipped.
- `--zero_shot` scores every option by its mean token log-likelihood under the LM, with no head. It
  works with any checkpoint (`--init_from=hf:DIR|orbax:WORKDIR`, or `--workdir`'s backbone).

The table gives, per task and per MMLU subject: items, our accuracy, the majority-class baseline (the
most frequent answer of the evaluated split) and BioMedLM's reported number. It is printed as
markdown and written as JSON (`--out`). `--predictions=FILE.jsonl` writes one line per item:
{"task", "id", "logits", "pred", "label"}, with the record's own id (PMID, `id` field, or file:line)
and the head's raw scores in the task's label order (or one per option).
"""
from __future__ import annotations

import argparse
import json
import sys

from biomedlm_jax.core import errors
from biomedlm_jax.evaluation.mcqa_eval import HF_SEQ_LEN, evaluate, parse_tasks, results_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.evaluate_mcqa", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a finetune_mcqa workdir (uses its best checkpoint)")
    src.add_argument("--init_from", help="hf:DIR or orbax:WORKDIR: a fine-tuned classifier, or any LM with --zero_shot")
    p.add_argument("--tasks", default="pubmedqa", help="comma-separated task or task=PATH entries")
    p.add_argument("--zero_shot", action="store_true", help="score options by LM likelihood (no head)")
    p.add_argument("--zero_shot_reduce", choices=("mean", "sum"), default="mean",
                   help="zero-shot option score: mean or summed token log-likelihood")
    p.add_argument("--max_items", type=int, default=0, help="evaluate only the first N items per task (0 = all)")
    p.add_argument("--seq_len", type=int, default=0,
                   help=f"default: the fine-tuning run's; {HF_SEQ_LEN} for an HF classifier")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default=None, help="compute and weight dtype, e.g. float32 or bfloat16 (default: the "
                   "checkpoint's)")
    p.add_argument("--data_dir", default="data", help="where a task's shipped file is read from when --tasks gives "
                   "no path (the repository's data/ folder)")
    p.add_argument("--quantize", default="none", help="int8: Qwix int8 weight-only quantization (default none)")
    p.add_argument("--out", default="mcqa_results.json")
    p.add_argument("--predictions", default=None, help="write per-item logits and predictions to this JSONL file")
    errors.add_verbose_flag(p)
    args = p.parse_args(argv)
    tasks = parse_tasks(args.tasks, args.data_dir)
    try:
        results = evaluate(tasks, workdir=args.workdir, init_from=args.init_from, zero_shot=args.zero_shot,
                           max_items=args.max_items, seq_len=args.seq_len, batch_size=args.batch_size,
                           progress=sys.stderr.isatty(), zero_shot_reduce=args.zero_shot_reduce,
                           predictions=args.predictions, dtype=args.dtype, quantize=args.quantize)
    except (ValueError, FileNotFoundError) as e:  # NotAClassifier, DataError, CheckpointError, a stale head
        print(f"evaluate_mcqa: error: {e}", file=sys.stderr)
        return 1
    print(results_table(results))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}" + (f" and {args.predictions}" if args.predictions else ""))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
