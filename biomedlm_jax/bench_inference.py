"""Inference benchmarks: continuous batching on mixed-length answers, and quantized decoding.

    python -m biomedlm_jax.bench_inference engine --model=bench-cpu --questions=256 --slots=16 --max_new=256 \
        [--medquad=data/medquad --tokenizer=data/gpt2_tokenizer --steps_per_sync=8 --peer]
    python -m biomedlm_jax.bench_inference decode --model=bench-cpu --batch=1 --prompt=128 --new=128 \
        [--quantize=int8 --gguf=F16,Q8_0 --llama_extra_bufts=auto|on|off|both --bandwidth=B]

`engine` generates answers for the first `--questions` MedQuAD questions (prompt "Question: ...\nAnswer:")
with each request's budget set to its reference answer's token count (at most `--max_new`): the
lengths a model that stops where the reference stops would produce. A random-init model never emits
EOS on cue, so budgets stand in for natural stopping. Three ways, at the same batch width:
  * `engine`: `engine.Engine` with `--slots` slots, a finished slot refilled at once;
  * `static`: `generate.generate` on consecutive batches of `--slots` questions, each batch decoding
    to its longest budget (today's batching before the engine), rows then cut to their budgets;
  * `hf-static` (`--peer`): transformers' `generate` on the same batches and weights.
`tokens_per_s` counts only the tokens requests asked for (useful tokens); `slot_steps` is decode
steps × batch width, the work each way paid for.

`decode` times batch-`--batch` greedy decoding of exactly `--new` tokens (as `bench generate`) for
fp32 and, with `--quantize=int8`, for Qwix int8 weights (`models/quantize.py`), with bytes per step
(`decode_roofline` on the weights as stored) and the fraction of this host's measured memory
bandwidth (`measure_bandwidth`, or `--bandwidth`). `--gguf=F16,Q8_0` also exports the weights to
GGUF (`formats/gguf.py`) and times llama.cpp (llama-cpp-python) at batch 1 on the same prompt, each
file in a process of its own (a llama.cpp crash costs that row, marked `error`). llama.cpp's extra
buffer types (AMX tiles, repacked weights) are off where AMX is reported, which avoids a crash there
(docs/inference.md); `--llama_extra_bufts=both` times each file with them and without.

`serve` puts `python -m biomedlm_jax.serve` (and, with `--llama_cpp`, llama-cpp-python's OpenAI server on
the same weights as GGUF) under `--clients` concurrent streaming clients sending MedQuAD questions
(benchmarks/serving.py): requests/s, tokens/s, p50 / p99 latency and time to first token.

    python -m biomedlm_jax.bench_inference serve --model=bench-cpu --questions=64 --clients=1,8,32 [--llama_cpp]
    python -m biomedlm_jax.bench_inference serve-load --clients=64 --seconds=60 [--llama_cpp]  (benchmarks/serve_load.py)
    python -m biomedlm_jax.bench_inference health-probe       (/health while huge requests are refused)

`gguf-memory` exports a random-init `--model` (fp32) to GGUF while sampling the process's resident set:
the peak beyond the weights, against the largest tensor (the export streams one tensor at a time).

`quality` measures what int8 costs: bits per byte and perplexity on documents (`evaluate_lm.evaluate`)
for a checkpoint (`--init_from`, with `--held_out=F` keeping only the documents its pretraining held
out, by the PMID-hash split of input_pipeline.in_eval_split) or a random-init `--model`; and, with
`--classifier=orbax:WORKDIR --tasks=...`, an MCQA classifier's largest logit change and accuracy
change (`evaluate_mcqa.evaluate`), fp32 against `--quantize=int8` on the same items.

    python -m biomedlm_jax.bench_inference quality --init_from=orbax:demo_out/pretrain --held_out=0.1 \
        --input=data/pubmed_abstracts/abstracts.jsonl [--classifier=orbax:demo_out/mcqa --tasks=pubmedqa]
    python -m biomedlm_jax.bench_inference quality --model=gpt2-small --input=... --max_docs=100
"""
from __future__ import annotations

