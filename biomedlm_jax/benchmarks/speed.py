"""The speed benchmarks behind `python -m biomedlm_jax.bench`: the input pipeline, offline
tokenization, KV-cache decoding and the trainer's step (tokens/s, MFU, compile time, scratch memory),
each optionally beside HF's PyTorch peer. The command's docstring describes each row."""
from __future__ import annotations

import time

import numpy as np

from biomedlm_jax.benchmarks.inference import decode_roofline, hf_peer_model
from biomedlm_jax.data import input_pipeline as ip
from biomedlm_jax.data import packing, shards


def bench_pipeline(seq: int, batch: int, steps: int, prepared: str = "", impl: str = "numpy", seed: int = 0) -> dict:
    if prepared:
        rows = shards.load_prepared(prepared, "train").rows
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
    from biomedlm_jax.data import readers
    from biomedlm_jax.data import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    docs = list(readers.read_documents(readers.expand_files(inputs)))
    packed = packing.pack_documents(docs, tok, seq + 1)
    dt = time.perf_counter() - t0
    return {"kind": "tokenize", "impl": "tokenizers", "model": None, "batch": None, "seq": seq,
            "documents": len(docs), "tokens": packed.num_tokens,
            "tokens_per_s": packed.num_tokens / dt, "seconds": dt}



def bench_generate(variant: str, batch: int, prompt: int, new: int, peer: bool = False, dtype: str = "float32",
                   repeats: int = 2, vocab: int = 0, peer_repeats: int = 2, bandwidth: float = 0.0) -> list[dict]:
    import jax

    from biomedlm_jax.inference import generate
    from biomedlm_jax.models import gpt as model_lib
    from biomedlm_jax.models import gpt_config
    from biomedlm_jax.training import metrics

    n_pos = max(gpt_config.VARIANTS[variant].get("n_positions", 1024), prompt + new)
    cfg = gpt_config.get_config(variant, n_positions=n_pos, dtype=dtype, **({"vocab_size": vocab} if vocab else {}))
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

    from biomedlm_jax.models import gpt as model_lib
    from biomedlm_jax.models import gpt_config, sharding
    from biomedlm_jax.training import configlib, metrics, trainer
    from biomedlm_jax.training import state as train_state
    from biomedlm_jax.training import task as tasks

    cfg = gpt_config.get_config(variant, n_positions=max(gpt_config.VARIANTS[variant].get("n_positions", 1024), seq),
                               dtype=dtype, remat_policy=remat, scan_layers=scan_layers, attention_impl=attention_impl,
                               embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                               **({"vocab_size": vocab} if vocab else {}))
    config = configlib.train_config()
    config.seq_len, config.global_batch_size, config.num_train_steps = seq, batch, 1000
    config.loss_chunk_size = loss_chunk
    config.lora.rank = lora_rank
    cfg = trainer.with_lora(cfg, config)
    model = model_lib.GPT(cfg)
    tx, _ = trainer.make_optimizer(config)
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
        step = jax.jit(trainer.make_train_step(model, tx, True, task, plan),
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

        from biomedlm_jax.formats import hf_config

        del state, batches  # give the device memory to the peer
        device_t = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device_t):  # initialised where it trains (a 2.7B CPU init takes minutes)
            tm = GPT2LMHeadModel(GPT2Config(**hf_config.config_to_hf(cfg))).train()
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
