"""MCQA evaluation harness: per-task accuracy as a paper-style table, and per-item predictions.

    python -m biomedlm_jax.evaluate_mcqa --workdir=runs/pubmedqa --tasks=pubmedqa
    python -m biomedlm_jax.evaluate_mcqa --init_from=hf:/path/to/finetuned-medqa --tasks=medqa=test.json \
        --predictions=medqa_predictions.jsonl
    python -m biomedlm_jax.evaluate_mcqa --init_from=hf:/path/to/BioMedLM --zero_shot \
        --tasks=pubmedqa,medqa=my/phrases_no_exclude_test.jsonl,mmlu_medical=mmlu/test:test

`--tasks` takes `name=PATH` for a file or folder in that task's format, or BioMedLM's processed
`*_hf` JSON lines (`PATH:SPLIT` selects a PubMedQA / MMLU split). A bare name uses the file shipped
with this repository; only PubMedQA has one (`DEFAULT_EVAL`).

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

from biomedlm_jax import mcqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_EVAL = {  # only files shipped in this repository; other tasks need name=PATH
    "pubmedqa": os.path.join(REPO, "data", "pubmedqa", "ori_pqal.json") + ":test",
}
HF_SEQ_LEN = 512  # an HF classifier carries no sequence length: BioMedLM's published MedQA command used 512


def parse_tasks(spec: str) -> dict:
    out = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, _, path = part.partition("=")
        name = name.strip()
        if name not in mcqa.REGISTRY:
            raise SystemExit(f"--tasks: unknown task {name!r}; choose from {sorted(mcqa.REGISTRY)}")
        path = path or DEFAULT_EVAL.get(name, "")
        if not path:
            raise SystemExit(f"--tasks: {name} has no file shipped with this repository; pass {name}=PATH with PATH "
                             f"the {mcqa.REGISTRY[name].files}")
        out[name] = path
    return out


def predict(model, params, enc: mcqa.Encoded, batch_size: int = 16) -> np.ndarray:
    """Scores (N, K or labels), batched and jitted. With several devices the batch is split across them
    (data parallel: params replicated, each device scores its share of the questions)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    n_dev = mesh.devices.size
    batch_size = -(-batch_size // n_dev) * n_dev
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    rows = NamedSharding(mesh, PartitionSpec("data"))

    @jax.jit
    def scores(params, ids, mask):
        return model.apply({"params": params}, ids, mask)

    out = []
    for i in range(0, len(enc.labels), batch_size):
        ids, mask = enc.ids[i: i + batch_size], enc.mask[i: i + batch_size]
        pad = batch_size - len(ids)
        if pad:  # one compiled shape for every batch
            ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], pad, 0)])
        ids, mask = jax.device_put(ids, rows), jax.device_put(mask, rows)
        out.append(np.asarray(scores(params, ids, mask))[: batch_size - pad])
    return np.concatenate(out)


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
            paper = mcqa.PAPER_MMLU_MEDICAL_GENETICS if subject == "medical_genetics" else None
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
             zero_shot_reduce: str = "mean", predictions: Optional[str] = None) -> dict:
    from tqdm import tqdm

    if zero_shot:
        from biomedlm_jax import convert

        lm, lm_params, tok = convert.load(init_from or f"orbax:{workdir}", remat_policy="none")
    else:
        clf = mcqa.load_classifier(init_from or f"orbax:{workdir}")
        head, tok = clf.head, clf.tok
        seq_len = seq_len or head["seq_len"] or min(HF_SEQ_LEN, clf.model.config.n_positions)
    results, rows = {}, []
    for name, path in tqdm(list(tasks.items()), disable=not progress, desc="tasks"):
        spec = mcqa.REGISTRY[name]
        items = mcqa.load_task_file(name, path)[: max_items or None]
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
            enc = mcqa.encode(items, tok, spec.head, seq_len, truncation=head["truncation"],
                              append_eos=head["append_eos"], pad_id=head["pad_id"])
            scores = predict(clf.model, clf.params, enc, batch_size)
            if columns is not None:
                scores = scores[:, columns]
            entry["truncated"] = enc.truncated
        scores = np.asarray(scores)
        labels = np.asarray([i.answer for i in items])
        entry.update(items=len(items), accuracy=mcqa.accuracy(scores, labels), majority=mcqa.majority_baseline(items, items),
                     predictions={i.id: int(p) for i, p in zip(items, scores.argmax(-1))})
        rows += [{"task": name, "id": i.id, "logits": [float(x) for x in s], "pred": int(s.argmax()), "label": i.answer}
                 for i, s in zip(items, scores)]
        if name == "mmlu_medical":
            entry["subjects"] = {}
            for subject in sorted({i.subject for i in items}):
                sel = [n for n, i in enumerate(items) if i.subject == subject]
                sub = [items[n] for n in sel]
                entry["subjects"][subject] = {"items": len(sel), "accuracy": mcqa.accuracy(np.asarray(scores)[sel], labels[sel]),
                                              "majority": mcqa.majority_baseline(sub, sub)}
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
    p.add_argument("--out", default="mcqa_results.json")
    p.add_argument("--predictions", default=None, help="write per-item logits and predictions to this JSONL file")
    args = p.parse_args(argv)
    tasks = parse_tasks(args.tasks)
    try:
        results = evaluate(tasks, workdir=args.workdir, init_from=args.init_from, zero_shot=args.zero_shot,
                           max_items=args.max_items, seq_len=args.seq_len, batch_size=args.batch_size,
                           progress=sys.stderr.isatty(), zero_shot_reduce=args.zero_shot_reduce,
                           predictions=args.predictions)
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