import argparse
import json
import os

from biomedlm_jax.benchmarks.inference import bench_decode, bench_engine, bench_quality
from biomedlm_jax.formats import gguf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_inference")
    sub = p.add_subparsers(dest="cmd", required=True)
    en = sub.add_parser("engine", help="continuous batching vs static batches on MedQuAD's mixed lengths")
    en.add_argument("--model", default="bench-cpu")
    en.add_argument("--vocab", type=int, default=0)
    en.add_argument("--questions", type=int, default=256)
    en.add_argument("--slots", type=int, default=16, help="batch width (engine slots = static batch size)")
    en.add_argument("--max_new", type=int, default=256)
    en.add_argument("--steps_per_sync", type=int, default=8)
    en.add_argument("--medquad", default=os.path.join("data", "medquad"), help="MedQuAD XML folder")
    en.add_argument("--tokenizer", default=os.path.join("data", "gpt2_tokenizer"))
    en.add_argument("--peer", action="store_true", help="also time transformers' generate on the same batches")
    de = sub.add_parser("decode", help="greedy decode tokens/s: fp32, int8, llama.cpp GGUF")
    de.add_argument("--model", default="bench-cpu")
    de.add_argument("--vocab", type=int, default=0)
    de.add_argument("--batch", type=int, default=1)
    de.add_argument("--prompt", type=int, default=128)
    de.add_argument("--new", type=int, default=128)
    de.add_argument("--quantize", default="", help="int8: also time Qwix int8 weights")
    de.add_argument("--gguf", default="", help="comma list of GGUF types (F16,Q8_0) to time in llama.cpp (batch 1)")
    de.add_argument("--bandwidth", type=float, default=0.0, help="memory bytes/s (default: measured here)")
    de.add_argument("--out", default="", help="folder for the GGUF files (default: a temporary one)")
    de.add_argument("--llama_extra_bufts", default="auto", choices=gguf.EXTRA_BUFTS_CHOICES + ("both",),
                    help="llama.cpp's extra buffer types (AMX, repacked weights): auto = off where AMX is reported "
                         "(a crash there, docs/inference.md), both = time each file with and without")
    se = sub.add_parser("serve", help="the HTTP server under 1..N concurrent streaming clients (and llama.cpp's)")
    se.add_argument("--model", default="bench-cpu")
    se.add_argument("--questions", type=int, default=64)
    se.add_argument("--clients", default="1,8,32", help="comma list of concurrent client counts")
    se.add_argument("--slots", type=int, default=16)
    se.add_argument("--max_new", type=int, default=64)
    se.add_argument("--steps_per_sync", type=int, default=8)
    se.add_argument("--medquad", default=os.path.join("data", "medquad"), help="MedQuAD XML folder")
    se.add_argument("--tokenizer", default=os.path.join("data", "gpt2_tokenizer"))
    se.add_argument("--llama_extra_bufts", default="auto", choices=gguf.EXTRA_BUFTS_CHOICES,
                    help="llama.cpp's extra buffer types for --llama_cpp's server (auto: off where AMX is reported)")
    se.add_argument("--llama_cpp", action="store_true", help="also llama-cpp-python's server on the GGUF export "
                    "(needs pip install -e .[serve-bench])")
    sl = sub.add_parser("serve-load", help="the server for SECONDS under CLIENTS streams, some disconnecting or "
                        "sending bad requests: correctness, metrics, leaks, memory, latency (and llama.cpp's)")
    sl.add_argument("--model", default="bench-cpu")
    sl.add_argument("--clients", type=int, default=64)
    sl.add_argument("--seconds", type=float, default=60.0)
    sl.add_argument("--slots", type=int, default=16)
    sl.add_argument("--max_new", type=int, default=64)
    sl.add_argument("--questions", type=int, default=64)
    sl.add_argument("--disconnect", type=float, default=0.10, help="share of clients hanging up mid-stream")
    sl.add_argument("--bad", type=float, default=0.05, help="share of invalid requests")
    sl.add_argument("--steps_per_sync", type=int, default=8)
    sl.add_argument("--medquad", default=os.path.join("data", "medquad"), help="MedQuAD XML folder")
    sl.add_argument("--tokenizer", default=os.path.join("data", "gpt2_tokenizer"))
    sl.add_argument("--llama_extra_bufts", default="auto", choices=gguf.EXTRA_BUFTS_CHOICES)
    sl.add_argument("--llama_cpp", action="store_true", help="also llama-cpp-python's server, good requests only")
    hp = sub.add_parser("health-probe", help="/health's latency while the server refuses huge requests")
    hp.add_argument("--model", default="tiny")
    hp.add_argument("--max_len", type=int, default=512)
    hp.add_argument("--slots", type=int, default=4)
    hp.add_argument("--tokenizer", default=os.path.join("data", "gpt2_tokenizer"))
    gm = sub.add_parser("gguf-memory", help="peak host memory of a GGUF export beyond the weights")
    gm.add_argument("--model", default="gpt2-medium")
    gm.add_argument("--gguf_type", default="F16")
    qu = sub.add_parser("quality", help="what int8 costs: bits/byte and perplexity, MCQA logits and accuracy")
    qu.add_argument("--input", default=os.path.join("data", "pubmed_abstracts", "abstracts.jsonl"))
    qu.add_argument("--init_from", default="", help="hf:DIR or orbax:WORKDIR (default: a random-init --model)")
    qu.add_argument("--model", default="gpt2-small")
    qu.add_argument("--tokenizer", default="", help="for --model (default data/gpt2_tokenizer)")
    qu.add_argument("--held_out", type=float, default=0.0, help="keep only this PMID-hash held-out fraction")
    qu.add_argument("--max_docs", type=int, default=0)
    qu.add_argument("--seq_len", type=int, default=0)
    qu.add_argument("--classifier", default="", help="an MCQA classifier (orbax:WORKDIR or hf:DIR)")
    qu.add_argument("--tasks", default="pubmedqa")
    qu.add_argument("--data_dir", default="data")
    args = p.parse_args(argv)
    if args.cmd == "quality":
        rows = bench_quality(args.input, args.init_from, args.model, args.held_out, args.max_docs, args.seq_len,
                             args.classifier, args.tasks, args.data_dir, args.tokenizer)
    elif args.cmd == "gguf-memory":
        from biomedlm_jax.benchmarks.inference import bench_gguf_memory

        rows = bench_gguf_memory(args.model, args.gguf_type)
    elif args.cmd == "serve":
        from biomedlm_jax.benchmarks.serving import bench_serve

        rows = bench_serve(args.model, args.questions, [int(c) for c in args.clients.split(",")], args.slots,
                           args.max_new, args.medquad, args.tokenizer, args.steps_per_sync, args.llama_cpp,
                           args.llama_extra_bufts)
    elif args.cmd == "health-probe":
        from biomedlm_jax.benchmarks.health_probe import bench_health_probe

        rows = bench_health_probe(args.model, args.max_len, args.slots, args.tokenizer)
    elif args.cmd == "serve-load":
        from biomedlm_jax.benchmarks.serve_load import bench_serve_load

        rows = bench_serve_load(args.model, args.clients, args.seconds, args.slots, args.max_new, args.medquad,
                                args.tokenizer, args.questions, args.disconnect, args.bad, args.steps_per_sync,
                                args.llama_cpp, args.llama_extra_bufts)
    elif args.cmd == "engine":
        rows = bench_engine(args.model, args.questions, args.slots, args.max_new, args.medquad, args.tokenizer,
                            args.steps_per_sync, args.peer, args.vocab)
    else:
        rows = bench_decode(args.model, args.batch, args.prompt, args.new, args.quantize, args.gguf, args.bandwidth,
                            args.vocab, out_dir=args.out, llama_extra_bufts=args.llama_extra_bufts)
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
