"""Benchmarks that print numbers, one JSON line per measurement (collect them with `| jq`).

Every row has `kind`, `impl` (ours / hf-torch / numpy / tf / tokenizers), `model` (null where no model
runs), `batch`, `seq` (generate: prompt + new; tokenize: the row length) and `tokens_per_s`.

    python -m biomedlm_jax.bench pipeline --seq=128 --batch=8 [--steps=500 --prepared=DIR --impl=numpy|tf]
    python -m biomedlm_jax.bench tokenize [--input=FILES --tokenizer=DIR]
    python -m biomedlm_jax.bench generate --model=tiny --batch=1 --prompt=128 --new=256 [--peer --dtype=bfloat16 --vocab=V]
    python -m biomedlm_jax.bench memory --model=biomedlm-2.7b --task=medqa|pubmedqa|lm --seq=512 --batch=B --lora_rank=R
        [--mesh=data,fsdp,tensor --dtype=bfloat16 --remat=full --moments=bfloat16 --base_dtype=bfloat16 --grad_accum=A]
    python -m biomedlm_jax.bench train --model=bench-cpu --batch=8 --seq=256 --steps=10 [--peer --remat=... --scan_layers
        --attention_impl=... --dtype=bfloat16 --loss_chunk=K --vocab=V --peak_flops=... --lora_rank=R]
    python -m biomedlm_jax.bench matrix --out=DIR [--scale=gpu|cpu|small --budget_s=450 --only=PREFIXES
        --peak_flops=... --bandwidth=...]

`pipeline` measures the batches a training process would consume: BatchIterator.batch_at (random,
seeded row gathers from memory or memory-mapped shards, int32 conversion, input/target split). With
`--impl=tf`, the same batches come through the prefetching tf.data wrapper. `tokenize` measures
offline preparation: read + tokenize + pack tokens/s. The benchmark imports no TensorFlow unless
`--impl=tf` is given.

`train` times the trainer's real train step (`train.make_train_step`: AdamW with Composer decay,
clipping, the non-finite guard, donated state) on random tokens, jitted on a mesh of all local devices
(data parallel). It reports tokens/s, the step time (median of `--steps` after a compile step), the
compile time, MFU, peak device memory where the backend reports it, and `temp_bytes`: the step's
scratch memory from XLA's buffer assignment (known on every backend, CPU included). `--loss_chunk=K`
computes the LM head's logits K positions at a time (config `loss_chunk_size`). The MFU formula is in
metrics.py: 6·N + 12·L·d·T FLOPs per token, with N the matmul weights including the tied head. The
peak comes from `metrics.PEAK_FLOPS`, or from `--peak_flops` (CPU has none). `--peer` trains HF's
GPT2LMHeadModel of the same shape with torch.optim.AdamW in the same process: fp32 on CPU, bf16
autocast and fused AdamW on GPU.

`generate` measures greedy decoding with the KV cache: exactly `--new` tokens per row (no EOS stop)
after a `--prompt`-token prompt, timed after a warm-up call that compiles. `--peer` runs the same
weights (built in memory by `hf_peer_model`) through transformers' GPT2LMHeadModel.generate
(do_sample=False, min_new_tokens = max_new_tokens) in the same process and prints its row and the ratio.
Each "ours" row carries the memory roofline (`decode_roofline`): the bytes one step reads and, with a
known or given bandwidth (`metrics.PEAK_BANDWIDTH`, `--bandwidth`), the bound in tokens/s and the
fraction of it reached.

`matrix` runs a list of train/generate rows (`MATRIX`) in one process under a time budget and appends
each row to DIR/bench.jsonl as it is measured (`bench_matrix`); `launch/gpu_bench.sh` runs the GPU one.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import numpy as np

from biomedlm_jax import input_pipeline as ip
from biomedlm_jax import metrics
from biomedlm_jax.bench_inference import decode_roofline, hf_peer_model


def bench_pipeline(seq: int, batch: int, steps: int, prepared: str = "", impl: str = "numpy", seed: int = 0) -> dict:
    if prepared:
        rows = ip.load_prepared(prepared, "train").rows
        if rows.shape[1] != seq + 1:
            raise SystemExit(f"{prepared} holds rows for seq_len={rows.shape[1] - 1}, not {seq}")
        source = f"prepared:{prepared}"
    else:
        n = max(8192, 4 * batch)
        rows = np.random.default_rng(seed).integers(0, 28896, (n, seq + 1)).astype(np.uint16)
        source = f"memory:{n}rows"
    it = ip.BatchIterator(rows, batch, seed=seed)
    if impl == "tf":
        ds = ip.tf_dataset(it, num_batches=steps + 5).as_numpy_iterator()
        for _ in range(5):
            next(ds)
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(ds)
    else:
        next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            b = next(it)
    dt = time.perf_counter() - t0
    assert b["inputs"].shape == (1, batch, seq)
    return {"kind": "pipeline", "impl": impl, "model": None, "source": source, "batch": batch, "seq": seq, "steps": steps,
            "tokens_per_s": steps * batch * seq / dt, "ms_per_batch": 1e3 * dt / steps}


def bench_tokenize(inputs: str, tokenizer: str, seq: int = 1024) -> dict:
    from biomedlm_jax import readers
    from biomedlm_jax import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    docs = list(readers.read_documents(readers.expand_files(inputs)))
    packed = ip.pack_documents(docs, tok, seq + 1)
    dt = time.perf_counter() - t0
    return {"kind": "tokenize", "impl": "tokenizers", "model": None, "batch": None, "seq": seq,
            "documents": len(docs), "tokens": packed.num_tokens,
            "tokens_per_s": packed.num_tokens / dt, "seconds": dt}


def bench_generate(variant: str, batch: int, prompt: int, new: int, peer: bool = False, dtype: str = "float32",
                   repeats: int = 2, vocab: int = 0, peer_repeats: int = 2, bandwidth: float = 0.0) -> list[dict]:
    import jax

    from biomedlm_jax import generate, metrics
    from biomedlm_jax import model as model_lib

    n_pos = max(model_lib.VARIANTS[variant].get("n_positions", 1024), prompt + new)
    cfg = model_lib.get_config(variant, n_positions=n_pos, dtype=dtype, **({"vocab_size": vocab} if vocab else {}))
    model = model_lib.GPT(cfg)
    params = model_lib.init_params(model, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x.astype(dtype), params)  # inference weights in the compute dtype, as the CLI
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    scfg = generate.SamplingConfig(max_new_tokens=new, temperature=0.0)
    generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)
    dt = (time.perf_counter() - t0) / repeats
    assert all(len(o) == new for o in out)
    device = jax.devices()[0]
    base = {"kind": "generate", "model": variant, "vocab": cfg.vocab_size, "batch": batch, "seq": prompt + new,
            "prompt": prompt, "new": new, "dtype": dtype, "device": device.device_kind}
    roof = decode_roofline(params, cfg, batch, prompt, new, bandwidth or metrics.peak_bandwidth_per_device(device))
    ours = dict(base, impl="ours", tokens_per_s=batch * new / dt, ms_per_step=1e3 * dt / new, **roof)
    if roof.get("roofline_tokens_per_s"):
        ours["roofline_fraction"] = ours["tokens_per_s"] / roof["roofline_tokens_per_s"]
    rows = [ours]
    if peer:
        import torch

        device_t = "cuda" if torch.cuda.is_available() else "cpu"
        tm = hf_peer_model(model, params, dtype, device_t)
        del params  # the peer holds its own copy
        ids = torch.tensor(prompts, device=device_t)
        kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            tm.generate(ids, max_new_tokens=min(new, 8), min_new_tokens=min(new, 8), **kw)  # warm-up (eager: no compile)
            if device_t == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(peer_repeats):
                ref = tm.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
            if device_t == "cuda":
                torch.cuda.synchronize()
        tdt = (time.perf_counter() - t0) / peer_repeats
        assert ref.shape == (batch, prompt + new)
        del tm
        rows.append(dict(base, impl="hf-torch", tokens_per_s=batch * new / tdt, ms_per_step=1e3 * tdt / new,
                         torch=torch.__version__))
        rows[0]["speedup_vs_hf"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


def bench_train(variant: str, batch: int, seq: int, steps: int, peer: bool = False, dtype: str = "float32",
                remat: str = "none", scan_layers: bool = False, attention_impl: str = "auto",
                peak_flops: float = 0.0, loss_chunk: int = 0, vocab: int = 0, lora_rank: int = 0) -> list[dict]:
    import jax

    from biomedlm_jax import configlib, metrics, sharding, tasks, train, train_state
    from biomedlm_jax import model as model_lib

    cfg = model_lib.get_config(variant, n_positions=max(model_lib.VARIANTS[variant].get("n_positions", 1024), seq),
                               dtype=dtype, remat_policy=remat, scan_layers=scan_layers, attention_impl=attention_impl,
                               embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                               **({"vocab_size": vocab} if vocab else {}))
    config = configlib.train_config()
    config.seq_len, config.global_batch_size, config.num_train_steps = seq, batch, 1000
    config.loss_chunk_size = loss_chunk
    config.lora.rank = lora_rank
    cfg = train.with_lora(cfg, config)
    model = model_lib.GPT(cfg)
    tx, _ = train.make_optimizer(config)
    plan = train_state.LoraPlan(cfg)  # LoRA on a random base: adapters train, the rest is frozen
    n = jax.device_count()
    while batch % n:  # data parallel over as many devices as divide the batch
        n -= 1
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:n])
    rules = sharding.DEFAULT_RULES
    abstract, shardings = train_state.state_shardings(model, tx, mesh, rules, seq, plan)
    plan = plan.bind(abstract["params"])
    b_sharding = train_state.batch_sharding(mesh, rules)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (steps + 1, 1, batch, seq + 1)).astype(np.int32)
    batches = [{"inputs": jax.device_put(x[..., :-1], b_sharding), "targets": jax.device_put(x[..., 1:], b_sharding)}
               for x in ids]
    with jax.set_mesh(mesh), __import__("flax").linen.logical_axis_rules(rules):
        task = tasks.LMTask(config)
        state, _ = train_state.initial_state(config, model, cfg, tx, abstract, shardings, task, plan)
        step = jax.jit(train.make_train_step(model, tx, True, task, plan),
                       in_shardings=(shardings, b_sharding), out_shardings=(shardings, None), donate_argnums=0)
        t0 = time.perf_counter()
        step = step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        analysis = step.memory_analysis()  # XLA's buffer assignment: known before running, on every backend
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        times = []
        for b in batches[1:]:
            t0 = time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    device = jax.devices()[0]
    peak = peak_flops or metrics.peak_flops_per_device(device)
    tok_s = batch * seq / dt
    mem = None
    try:
        stats = device.memory_stats() or {}
        mem = stats.get("peak_bytes_in_use")
    except Exception:  # some backends do not report memory
        pass
    base = {"kind": "train", "model": variant, "vocab": cfg.vocab_size, "batch": batch, "seq": seq, "dtype": dtype,
            "device": device.device_kind, "devices": mesh.devices.size}
    rows = [dict(base, impl="ours", tokens_per_s=tok_s, step_ms=1e3 * dt, compile_s=compile_s,
                 mfu=metrics.mfu(tok_s, cfg, seq, mesh.devices.size, peak), peak_memory_bytes=mem,
                 remat=remat, scan_layers=scan_layers, attention_impl=attention_impl, loss_chunk=loss_chunk,
                 lora_rank=lora_rank,
                 temp_bytes=getattr(analysis, "temp_size_in_bytes", None),
                 flops_per_token=metrics.flops_per_token(cfg, seq), loss=float(m["loss"]))]
    if peer:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from biomedlm_jax import hf

        del state, batches  # give the device memory to the peer
        device_t = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device_t):  # initialised where it trains (a 2.7B CPU init takes minutes)
            tm = GPT2LMHeadModel(GPT2Config(**hf.config_to_hf(cfg))).train()
        opt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0,
                                fused=device_t == "cuda")
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device_t == "cuda" and dtype == "bfloat16" else None
        tids = torch.tensor(ids[:, 0], device=device_t, dtype=torch.long)
        ttimes = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with amp if amp is not None else torch.enable_grad():
                loss = tm(tids[i, :, :-1], labels=tids[i, :, :-1]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device_t == "cuda":
                torch.cuda.synchronize()
            ttimes.append(time.perf_counter() - t0)
        tdt = float(np.median(ttimes[1:]))
        ttok = batch * seq / tdt
        del tm, opt
        if device_t == "cuda":
            torch.cuda.empty_cache()
        rows.append(dict(base, impl="hf-torch", tokens_per_s=ttok, step_ms=1e3 * tdt,
                         mfu=metrics.mfu(ttok, cfg, seq, 1, peak), torch=torch.__version__))
        rows[0]["speedup_vs_hf"] = tok_s / ttok
    return rows


# XLA:CPU has no bf16 matmul: it upcasts bf16 dot operands to f32, and loop-invariant code motion then
# hoists that conversion of every layer's stacked weights out of the scanned layer loop (10 GB of f32
# copies for a bf16 2.7B base). GPUs and TPUs multiply bf16 natively, so nothing is converted there. To
# report what an accelerator needs, the CPU compile of `bench memory` leaves that pass out (--cpu_as_is
# keeps it).
_CPU_MEMORY_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
MEMORY_TASKS = {"lm": None, "medqa": 4, "pubmedqa": 1}  # task -> options per question (None: LM rows)


def bench_memory(variant: str, task: str, seq: int, batch: int, lora_rank: int, mesh: str = "1,1,1",
                 dtype: str = "bfloat16", remat: str = "full", scan_layers: bool = True, moments: str = "bfloat16",
                 base_dtype: str = "bfloat16", grad_accum: int = 1,
                 lora_targets: str = "qkv,attn_out,mlp_in,mlp_out", cpu_as_is: bool = False,
                 mcqa_config: str = "configs/mcqa.py") -> dict:
    """What the trainer's real train step needs on one device, from XLA's buffer assignment of the step
    compiled for abstract (shape-only) state and batch: no weights are allocated, so a 2.7B report
    runs on a laptop. `batch` counts questions (or LM rows) per micro-batch. An MCQA task's settings
    come from its variant of `mcqa_config` (the checkout's configs/mcqa.py)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from biomedlm_jax import (
        configlib,
        mcqa,
        mcqa_data,
        sharding,
        tasks,
        train,
        train_state,
    )
    from biomedlm_jax import model as model_lib

    if task not in MEMORY_TASKS:
        raise SystemExit(f"--task={task}: choose from {sorted(MEMORY_TASKS)}")
    base_cfg = model_lib.get_config(variant, n_positions=max(model_lib.VARIANTS[variant].get("n_positions", 1024), seq),
                                    dtype=dtype, remat_policy=remat, scan_layers=scan_layers,
                                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    if task == "lm":
        config = configlib.train_config()
    elif not os.path.exists(mcqa_config):
        raise SystemExit(f"--mcqa_config={mcqa_config} not found: pass the checkout's configs/mcqa.py")
    else:
        config = configlib.load_config_file(mcqa_config, task)
    config.seq_len, config.grad_accum_steps, config.global_batch_size = seq, grad_accum, batch * grad_accum
    config.lora.rank, config.lora.targets, config.lora.base_dtype = lora_rank, lora_targets, base_dtype
    config.optimizer.mu_dtype = config.optimizer.nu_dtype = "" if moments == "float32" else moments
    cfg = train.with_lora(base_cfg, config)
    if task == "lm":
        task_obj = tasks.LMTask(config)
    else:
        task_obj = mcqa.MCQATask(config, n_options=MEMORY_TASKS[task])
        added = sum(len(t) for t in mcqa_data.TASK_TOKENS[task_obj.head])  # none is in a GPT-2-style base vocab
        cfg = cfg.replace(vocab_size=base_cfg.vocab_size + added)
    model = task_obj.model(cfg)
    tx, _ = train.make_optimizer(config)
    mesh_shape = tuple(int(x) for x in mesh.split(","))
    m = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    rules = sharding.DEFAULT_RULES
    plan = train_state.LoraPlan(  # only a LoRA run masks the base's embedding rows and stores them in base_dtype
        cfg, task_obj.backbone, base_cfg.vocab_size if lora_rank and task != "lm" else None,
        base_dtype if lora_rank else None)
    abstract, shardings = train_state.state_shardings(model, tx, m, rules, task_obj.example_inputs(), plan)
    plan = plan.bind(abstract["params"])
    b_sharding = train_state.batch_sharding(m, rules)
    A, B = grad_accum, batch
    if task == "lm":
        fields = {"inputs": ((A, B, seq), np.int32), "targets": ((A, B, seq), np.int32)}
    else:
        k = MEMORY_TASKS[task]
        fields = {"ids": ((A, B, k, seq), np.int32), "mask": ((A, B, k, seq), bool), "labels": ((A, B), np.int32)}
    batch_abstract = {n: jax.ShapeDtypeStruct(shape, dt, sharding=b_sharding) for n, (shape, dt) in fields.items()}
    step = jax.jit(train.make_train_step(model, tx, True, task_obj, plan),
                   in_shardings=(shardings, b_sharding), out_shardings=(shardings, NamedSharding(m, P())),
                   donate_argnums=0)
    t0 = time.perf_counter()
    with jax.set_mesh(m), __import__("flax").linen.logical_axis_rules(rules):
        options = _CPU_MEMORY_COMPILER_OPTIONS if jax.default_backend() == "cpu" and not cpu_as_is else None
        compiled = step.lower(abstract, batch_abstract).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(ma, f"{n}_size_in_bytes")) for n in ("argument", "output", "alias", "temp"))
    trainable_n, total_n = plan.counts(abstract["params"])
    return {"kind": "memory", "impl": "ours", "model": variant, "task": task, "batch": batch, "seq": seq,
            "tokens_per_s": None,
            "options": MEMORY_TASKS[task], "lora_rank": lora_rank, "lora_targets": lora_targets if lora_rank else None,
            "mesh": list(mesh_shape), "dtype": dtype, "remat": remat, "scan_layers": scan_layers,
            "moments": moments, "base_dtype": base_dtype if lora_rank else cfg.param_dtype, "grad_accum": grad_accum,
            "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "peak_bytes": arg + out - alias + temp, "peak_gb": round((arg + out - alias + temp) / 1e9, 2),
            "trainable_params": trainable_n, "total_params": total_n, "compile_s": round(compile_s, 1),
            "backend": jax.default_backend(), "compiler_options": options}


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
                from biomedlm_jax import bench_inference

                if kind == "engine":
                    rows = bench_inference.bench_engine(**dict(kwargs, medquad=os.path.join(data_dir, kwargs["medquad"]),
                                                               tokenizer=os.path.join(data_dir, kwargs["tokenizer"])))
                else:
                    rows = bench_inference.bench_decode(**kwargs, bandwidth=bandwidth)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pipeline", help="batches/s of the pretraining input pipeline")
    pp.add_argument("--seq", type=int, default=128)
    pp.add_argument("--batch", type=int, default=8)
    pp.add_argument("--steps", type=int, default=500)
    pp.add_argument("--prepared", default="", help="a prepare_data directory (default: random rows in memory)")
    pp.add_argument("--impl", choices=("numpy", "tf"), default="numpy")
    tk = sub.add_parser("tokenize", help="read + tokenize + pack tokens/s")
    tk.add_argument("--input", default=os.path.join("data", "pubmed_abstracts", "abstracts.jsonl"),
                    help="documents to tokenize (default: the checkout's sample, relative to the current directory)")
    tk.add_argument("--tokenizer", default=os.path.join("data", "gpt2_tokenizer"))
    tk.add_argument("--seq", type=int, default=1024)
    gp = sub.add_parser("generate", help="greedy KV-cache decoding tokens/s (optionally vs HF generate)")
    gp.add_argument("--model", default="tiny", help="a model variant (model.VARIANTS)")
    gp.add_argument("--batch", type=int, default=1)
    gp.add_argument("--prompt", type=int, default=128)
    gp.add_argument("--new", type=int, default=256)
    gp.add_argument("--dtype", default="float32")
    gp.add_argument("--peer", action="store_true", help="also run transformers' generate on the same weights")
    gp.add_argument("--vocab", type=int, default=0, help="override the variant's vocab size (e.g. 28896)")
    gp.add_argument("--bandwidth", type=float, default=0.0, help="memory bytes/s for the roofline (default: table)")
    tr = sub.add_parser("train", help="training step tokens/s, MFU, memory (optionally vs HF torch)")
    tr.add_argument("--model", default="bench-cpu")
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--seq", type=int, default=256)
    tr.add_argument("--steps", type=int, default=10)
    tr.add_argument("--dtype", default="float32")
    tr.add_argument("--remat", default="none")
    tr.add_argument("--scan_layers", action="store_true")
    tr.add_argument("--attention_impl", default="auto")
    tr.add_argument("--loss_chunk", type=int, default=0,
                    help="LM-head logits this many positions at a time (config loss_chunk_size; 0 = off)")
    tr.add_argument("--peak_flops", type=float, default=0.0, help="per-device peak FLOP/s for MFU (default: table)")
    tr.add_argument("--peer", action="store_true")
    tr.add_argument("--vocab", type=int, default=0, help="override the variant's vocab size (e.g. 28896)")
    tr.add_argument("--lora_rank", type=int, default=0, help="LoRA adapters on all four projections (0 = full)")
    me = sub.add_parser("memory", help="bytes the real train step needs on one device (no weights allocated)")
    me.add_argument("--model", default="tiny")
    me.add_argument("--task", default="lm", choices=sorted(MEMORY_TASKS))
    me.add_argument("--seq", type=int, default=512)
    me.add_argument("--batch", type=int, default=1, help="questions (or LM rows) per micro-batch")
    me.add_argument("--lora_rank", type=int, default=0)
    me.add_argument("--lora_targets", default="qkv,attn_out,mlp_in,mlp_out")
    me.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (needs that many devices)")
    me.add_argument("--dtype", default="bfloat16", help="compute dtype")
    me.add_argument("--remat", default="full")
    me.add_argument("--no_scan", action="store_true", help="unrolled layers instead of nn.scan")
    me.add_argument("--moments", default="bfloat16", choices=("bfloat16", "float32"), help="Adam moments' dtype")
    me.add_argument("--base_dtype", default="bfloat16", help="LoRA: the frozen base weights' storage dtype")
    me.add_argument("--grad_accum", type=int, default=1)
    me.add_argument("--cpu_as_is", action="store_true",
                    help="CPU: keep the loop-invariant hoisting of bf16->f32 weight casts (see bench.py)")
    me.add_argument("--mcqa_config", default="configs/mcqa.py", help="the config file an MCQA --task's variant is "
                    "read from (default: the checkout's, relative to the current directory)")
    mx = sub.add_parser("matrix", help="a benchmark matrix in one process, rows appended to OUT/bench.jsonl")
    mx.add_argument("--out", required=True, help="directory for bench.jsonl")
    mx.add_argument("--scale", default="gpu", choices=sorted(MATRIX))
    mx.add_argument("--budget_s", type=float, default=450.0, help="skip rows that would end after this many seconds")
    mx.add_argument("--only", default="", help="comma list of row-name prefixes (default: every row)")
    mx.add_argument("--peak_flops", type=float, default=0.0, help="per-device peak FLOP/s for MFU (default: table)")
    mx.add_argument("--bandwidth", type=float, default=0.0, help="memory bytes/s for the decode roofline (default: table)")
    mx.add_argument("--data_dir", default="data", help="the engine rows' MedQuAD sample and tokenizer (the checkout's data/)")
    args = p.parse_args(argv)
    if args.cmd == "matrix":
        bench_matrix(args.out, args.scale, args.budget_s, args.only, args.peak_flops, args.bandwidth, args.data_dir)
        return 0
    if args.cmd == "memory":
        rows = [bench_memory(args.model, args.task, args.seq, args.batch, args.lora_rank, args.mesh, args.dtype,
                             args.remat, not args.no_scan, args.moments, args.base_dtype, args.grad_accum,
                             args.lora_targets, args.cpu_as_is, args.mcqa_config)]
    elif args.cmd == "train":
        rows = bench_train(args.model, args.batch, args.seq, args.steps, args.peer, args.dtype, args.remat,
                           args.scan_layers, args.attention_impl, args.peak_flops, args.loss_chunk, args.vocab,
                           args.lora_rank)
    elif args.cmd == "pipeline":
        rows = [bench_pipeline(args.seq, args.batch, args.steps, args.prepared, args.impl)]
    elif args.cmd == "generate":
        rows = bench_generate(args.model, args.batch, args.prompt, args.new, args.peer, args.dtype, vocab=args.vocab,
                              bandwidth=args.bandwidth)
    else:
        rows = [bench_tokenize(args.input, args.tokenizer, args.seq)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
