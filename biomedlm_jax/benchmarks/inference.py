"""The inference benchmarks behind `python -m biomedlm_jax.bench_inference`: continuous batching vs
static batches vs HF (`bench_engine`), decode speed in float, int8 and llama.cpp (`bench_decode`), and
int8's quality cost (`bench_quality`), with the decode memory roofline (`decode_roofline`)."""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import numpy as np


def hf_peer_model(model, params, dtype: str, device: str):
    """transformers' GPT2LMHeadModel holding the same weights as `params`, built in memory (no files:
    a 2.7B export would write 5-11 GB), in `dtype` on `device`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from biomedlm_jax.formats import hf, hf_config

    cfg = model.config
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf(params, cfg, np.float32).items()}
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tm = GPT2LMHeadModel.from_pretrained(None, config=GPT2Config(**hf_config.config_to_hf(cfg)), state_dict=state,
                                         dtype=torch_dtype)
    return tm.to(device).eval()



def decode_roofline(params, cfg, batch: int, prompt: int, new: int, bandwidth: Optional[float]) -> dict:
    """The memory-bandwidth bound of greedy decoding: each step reads every weight once (the position
    table only one row) and the filled part of every layer's K and V cache, on average prompt +
    (new + 1) / 2 slots. Returns bytes per step and, when the bandwidth is known, the bound in tokens/s."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    weights = sum(x.size * np.dtype(x.dtype).itemsize for path, x in flat if "wpe" not in jax.tree_util.keystr(path))
    itemsize = np.dtype(cfg.dtype).itemsize
    kv = 2 * cfg.n_layer * batch * (prompt + (new + 1) / 2) * cfg.d_model * itemsize
    row = {"bytes_per_step": int(weights + kv), "weight_bytes": int(weights), "kv_bytes_per_step": int(kv),
           "hbm_bytes_per_s": bandwidth}
    if bandwidth:
        row["roofline_tokens_per_s"] = batch * bandwidth / (weights + kv)
    return row



def measure_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """This host's streaming read bandwidth (bytes/s): the best of `repeats` jitted sums over an
    fp32 array of `mbytes` MB, a reduction that reads each byte once and writes nothing."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a.sum())
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.size * 4 / best



def medquad_requests(medquad: str, tokenizer: str, questions: int, max_new: int, vocab: int):
    """(prompts, budgets): MedQuAD questions as "Question: ...\\nAnswer:" ids (mod `vocab`) and their
    reference answers' token counts, at most max_new."""
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.tasks import seq2seq

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    examples = seq2seq.read_medquad(medquad)[:questions]
    if len(examples) < questions:
        raise SystemExit(f"{medquad}: {len(examples)} question-answer pairs, fewer than --questions={questions}")
    prompts = [[t % vocab for t in tok.encode(f"Question: {e.question}\nAnswer:").ids] for e in examples]
    budgets = [max(1, min(max_new, len(tok.encode(" " + e.answer).ids))) for e in examples]
    return prompts, budgets



def random_model(variant: str, n_positions: int, vocab: int = 0, seed: int = 0, dtype: str = "float32"):
    """A random-init model of `variant` with weights stored and computed in `dtype` (as
    convert.load_for_inference loads a checkpoint for decoding)."""
    import jax

    from biomedlm_jax.models import gpt as model_lib
    from biomedlm_jax.models import gpt_config

    cfg = gpt_config.get_config(variant, n_positions=max(gpt_config.VARIANTS[variant].get("n_positions", 1024),
                                                        n_positions), dtype=dtype, param_dtype=dtype,
                               **({"vocab_size": vocab} if vocab else {}))
    model = model_lib.GPT(cfg)
    return model, model_lib.init_params(model, jax.random.PRNGKey(seed))



