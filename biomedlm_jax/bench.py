"""Benchmarks that print numbers, one JSON line per measurement (collect them with `| jq`).

    python -m biomedlm_jax.bench pipeline --seq=128 --batch=8 [--steps=500 --prepared=DIR --impl=numpy|tf]
    python -m biomedlm_jax.bench tokenize [--input=FILES --tokenizer=DIR]
    python -m biomedlm_jax.bench generate --model=tiny --batch=1 --prompt=128 --new=256 [--peer --dtype=bfloat16]

`pipeline` measures the batches a training process would consume: BatchIterator.batch_at (random,
seeded row gathers from memory or memory-mapped shards, int32 conversion, input/target split). With
`--impl=tf`, the same batches come through the prefetching tf.data wrapper. `tokenize` measures
offline preparation: read + tokenize + pack tokens/s. The benchmark imports no TensorFlow unless
`--impl=tf` is given.

`generate` measures greedy decoding with the KV cache: exactly `--new` tokens per row (no EOS stop)
after a `--prompt`-token prompt, timed after a warm-up call that compiles. `--peer` runs the same
weights (exported with hf.save_pretrained) through transformers' GPT2LMHeadModel.generate
(do_sample=False, min_new_tokens = max_new_tokens) in the same process and prints its row and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from biomedlm_jax import input_pipeline as ip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    return {"kind": "pipeline", "impl": impl, "source": source, "batch": batch, "seq": seq, "steps": steps,
            "tokens_per_s": steps * batch * seq / dt, "ms_per_batch": 1e3 * dt / steps}


def bench_tokenize(inputs: str, tokenizer: str, seq: int = 1024) -> dict:
    from biomedlm_jax import readers
    from biomedlm_jax import tokenizer as tokenizer_lib

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    docs = list(readers.read_documents(readers.expand_files(inputs)))
    packed = ip.pack_documents(docs, tok, seq + 1)
    dt = time.perf_counter() - t0
    return {"kind": "tokenize", "impl": "tokenizers", "documents": len(docs), "tokens": packed.num_tokens,
            "tokens_per_s": packed.num_tokens / dt, "seconds": dt}


def bench_generate(variant: str, batch: int, prompt: int, new: int, peer: bool = False, dtype: str = "float32",
                   repeats: int = 2) -> list[dict]:
    import tempfile

    import jax

    from biomedlm_jax import generate, hf
    from biomedlm_jax import model as model_lib

    n_pos = max(model_lib.VARIANTS[variant].get("n_positions", 1024), prompt + new)
    cfg = model_lib.get_config(variant, n_positions=n_pos, dtype=dtype)
    model = model_lib.GPT(cfg)
    params = model_lib.init_params(model, jax.random.PRNGKey(0))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).tolist()
    scfg = generate.SamplingConfig(max_new_tokens=new, temperature=0.0)
    generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = generate.generate(model, params, prompts, jax.random.PRNGKey(0), scfg)
    dt = (time.perf_counter() - t0) / repeats
    assert all(len(o) == new for o in out)
    base = {"kind": "generate", "model": variant, "batch": batch, "prompt": prompt, "new": new, "dtype": dtype,
            "device": jax.devices()[0].device_kind}
    rows = [dict(base, impl="ours", tokens_per_s=batch * new / dt, ms_per_step=1e3 * dt / new)]
    if peer:
        import torch
        from transformers import GPT2LMHeadModel

        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(model, params, d)
            tm = GPT2LMHeadModel.from_pretrained(d).eval()
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        tm = tm.to(device=device, dtype=torch_dtype)
        ids = torch.tensor(prompts, device=device)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            tm.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                ref = tm.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
        tdt = (time.perf_counter() - t0) / repeats
        assert ref.shape == (batch, prompt + new)
        rows.append(dict(base, impl="hf-torch", tokens_per_s=batch * new / tdt, ms_per_step=1e3 * tdt / new))
        rows[0]["speedup_vs_hf"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


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
    tk.add_argument("--input", default=os.path.join(REPO, "data", "pubmed_abstracts", "abstracts.jsonl"))
    tk.add_argument("--tokenizer", default=os.path.join(REPO, "data", "gpt2_tokenizer"))
    tk.add_argument("--seq", type=int, default=1024)
    gp = sub.add_parser("generate", help="greedy KV-cache decoding tokens/s (optionally vs HF generate)")
    gp.add_argument("--model", default="tiny", help="a model variant (model.VARIANTS)")
    gp.add_argument("--batch", type=int, default=1)
    gp.add_argument("--prompt", type=int, default=128)
    gp.add_argument("--new", type=int, default=256)
    gp.add_argument("--dtype", default="float32")
    gp.add_argument("--peer", action="store_true", help="also run transformers' generate on the same weights")
    args = p.parse_args(argv)
    if args.cmd == "pipeline":
        rows = [bench_pipeline(args.seq, args.batch, args.steps, args.prepared, args.impl)]
    elif args.cmd == "generate":
        rows = bench_generate(args.model, args.batch, args.prompt, args.new, args.peer, args.dtype)
    else:
        rows = [bench_tokenize(args.input, args.tokenizer, args.seq)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
