"""Language-model evaluation of a checkpoint on documents: loss, perplexity and bits per byte.

    python -m biomedlm_jax.evaluate_lm --init_from=hf:DIR|orbax:WORKDIR --input=GLOBS
        [--format=auto] [--seq_len=0] [--batch_size=8] [--max_docs=0] [--dtype=bfloat16] [--quantize=int8] [--out=FILE.json]

Each document is scored on its own: `<|endoftext|>` first (GPT-2's document separator, so the first
real token is predicted too), then the document's tokens, cut into windows of `seq_len` predictions
(default: the model's n_positions) whose context restarts at each window. Every token of every document
is predicted exactly once.

Perplexity per token depends on the tokenizer; bits per byte (total NLL in bits / UTF-8 bytes of the
text) does not, so it compares models with different tokenizers on the same text, e.g. GPT-2's vs the
PubMed tokenizer (BioMedLM's second research question).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from biomedlm_jax.core import errors
from biomedlm_jax.data import readers
from biomedlm_jax.evaluation.perplexity import evaluate


def main(argv: Optional[list[str]] = None) -> int:
    from biomedlm_jax.formats import loading

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.evaluate_lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", required=True, help="hf:DIR or orbax:WORKDIR")
    p.add_argument("--input", required=True, help="comma-separated globs of JSONL / PubTator / PubMed XML / JATS")
    p.add_argument("--format", default="auto", choices=("auto", *readers.FORMATS))
    p.add_argument("--seq_len", type=int, default=0, help="predictions per window (default: the model's n_positions)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_docs", type=int, default=0, help="score only the first N documents (0 = all)")
    p.add_argument("--dtype", default=None, help="compute and weight dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--quantize", default="none", help="int8: Qwix int8 weight-only quantization (default none)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    errors.add_verbose_flag(p)
    args = p.parse_args(argv)
    from biomedlm_jax.models import quantize

    try:
        quantize.check_mode(args.quantize)
    except ValueError as e:
        p.error(str(e))
    try:
        model, params, tok = loading.load_for_inference(args.init_from, args.dtype)
        model, params = quantize.quantize(model, params, args.quantize)
        stats = readers.ReadStats()
        docs = readers.read_documents(readers.expand_files(args.input), stats, fmt=args.format)
        if args.max_docs:
            docs = (d for _, d in zip(range(args.max_docs), docs))
        result = evaluate(model, params, tok, docs, args.seq_len, args.batch_size)
    except (ValueError, FileNotFoundError) as e:  # DataError, CheckpointError, CheckpointDamaged, a missing input
        print(f"evaluate_lm: error: {e}", file=sys.stderr)
        return 1
    result.update(init_from=args.init_from, input=args.input, quantize=args.quantize, seq_len=args.seq_len or model.config.n_positions,
                  read_stats=stats.as_dict())
    print(f"{result['documents']:,} documents, {result['tokens']:,} tokens, {result['bytes']:,} bytes: loss "
          f"{result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}, "
          f"{result['bits_per_byte']:.4f} bits/byte")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0



if __name__ == "__main__":
    sys.exit(main())