def bench_engine(variant: str, questions: int, slots: int, max_new: int, medquad: str, tokenizer: str,
                 steps_per_sync: int = 8, peer: bool = False, vocab: int = 0, dtype: str = "float32",
                 quantize: str = "") -> list[dict]:
    import jax

    from biomedlm_jax.inference import engine, generate
    from biomedlm_jax.models import gpt_config

    V = vocab or gpt_config.VARIANTS[variant]["vocab_size"]
    prompts, budgets = medquad_requests(medquad, tokenizer, questions, max_new, V)
    longest = max(len(p) for p in prompts)
    model, params = random_model(variant, longest + max_new, vocab, dtype=dtype)
    fmodel, fparams = model, params  # the HF peer gets the float weights
    if quantize:
        from biomedlm_jax.models import quantize as quant_lib

        model, params = quant_lib.quantize(model, params, quantize)
    cfg = generate.SamplingConfig(max_new_tokens=max_new, temperature=0.0)
    useful = sum(budgets)
    base = {"kind": "engine", "model": variant, "vocab": model.config.vocab_size, "questions": questions,
            "dtype": dtype, "quantize": quantize or "none",
            "batch": slots, "max_new": max_new, "useful_tokens": useful, "device": jax.devices()[0].device_kind,
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
            "budget_mean": float(np.mean(budgets)), "budget_max": int(max(budgets))}

    eng = engine.Engine(model, params, cfg, slots=slots, max_prompt_len=longest, steps_per_sync=steps_per_sync)
    reqs = [engine.Request(p, b) for p, b in zip(prompts, budgets)]
    eng.run(reqs[: 2 * slots])  # compile every prompt bucket used below and the decode loop
    t0 = time.perf_counter()
    outs = eng.run(reqs)
    dt_engine = time.perf_counter() - t0
    assert [len(o) for o in outs] == budgets
    rows = [dict(base, impl="ours-engine", steps_per_sync=steps_per_sync, seconds=dt_engine,
                 tokens_per_s=useful / dt_engine)]

    batches = [list(range(i, min(i + slots, questions))) for i in range(0, questions, slots)]
    for b in batches[:2]:  # compile (each batch's prompt bucket and budget)
        generate.generate(model, params, [prompts[n] for n in b], jax.random.PRNGKey(0),
                          generate.SamplingConfig(max_new_tokens=max(budgets[n] for n in b), temperature=0.0))
    t0, steps = time.perf_counter(), 0
    static_outs = {}
    for b in batches:
        new = max(budgets[n] for n in b)
        steps += new
        gen = generate.generate(model, params, [prompts[n] for n in b], jax.random.PRNGKey(0),
                                generate.SamplingConfig(max_new_tokens=new, temperature=0.0))
        static_outs.update({n: g[: budgets[n]] for n, g in zip(b, gen)})
    dt_static = time.perf_counter() - t0
    rows.append(dict(base, impl="ours-static", seconds=dt_static, tokens_per_s=useful / dt_static,
                     slot_steps=steps * slots))
    rows[0]["identical_to_static"] = all(static_outs[n] == outs[n] for n in range(questions))
    rows[0]["speedup_vs_static"] = dt_static / dt_engine

    if peer:
        import torch


        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        tm = hf_peer_model(fmodel, fparams, dtype, device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                new = max(budgets[n] for n in b)
                P = max(len(prompts[n]) for n in b)
                ids = torch.zeros((len(b), P), dtype=torch.long, device=device)
                mask = torch.zeros((len(b), P), dtype=torch.long, device=device)
                for j, n in enumerate(b):  # left padding, as generate wants for decoder-only models
                    ids[j, P - len(prompts[n]):] = torch.tensor(prompts[n], device=device)
                    mask[j, P - len(prompts[n]):] = 1
                tm.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)
        dt_hf = time.perf_counter() - t0
        rows.append(dict(base, impl="hf-static", seconds=dt_hf, tokens_per_s=useful / dt_hf, torch=torch.__version__))
        rows[0]["speedup_vs_hf"] = dt_hf / dt_engine
    return rows



def _time_generate(model, params, prompts, new: int, repeats: int = 3) -> float:
    import jax

    from biomedlm_jax.inference import generate

    scfg = generate.SamplingConfig(max_new_tokens=new, temperature=0.0)
    generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)
        best = min(best, time.perf_counter() - t0)
    return best



