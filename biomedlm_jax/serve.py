"""An OpenAI-compatible HTTP server on the continuous-batching engine.

    python -m biomedlm_jax.serve --init_from=hf:DIR|orbax:WORKDIR [--quantize=int8] \
        --slots=16 --max_len=1024 [--mesh_shape=-1,1,1] --host=127.0.0.1 --port=8000

    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "MODEL", "prompt": "Metformin is", "max_tokens": 32, "temperature": 0}'

    from openai import OpenAI       # any OpenAI client
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="MODEL", prompt="Metformin is", max_tokens=32, stream=True)

Every request's prompts enter one engine (`--slots` decode rows) as slots free: continuous batching
across HTTP requests. `--max_len` is the context one request may use (prompt + max_tokens, at most the
model's n_positions); the KV cache holds `--slots` x (max_len + bucket - 1) columns. At most
`--max_queue` prompts wait for a slot; beyond that a request gets 429 with Retry-After. The model's
name in the API is `--model_name` (default: the checkpoint folder's name). See docs/inference.md for
the endpoints, the errors and measured throughput.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def parser() -> argparse.ArgumentParser:
    from biomedlm_jax.core import errors

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.serve", description="OpenAI-compatible completions server")
    p.add_argument("--init_from", required=True, help="hf:DIR or orbax:WORKDIR (a LoRA run loads with its base)")
    p.add_argument("--quantize", default="none", help="int8: Qwix int8 weight-only quantization (default none)")
    p.add_argument("--dtype", default=None, help="compute and weight dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--slots", type=int, default=16, help="decode rows: requests generated at once")
    p.add_argument("--max_len", type=int, default=None, help="tokens one request may use, prompt + max_tokens "
                   "(default: the model's n_positions)")
    p.add_argument("--max_tokens_limit", type=int, default=None, help="the largest max_tokens a request may ask "
                   "for (default: max_len - 1)")
    p.add_argument("--bucket", type=int, default=64, help="prompts are padded to a multiple of this many tokens")
    p.add_argument("--steps_per_sync", type=int, default=8, help="decode steps between host syncs")
    p.add_argument("--max_queue", type=int, default=None, help="prompts waiting for a slot (default: 4 x slots)")
    p.add_argument("--max_logprobs", type=int, default=5, help="the largest 'logprobs' a request may ask for")
    p.add_argument("--max_body_bytes", type=int, default=None, help="the largest request body accepted; a larger "
                   "one gets a 400 before it is read (default: max_queue x max_len x 8 bytes + 64 KiB, what the "
                   "largest acceptable request needs)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=0, help="ban repeated n-grams (every request)")
    p.add_argument("--model_name", default=None, help="the model's id in the API (default: the checkpoint's folder)")
    p.add_argument("--mesh_shape", default=None,
                   help="data,fsdp,tensor over this host's devices (one may be -1), e.g. -1,1,1: slots split over "
                        "replicas; 1,-1,1: weights sharded over all devices. Default: one device")
    p.add_argument("--api_key", default=os.environ.get("BIOMEDLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                        "BIOMEDLM_API_KEY environment variable; unset: no key)")
    p.add_argument("--cors_origins", default="", help="comma list of origins browsers may call from (default none)")
    p.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM / SIGINT, seconds requests in flight may take to finish (default 30)")
    p.add_argument("--request_timeout", type=float, default=None,
                   help="seconds a completion may take from arrival, queueing included; then it is cancelled "
                        "and its unfinished choices end with finish_reason 'timeout' (default: no limit)")
    p.add_argument("--stall_timeout", type=float, default=60.0,
                   help="/health answers 503 when work waits and the engine has not finished a sync for this "
                        "many seconds (default 60)")
    p.add_argument("--prompt_template", default=None,
                   help="what /v1/chat/completions makes of a user turn, with {question}, e.g. "
                        "'Question: {question}\nAnswer:' (default: the seq2seq run's own; none: the route "
                        "says to use /v1/completions)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    errors.add_verbose_flag(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag in ("slots", "bucket", "steps_per_sync"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.max_logprobs < 0:
        p.error("--max_logprobs must be >= 0")
    if args.shutdown_timeout < 0:
        p.error("--shutdown_timeout must be >= 0")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        p.error("--max_body_bytes must be >= 1")
    if args.request_timeout is not None and args.request_timeout <= 0:
        p.error("--request_timeout must be > 0")
    if args.stall_timeout <= 0:
        p.error("--stall_timeout must be > 0")
    template = None
    if args.prompt_template is not None:
        from biomedlm_jax.serving.chat import PromptTemplate

        try:
            args.prompt_template.format(question="")
        except (KeyError, IndexError, ValueError) as e:
            p.error(f"--prompt_template: {e!r}: use {{question}} where the question goes (and {{{{ }}}} for braces)")
        template = PromptTemplate("template", args.prompt_template)

    from biomedlm_jax.models import quantize

    try:
        quantize.check_mode(args.quantize)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from biomedlm_jax.serving import server

    try:
        srv = server.build(args.init_from, quantize=args.quantize, dtype=args.dtype, slots=args.slots,
                           max_len=args.max_len, max_tokens_limit=args.max_tokens_limit, bucket=args.bucket,
                           steps_per_sync=args.steps_per_sync, max_queue=args.max_queue,
                           max_logprobs=args.max_logprobs, no_repeat_ngram_size=args.no_repeat_ngram_size,
                           max_body_bytes=args.max_body_bytes,
                           api_key=args.api_key or None, shutdown_timeout=args.shutdown_timeout,
                           request_timeout=args.request_timeout, stall_timeout=args.stall_timeout,
                           prompt_template=template,
                           cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()],
                           mesh_shape=args.mesh_shape,
                           model_name=args.model_name or os.path.basename(args.init_from.split(":", 1)[-1].rstrip("/")))
    except (ValueError, FileNotFoundError) as e:  # a bad source or size, a missing or damaged checkpoint
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    def stop(signum, frame):
        raise KeyboardInterrupt

    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal to the handler that was
    # there before: this one, so that a stopped server exits 0 instead of dying of the signal
    signal.signal(signal.SIGTERM, stop)
    try:
        srv.run(args.host, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
