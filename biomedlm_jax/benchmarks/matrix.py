"""`bench matrix`: a list of train / generate / engine / int8 rows (`MATRIX`, one per scale: gpu, cpu,
small) run in one process under a time budget, each row appended to DIR/bench.jsonl as it is measured,
with the environment and whether the row met its goal (`launch/gpu_bench.sh` runs the GPU one)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from biomedlm_jax.benchmarks.speed import bench_generate, bench_train
from biomedlm_jax.training import metrics

# The benchmark matrix: rows in priority order, so a run cut short by its time budget has measured the
# most important ones. Each row: (name, kind, arguments, seconds it is budgeted, goal). A goal is
# (field, lowest value) checks on the "ours" row, from issue 18; the "small" scale runs the same rows
# with tiny shapes so the matrix is tested on CPU. "cpu" is docs/benchmarks.md's CPU table.
_B27 = dict(variant="biomedlm-2.7b", dtype="bfloat16")



_GEN27 = dict(_B27, prompt=128, new=256, peer=True, peer_repeats=1)

_T355 = dict(variant="gpt2-medium", vocab=28896, batch=16, seq=1024, dtype="bfloat16", attention_impl="cudnn", steps=10)

_T27 = dict(_B27, batch=8, seq=1024, scan_layers=True, remat="dots_with_no_batch_dims_saveable",
            attention_impl="cudnn", steps=8)



# The engine rows read MedQuAD's shipped sample and GPT-2's tokenizer, relative to `matrix --data_dir`.
_MEDQUAD, _GPT2_TOK = "medquad", "gpt2_tokenizer"



MATRIX = {
    "gpu": [
        ("generate-2.7b-b1", "generate", dict(_GEN27, batch=1), 100,
         {"roofline_fraction": 0.6, "tokens_per_s": 550, "speedup_vs_hf": 15}),
        ("generate-2.7b-b32", "generate", dict(_GEN27, batch=32), 100, {"tokens_per_s": 5000, "speedup_vs_hf": 10}),
        ("train-355m-b16", "train", dict(_T355, peer=True), 90, {"mfu": 0.5}),
        ("engine-2.7b-s32", "engine", dict(variant="biomedlm-2.7b", dtype="bfloat16", questions=256, slots=32, max_new=256,
                                           medquad=_MEDQUAD, tokenizer=_GPT2_TOK, peer=True), 150,
         {"speedup_vs_static": 1.2}),
        ("decode-2.7b-b1-int8", "decode", dict(variant="biomedlm-2.7b", dtype="bfloat16", batch=1, prompt=128, new=256,
                                               quantize="int8"), 60, {}),
        ("train-2.7b-b8", "train", _T27, 80, {"mfu": 0.5}),
        ("train-355m-b16-remat", "train", dict(_T355, remat="dots_with_no_batch_dims_saveable"), 50, {"mfu": 0.5}),
        ("train-2.7b-b8-chunk", "train", dict(_T27, loss_chunk=256), 60, {"mfu": 0.5}),
    ],
    "cpu": [
        ("train-bench-cpu-b8", "train", dict(variant="bench-cpu", batch=8, seq=256, steps=10, peer=True), 90,
         {"speedup_vs_hf": 1.3}),
        ("generate-bench-cpu-b1", "generate", dict(variant="bench-cpu", batch=1, prompt=128, new=128, peer=True), 60,
         {"speedup_vs_hf": 4.0}),
        ("generate-bench-cpu-b8", "generate", dict(variant="bench-cpu", batch=8, prompt=128, new=128, peer=True), 60,
         {"speedup_vs_hf": 2.5}),
    ],
    "small": [
        ("generate-tiny-b1", "generate", dict(variant="tiny", batch=1, prompt=8, new=8, peer=True, peer_repeats=1), 30,
         {"speedup_vs_hf": 0.0}),
        ("generate-tiny-b4", "generate", dict(variant="tiny", batch=4, prompt=8, new=8, peer=True, peer_repeats=1), 30,
         {"speedup_vs_hf": 0.0}),
        ("train-tiny-b2", "train", dict(variant="tiny", batch=2, seq=16, steps=2, peer=True), 30, {"mfu": 0.0}),
        ("engine-tiny-s4", "engine", dict(variant="tiny", questions=12, slots=4, max_new=8, medquad=_MEDQUAD,
                                          tokenizer=_GPT2_TOK, peer=True), 30, {"speedup_vs_static": 0.0}),
        ("decode-tiny-b1-int8", "decode", dict(variant="tiny", batch=1, prompt=8, new=8, quantize="int8", repeats=1),
         30, {}),
        ("train-tiny-b2-scan", "train", dict(variant="tiny", batch=2, seq=16, steps=2, scan_layers=True,
                                              remat="dots_with_no_batch_dims_saveable", loss_chunk=8), 30, {"mfu": 0.0}),
    ],
}



def goal_met(row: dict, goal: dict) -> Optional[bool]:
    """Whether `row` reaches every bound of `goal` ({field: minimum}); None when a goal's field was not
    measured (e.g. no peer to compute a speed-up against)."""
    values = {k: row.get(k) for k in goal}
    if any(v is None for v in values.values()):
        return None
    return all(values[k] >= bound for k, bound in goal.items())



def _environment() -> dict:
    import datetime

    import jax

    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "date": datetime.date.today().isoformat(), "host_cpu": metrics.host_cpu()}
    try:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return env



def bench_matrix(out_dir: str, scale: str = "gpu", budget_s: float = 450.0, only: str = "",
                 peak_flops: float = 0.0, bandwidth: float = 0.0, data_dir: str = "data") -> list[dict]:
    """Run MATRIX[scale] in this process, one row after another, appending each JSON row to
    `out_dir/bench.jsonl` as soon as it is measured (a run killed at its time limit keeps what it
    measured). A row that fails (out of memory, say) is written with its error and the next one runs;
    a row whose budgeted seconds no longer fit in `budget_s` is written as skipped. `only`: a comma
    list of row-name prefixes (e.g. "generate" or "train-355m")."""
    import gc
    import traceback

    import jax

    if scale not in MATRIX:
        raise SystemExit(f"--scale={scale}: choose from {sorted(MATRIX)}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench.jsonl")
    env = _environment()
    start = time.perf_counter()
    written = []

    def emit(row):
        row = dict(row, matrix=scale, **{k: v for k, v in env.items() if k not in row})
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        written.append(row)

    prefixes = [p for p in only.split(",") if p]
    for name, kind, kwargs, seconds, goal in MATRIX[scale]:
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        stub = {"name": name, "kind": kind, "impl": "ours", "model": kwargs["variant"], "batch": kwargs.get("batch", kwargs.get("slots")),
                "seq": kwargs.get("seq", kwargs.get("prompt", 0) + kwargs.get("new", 0)), "tokens_per_s": None}
        elapsed = time.perf_counter() - start
        if elapsed + seconds > budget_s:
            emit(dict(stub, skipped=f"budget: {elapsed:.0f} s used of {budget_s:.0f}, this row is budgeted {seconds} s"))
            continue
        t0 = time.perf_counter()
        try:  # a row's arguments are the bench function's own keyword arguments
            if kind == "generate":
                rows = bench_generate(**kwargs, bandwidth=bandwidth)
            elif kind in ("engine", "decode"):
                from biomedlm_jax.benchmarks import inference

                if kind == "engine":
                    rows = inference.bench_engine(**dict(kwargs, medquad=os.path.join(data_dir, kwargs["medquad"]),
                                                               tokenizer=os.path.join(data_dir, kwargs["tokenizer"])))
                else:
                    rows = inference.bench_decode(**kwargs, bandwidth=bandwidth)
            else:
                rows = bench_train(**kwargs, peak_flops=peak_flops)
        except Exception as e:  # noqa: BLE001 - recorded, and the next row runs
            emit(dict(stub, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:]))
        else:
            wall = time.perf_counter() - t0
            for row in rows:
                row = dict(row, name=name, row_wall_s=round(wall, 1))
                if row["impl"] in ("ours", "ours-engine") or (kind == "decode" and row["impl"].startswith("ours-int")):
                    row.update(goal=goal, goal_met=goal_met(row, goal))
                emit(row)
        gc.collect()
        jax.clear_caches()
    return written
