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
training/metrics.py: 6·N + 12·L·d·T FLOPs per token, with N the matmul weights including the tied head. The
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

from biomedlm_jax.benchmarks.matrix import MATRIX, bench_matrix
from biomedlm_jax.benchmarks.memory import MEMORY_TASKS, bench_memory
from biomedlm_jax.benchmarks.speed import bench_generate, bench_pipeline, bench_tokenize, bench_train


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