def _time_llama_cpp_isolated(path: str, prompt, new: int, repeats: int, extra_bufts: str):
    """time_llama_cpp in a spawned process: seconds, or None if llama.cpp crashed it (issue 44: Q8_0
    with extra buffers on an AMX host), so one crash costs a row, not the benchmark."""
    import concurrent.futures
    import multiprocessing

    from biomedlm_jax.formats import gguf as gguf_export

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(gguf_export.time_llama_cpp, path, list(prompt), new, repeats, extra_bufts).result()
        except concurrent.futures.process.BrokenProcessPool:
            return None


def bench_decode(variant: str, batch: int, prompt: int, new: int, quantize: str = "", gguf: str = "",
                 bandwidth: float = 0.0, vocab: int = 0, repeats: int = 3, out_dir: str = "",
                 dtype: str = "float32", llama_extra_bufts: str = "auto") -> list[dict]:
    import jax


    model, params = random_model(variant, prompt + new, vocab, dtype=dtype)
    cfg = model.config
    from biomedlm_jax.training import metrics

    # the device table where it knows the chip (GPUs, TPUs); this host measured otherwise (CPUs)
    bandwidth = bandwidth or metrics.peak_bandwidth_per_device(jax.devices()[0]) or measure_bandwidth()
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    base = {"kind": "decode", "model": variant, "vocab": cfg.vocab_size, "batch": batch, "prompt": prompt, "new": new,
            "device": jax.devices()[0].device_kind, "host_cpu": metrics.host_cpu(), "bandwidth_bytes_per_s": bandwidth,
            "dtype": dtype}

    def row(impl, dt, weights_params, **extra):
        roof = decode_roofline(weights_params, cfg, batch, prompt, new, bandwidth)
        tps = batch * new / dt
        return dict(base, impl=impl, tokens_per_s=tps, ms_per_step=1e3 * dt / new, **roof,
                    roofline_fraction=tps / roof["roofline_tokens_per_s"], **extra)

    rows = [row(f"ours-{'fp32' if dtype == 'float32' else dtype}", _time_generate(model, params, prompts, new, repeats),
                params)]
    if quantize:
        from biomedlm_jax.models import quantize as quant_lib

        qmodel, qparams = quant_lib.quantize(model, params, quantize)
        rows.append(row(f"ours-{quantize}", _time_generate(qmodel, qparams, prompts, new, repeats),
                        quant_lib.decode_read_params(qparams)))
    if gguf:
        import tempfile

        from biomedlm_jax.formats import gguf as gguf_export

        folder = out_dir or tempfile.mkdtemp(prefix="bench_gguf_")
        for ftype in gguf.split(","):
            path = os.path.join(folder, f"{variant}-{ftype}.gguf")
            gguf_export.write_gguf(model.config, params, None, path, ftype)
            if batch != 1:
                continue
            # llama.cpp's extra buffer types (AMX tiles, repacked blocks): "both" times the file with and without
            for setting in (("on", "off") if llama_extra_bufts == "both" else (llama_extra_bufts,)):
                on = gguf_export.extra_bufts_setting(setting)
                extra = dict(file_bytes=os.path.getsize(path), extra_bufts=on, cpu_amx=gguf_export.cpu_has_amx())
                dt = _time_llama_cpp_isolated(path, prompts[0], new, repeats, "on" if on else "off")
                if dt is None:
                    rows.append(dict(base, impl=f"llama.cpp-{ftype}", error="llama.cpp crashed its process", **extra))
                    continue
                rows.append(dict(base, impl=f"llama.cpp-{ftype}", tokens_per_s=new / dt, ms_per_step=1e3 * dt / new,
                                 roofline_fraction=(new / dt) * os.path.getsize(path) / bandwidth, **extra))
    return rows



