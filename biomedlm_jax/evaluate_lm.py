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
import functools
import json
import math
import sys
from typing import Iterable, Optional

import jax
import numpy as np

from biomedlm_jax import losses, readers, scoring
from biomedlm_jax import tokenizer as tokenizer_lib
from biomedlm_jax.model import GPT


def document_windows(ids: list[int], eos_id: int, seq_len: int) -> Iterable[tuple[list[int], list[int]]]:
    """(inputs, targets) windows predicting every token of `ids` once, each at most seq_len long."""
    seq = [eos_id] + list(ids)
    for start in range(0, len(ids), seq_len):
        stop = min(start + seq_len, len(ids))
        yield seq[start:stop], seq[start + 1 : stop + 1]


@functools.partial(jax.jit, static_argnames=("model",))
def _nll_sum(model: GPT, params, inputs, targets, weights):
    logits = model.apply({"params": params}, inputs)
    return losses.token_nll_sum(logits, targets, weights)


def evaluate(model: GPT, params, tok, docs: Iterable[tuple[str, str]], seq_len: int = 0, batch_size: int = 8) -> dict:
    """{"documents", "tokens", "bytes", "loss" (nats per token), "perplexity", "bits_per_byte"} over `docs`
    ((id, text) pairs). Rows are padded to seq_len and batch_size, so every batch reuses one compiled step."""
    seq_len = seq_len or model.config.n_positions
    if seq_len > model.config.n_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's n_positions={model.config.n_positions}")
    eos_id = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {tokenizer_lib.EOS_TOKEN} token to start documents with")
    totals = {"documents": 0, "tokens": 0, "bytes": 0}

    def rows():
        for _, text in docs:
            ids = tok.encode(text).ids
            if not ids:
                continue
            totals["documents"] += 1
            totals["tokens"] += len(ids)
            totals["bytes"] += len(text.encode("utf-8"))
            for x, y in document_windows(ids, eos_id, seq_len):
                inputs, targets, weights = (np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32),
                                            np.zeros(seq_len, np.float32))
                inputs[: len(x)], targets[: len(y)], weights[: len(y)] = x, y, 1.0
                yield inputs, targets, weights

    nll = 0.0  # padded rows have zero weight
    for (inputs, targets, weights), _ in scoring.batches(rows(), batch_size):
        nll += float(jax.device_get(_nll_sum(model, params, inputs, targets, weights))[0])
    if not totals["tokens"]:
        raise ValueError("no document had any tokens to score")
    loss = nll / totals["tokens"]
    return dict(totals, loss=loss, perplexity=losses.perplexity(loss),
                bits_per_byte=nll / math.log(2) / totals["bytes"])


def main(argv: Optional[list[str]] = None) -> int:
    from biomedlm_jax import convert

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
    args = p.parse_args(argv)
    from biomedlm_jax import quantize

    try:
        quantize.check_mode(args.quantize)
    except ValueError as e:
        p.error(str(e))
    model, params, tok = convert.load_for_inference(args.init_from, args.dtype)
    model, params = quantize.quantize(model, params, args.quantize)
    stats = readers.ReadStats()
    docs = readers.read_documents(readers.expand_files(args.input), stats, fmt=args.format)
    if args.max_docs:
        docs = (d for _, d in zip(range(args.max_docs), docs))
    result = evaluate(model, params, tok, docs, args.seq_len, args.batch_size)
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
