"""MCQA evaluation harness: per-task accuracy as a paper-style table.

    python -m biomedlm_jax.evaluate_mcqa --workdir=runs/pubmedqa --tasks=pubmedqa
    python -m biomedlm_jax.evaluate_mcqa --init_from=hf:/path/to/BioMedLM --zero_shot \
        --tasks=pubmedqa,medqa=my/phrases_no_exclude_test.jsonl,mmlu_medical=mmlu/test:test

`--tasks` takes task names, which use their default evaluation files (`DEFAULT_EVAL`), or `name=PATH`
for a file or folder in that task's format (`PATH:SPLIT` selects a PubMedQA / MMLU split).

There are two modes:

- a fine-tuned MCQA workdir (`--workdir`) scores each task with its trained head. It uses
  WORKDIR/best when present, else the latest checkpoint. A head only fits tasks of its own kind and
  label set; other tasks are reported as skipped.
- `--zero_shot` scores every option by its mean token log-likelihood under the LM, with no head. It
  works with any checkpoint (`--init_from=hf:DIR|orbax:WORKDIR`, or `--workdir`'s backbone).

The table gives, per task and per MMLU subject: items, our accuracy, the majority-class baseline (the
most frequent answer of the evaluated split) and BioMedLM's reported number. It is printed as
markdown and written as JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax import checkpoint, mcqa
from biomedlm_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
DEFAULT_EVAL = {
    "pubmedqa": os.path.join(REPO, "data", "pubmedqa", "ori_pqal.json") + ":test",
    "medqa": os.path.join(SHARED, "medqa_usmle", "us_4options_test.jsonl"),
    "medmcqa": os.path.join(SHARED, "medmcqa", "dev_4183.jsonl"),
    "mmlu_medical": os.path.join(SHARED, "mmlu_medical", "final_release_hf_format") + ":test",
    "bioasq": "",  # licence-restricted: pass bioasq=PATH
}


def parse_tasks(spec: str) -> dict:
    out = {}
    for part in [p for p in spec.split(",") if p.strip()]:
        name, _, path = part.partition("=")
        name = name.strip()
        if name not in mcqa.REGISTRY:
            raise SystemExit(f"--tasks: unknown task {name!r}; choose from {sorted(mcqa.REGISTRY)}")
        path = path or DEFAULT_EVAL[name]
        if not path:
            raise SystemExit(f"--tasks: {name} has no default file here; pass {name}=PATH")
        out[name] = path
    return out


def load_finetuned(workdir: str):
    """(MCQAModel, params, tokenizer, meta) from WORKDIR/best (if any) or WORKDIR's latest checkpoint."""
    import flax.linen as nn

    from biomedlm_jax.model import GPTConfig

    best = os.path.join(workdir, checkpoint.BEST_DIR)
    src = best if checkpoint.latest_step(best) is not None else workdir
    step, meta = checkpoint.read_meta(src)
    if "mcqa" not in meta:
        raise SystemExit(f"{src}: not an MCQA checkpoint (no head); use --zero_shot for a plain LM")
    cfg = GPTConfig(**meta["model"]).replace(remat_policy="none")
    head = meta["mcqa"]
    model = mcqa.MCQAModel(cfg, head["head"], head["num_labels"])
    ids = jnp.ones((1, 1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids, ids > 0)["params"]))
    params = checkpoint.restore_params(checkpoint._reader(src), step, checkpoint.place(abstract))
    tok = tokenizer_lib.load_tokenizer(checkpoint.tokenizer_dir(src if os.path.isdir(checkpoint.tokenizer_dir(src)) else workdir))
    return model, params, tok, meta


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


def evaluate(tasks: dict, *, workdir: Optional[str] = None, init_from: Optional[str] = None, zero_shot: bool = False,
             max_items: int = 0, seq_len: int = 0, batch_size: int = 16, progress: bool = True,
             zero_shot_reduce: str = "mean") -> dict:
    from tqdm import tqdm

    if zero_shot:
        from biomedlm_jax import convert

        lm, lm_params, tok = convert.load(init_from or f"orbax:{workdir}", remat_policy="none")
        meta = None
    else:
        if not workdir:
            raise SystemExit("give --workdir (a fine-tuned MCQA run) or --zero_shot")
        model, params, tok, meta = load_finetuned(workdir)
        head = meta["mcqa"]
        seq_len = seq_len or head["seq_len"]
        special = {t: tok.token_to_id(t) for t in mcqa.SPECIAL_TOKENS}
    results = {}
    for name, path in tqdm(list(tasks.items()), disable=not progress, desc="tasks"):
        spec = mcqa.REGISTRY[name]
        items = mcqa.load_task_file(name, path)[: max_items or None]
        entry = {"path": path, "paper": spec.paper}
        if not zero_shot and (spec.head != head["head"] or (spec.head == "seqcls" and list(spec.labels) != head["labels"])):
            entry["skipped"] = f"the {head['task']} head ({head['head']}) does not fit {name}"
            results[name] = entry
            continue
        if zero_shot:
            scores = mcqa.zero_shot_scores(lm, lm_params, tok, items, reduce=zero_shot_reduce,
                                           max_len=min(lm.config.n_positions, 1024), batch_size=batch_size)
        else:
            eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
            pad = special["[PAD]"] if spec.head == "choice" else eos
            enc = mcqa.encode(items, tok, spec.head, seq_len, pad, special["[SEP]"], head["append_eos"],
                              head["question_template"])
            scores = predict(model, params, enc, batch_size)
        labels = np.asarray([i.answer for i in items])
        entry.update(items=len(items), accuracy=mcqa.accuracy(scores, labels), majority=mcqa.majority_baseline(items, items),
                     predictions={i.id: int(p) for i, p in zip(items, np.asarray(scores).argmax(-1))})
        if name == "mmlu_medical":
            entry["subjects"] = {}
            for subject in sorted({i.subject for i in items}):
                sel = [n for n, i in enumerate(items) if i.subject == subject]
                sub = [items[n] for n in sel]
                entry["subjects"][subject] = {"items": len(sel), "accuracy": mcqa.accuracy(np.asarray(scores)[sel], labels[sel]),
                                              "majority": mcqa.majority_baseline(sub, sub)}
        results[name] = entry
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.evaluate_mcqa", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a finetune_mcqa workdir (uses its best checkpoint)")
    src.add_argument("--init_from", help="hf:DIR or orbax:WORKDIR (with --zero_shot)")
    p.add_argument("--tasks", default="pubmedqa", help="comma-separated task or task=PATH entries")
    p.add_argument("--zero_shot", action="store_true", help="score options by LM likelihood (no head)")
    p.add_argument("--zero_shot_reduce", choices=("mean", "sum"), default="mean",
                   help="zero-shot option score: mean or summed token log-likelihood")
    p.add_argument("--max_items", type=int, default=0, help="evaluate only the first N items per task (0 = all)")
    p.add_argument("--seq_len", type=int, default=0, help="default: the fine-tuning run's")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default="mcqa_results.json")
    args = p.parse_args(argv)
    if args.init_from and not args.zero_shot:
        p.error("--init_from needs --zero_shot (a plain LM has no MCQA head); use --workdir for a fine-tuned run")
    results = evaluate(parse_tasks(args.tasks), workdir=args.workdir, init_from=args.init_from,
                       zero_shot=args.zero_shot, max_items=args.max_items, seq_len=args.seq_len,
                       batch_size=args.batch_size, progress=sys.stderr.isatty(), zero_shot_reduce=args.zero_shot_reduce)
    print(results_table(results))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
