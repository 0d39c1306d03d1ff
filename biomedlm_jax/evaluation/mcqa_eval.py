"""The paper-style MCQA evaluation behind `python -m biomedlm_jax.evaluate_mcqa`: task specs
(`parse_tasks`), a fine-tuned classifier or zero-shot option scoring on each task, and the results
table beside BioMedLM's reported numbers and the majority-class baseline."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np

from biomedlm_jax.tasks import mcqa, mcqa_data

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
    run with an fp32 export. `quantize`: "int8" scores with Qwix int8 weights (models/quantize.py)."""
    from tqdm import tqdm

    from biomedlm_jax.models import quantize as quant_lib

    quant_lib.check_mode(quantize)

    if zero_shot:
        from biomedlm_jax.formats import loading

        lm, lm_params, tok = loading.load_for_inference(init_from or f"orbax:{workdir}", dtype)
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