def bench_quality(input_glob: str, init_from: str = "", variant: str = "gpt2-small", held_out: float = 0.0,
                  max_docs: int = 0, seq_len: int = 0, classifier: str = "", tasks: str = "", data_dir: str = "data",
                  tokenizer: str = "", mode: str = "int8") -> list[dict]:

    import jax

    from biomedlm_jax.data import packing, readers
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.evaluation import perplexity
    from biomedlm_jax.formats import loading
    from biomedlm_jax.models import quantize

    if init_from:
        model, params, tok = loading.load_for_inference(init_from)
        name = init_from
    else:
        model, params = random_model(variant, 0)
        tok = tokenizer_lib.load_tokenizer(tokenizer or os.path.join("data", "gpt2_tokenizer"))
        name = f"random-init {variant}"
    docs = list(readers.read_documents(readers.expand_files(input_glob)))
    if held_out:
        docs = [d for d in docs if packing.in_eval_split(d[0], held_out)]
    docs = docs[: max_docs or None]
    base = {"kind": "quality", "model": name, "params": int(sum(x.size for x in jax.tree.leaves(params))),
            "documents": len(docs), "held_out_fraction": held_out, "quantize": mode}
    qmodel, qparams = quantize.quantize(model, params, mode)
    fp = perplexity.evaluate(model, params, tok, iter(docs), seq_len)
    q = perplexity.evaluate(qmodel, qparams, tok, iter(docs), seq_len)
    rows = [dict(base, metric="lm", tokens=fp["tokens"], bits_per_byte_fp32=fp["bits_per_byte"],
                 bits_per_byte_int8=q["bits_per_byte"], bits_per_byte_delta=q["bits_per_byte"] - fp["bits_per_byte"],
                 perplexity_fp32=fp["perplexity"], perplexity_int8=q["perplexity"],
                 perplexity_rel_change=q["perplexity"] / fp["perplexity"] - 1)]
    if classifier:
        import tempfile

        from biomedlm_jax.evaluation import mcqa_eval

        task_map = mcqa_eval.parse_tasks(tasks, data_dir)
        kind, path = classifier.split(":", 1)
        logits, acc = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for m in ("none", mode):
                pred = os.path.join(tmp, f"{m}.jsonl")
                res = mcqa_eval.evaluate(task_map, workdir=path if kind == "orbax" else None,
                                             init_from=None if kind == "orbax" else classifier, progress=False,
                                             predictions=pred, quantize=m)
                acc[m] = {t: r.get("accuracy") for t, r in res.items()}
                with open(pred, encoding="utf-8") as f:
                    logits[m] = [json.loads(line) for line in f]
        a = np.asarray([r["logits"] for r in logits["none"]])
        b = np.asarray([r["logits"] for r in logits[mode]])
        preds_same = float(np.mean(a.argmax(-1) == b.argmax(-1)))
        rows.append(dict(base, metric="mcqa", model=classifier, items=len(a), max_abs_logit_delta=float(np.abs(a - b).max()),
                         mean_abs_logit_delta=float(np.abs(a - b).mean()), logit_scale=float(np.abs(a).mean()),
                         same_prediction=preds_same, accuracy_fp32=acc["none"], accuracy_int8=acc[mode]))
    return rows


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_gguf_memory(variant: str = "gpt2-medium", ftype: str = "F16", out_dir: str = "") -> list[dict]:
    """Peak host memory of `convert --to=gguf:` beyond the weights themselves: a random-init `variant`
    (fp32, as a checkpoint loads) is exported while a thread samples this process's resident set every
    2 ms. Linux only (/proc)."""
    import gc
    import tempfile
    import threading

    import jax

    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import gguf

    model, params = random_model(variant, 0)
    jax.block_until_ready(params)
    tok = tokenizer_lib.load_tokenizer(os.path.join("data", "gpt2_tokenizer")) if model.config.vocab_size == 50257 else None
    weights = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    largest = max(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))
    gc.collect()
    base, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        t.start()
        t0 = time.perf_counter()
        path = gguf.write_gguf(model.config, params, tok, os.path.join(out_dir or tmp, f"m-{ftype}.gguf"), ftype)
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
        size = os.path.getsize(path)
    extra = peak[0] - base
    return [{"kind": "gguf-memory", "model": variant, "gguf_type": ftype, "weights_bytes": weights,
             "largest_tensor_fp32_bytes": largest, "file_bytes": size, "peak_extra_bytes": extra,
             "peak_extra_over_largest_tensor": extra / largest, "peak_extra_over_weights": extra / weights,
             "seconds": dt}]
