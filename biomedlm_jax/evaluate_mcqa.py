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
import os
import sys
from typing import Optional

import jax
import numpy as np

from biomedlm_jax import mcqa, mcqa_data

# Tasks whose file ships in the repository's data/ folder (--data_dir): other tasks need name=PATH.
SHIPPED = {"pubmedqa": os.path.join("pubmedqa", "ori_pqal.json") + ":test"}
HF_SEQ_LEN = 512  # an HF classifier carries no sequence length: BioMedLM's published MedQA command used 512


def parse_tasks(spec: str, data_dir: str = "data") -> dict:
    """{task: PATH[:SPLIT]} from "task[=PATH],..."; a shipped task without a path reads it from `data_dir`."""
    out = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, _, path = part.partition("=")
        name = name.strip()
        if name not in mcqa_data.REGISTRY:
            raise SystemExit(f"--tasks: unknown task {name!r}; choose from {sorted(mcqa_data.REGISTRY)}")
        if not path and name in SHIPPED and os.path.exists(os.path.join(data_dir, SHIPPED[name].split(":")[0])):
            path = os.path.join(data_dir, SHIPPED[name])
        if not path:
            why = (f"{name}'s shipped file is not in --data_dir={data_dir}" if name in SHIPPED
                   else f"{name} has no file shipped with this repository")
            raise SystemExit(f"--tasks: {why}; pass {name}=PATH with PATH the {mcqa_data.REGISTRY[name].files}")
        out[name] = path
    return out


def results_table(results: dict) -> str:
    lines = ["| task | split file | items | accuracy | majority baseline | BioMedLM (paper) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | {os.path.basename(r['path'])} | | skipped: {r['skipped']} | | |")
            continue
        paper = r.get("paper")
        lines.append(f"| {name} | {os.path.basename(r['path'])} | {r['items']} | {100 * r['accuracy']:.1f} | "
                     f"{100 * r['majority']:.1f} | {'' if paper is None else f'{paper:.1f}'} |")
        for subject, s in r.get("subjects", {}).items():
            paper = mcqa_data.PAPER_MMLU_MEDICAL_GENETICS if subject == "medical_genetics" else None
            lines.append(f"| &nbsp;&nbsp;{subject} | | {s['items']} | {100 * s['accuracy']:.1f} | "
                         f"{100 * s['majority']:.1f} | {'' if paper is None else f'{paper:.1f}'} |")
    return "\n".join(lines)


def _head_columns(head: dict, spec):
    """(columns, None) when the classifier's head answers `spec`'s task: the head's score columns in the
    task's label order (None for a choice head, one score per option); (None, why not) otherwise."""
    if spec.head != head["head"]:
        return None, f"a {head['head']} head does not answer {spec.name} ({spec.head})"
    if spec.head == "choice":
        return None, None
    try:
        return mcqa.label_order(head["labels"], spec.labels, head["num_labels"], spec.name), None
    except ValueError as e:
        return None, str(e)


def evaluate(tasks: dict, *, workdir: Optional[str] = None, init_from: Optional[str] = None, zero_shot: bool = False,
             max_items: int = 0, seq_len: int = 0, batch_size: int = 16, progress: bool = True,
             zero_shot_reduce: str = "mean", predictions: Optional[str] = None, dtype: Optional[str] = None,
             quantize: Optional[str] = None) -> dict:
    """Accuracy per task of a fine-tuned classifier (or, `zero_shot`, of an LM's option likelihoods).
    `dtype`: compute and weight dtype (default: the checkpoint's), e.g. float32 to compare a bf16-trained
    run with an fp32 export. `quantize`: "int8" scores with Qwix int8 weights (quantize.py)."""
    from tqdm import tqdm

    from biomedlm_jax import quantize as quant_lib

    quant_lib.check_mode(quantize)

    if zero_shot:
        from biomedlm_jax import convert

        lm, lm_params, tok = convert.load_for_inference(init_from or f"orbax:{workdir}", dtype)
        lm, lm_params = quant_lib.quantize(lm, lm_params, quantize)
    else:
        clf = quant_lib.quantize_classifier(mcqa.load_classifier(init_from or f"orbax:{workdir}", dtype=dtype), quantize)
        head, tok = clf.head, clf.tok
        seq_len = seq_len or head["seq_len"] or min(HF_SEQ_LEN, clf.model.config.n_positions)
    results, rows = {}, []
    for name, path in tqdm(list(tasks.items()), disable=not progress, desc="tasks"):
        spec = mcqa_data.REGISTRY[name]
        items = mcqa_data.load_task_file(name, path)[: max_items or None]
        entry = {"path": path, "paper": spec.paper}
        columns, why = (None, None) if zero_shot else _head_columns(head, spec)
        if why:
            entry["skipped"] = why
            results[name] = entry
            continue
        if zero_shot:
            scores = mcqa.zero_shot_scores(lm, lm_params, tok, items, reduce=zero_shot_reduce,
                                           max_len=min(lm.config.n_positions, 1024), batch_size=batch_size)
        else:
            enc = mcqa_data.encode(items, tok, spec.head, seq_len, truncation=head["truncation"],
                              append_eos=head["append_eos"], pad_id=head["pad_id"])
            scores = mcqa.predict(clf.model, clf.params, enc, batch_size)
            if columns is not None:
                scores = scores[:, columns]
            entry["truncated"] = enc.truncated
        scores = np.asarray(scores)
        labels = np.asarray([i.answer for i in items])
        entry.update(items=len(items), accuracy=mcqa_data.accuracy(scores, labels), majority=mcqa_data.majority_baseline(items, items),
                     predictions={i.id: int(p) for i, p in zip(items, scores.argmax(-1))})
        rows += [{"task": name, "id": i.id, "logits": [float(x) for x in s], "pred": int(s.argmax()), "label": i.answer}
                 for i, s in zip(items, scores)]
        if name == "mmlu_medical":
            entry["subjects"] = {}
            for subject in sorted({i.subject for i in items}):
                sel = [n for n, i in enumerate(items) if i.subject == subject]
                sub = [items[n] for n in sel]
                entry["subjects"][subject] = {"items": len(sel), "accuracy": mcqa_data.accuracy(np.asarray(scores)[sel], labels[sel]),
                                              "majority": mcqa_data.majority_baseline(sub, sub)}
        results[name] = entry
    if predictions and jax.process_index() == 0:
        with open(predictions, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return results


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
