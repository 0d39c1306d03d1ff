"""Benchmarks that print numbers, one JSON line per measurement (collect them with `| jq`).

    python -m biomedlm_jax.bench pipeline --seq=128 --batch=8 [--steps=500 --prepared=DIR --impl=numpy|tf]
    python -m biomedlm_jax.bench tokenize [--input=FILES --tokenizer=DIR]

`pipeline` measures the batches a training process would consume: BatchIterator.batch_at (random,
seeded row gathers from memory or memory-mapped shards, int32 conversion, input/target split). With
`--impl=tf`, the same batches come through the prefetching tf.data wrapper. `tokenize` measures
offline preparation: read + tokenize + pack tokens/s. The benchmark imports no TensorFlow unless
`--impl=tf` is given.
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
    args = p.parse_args(argv)
    if args.cmd == "pipeline":
        row = bench_pipeline(args.seq, args.batch, args.steps, args.prepared, args.impl)
    else:
        row = bench_tokenize(args.input, args.tokenizer, args.seq)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
