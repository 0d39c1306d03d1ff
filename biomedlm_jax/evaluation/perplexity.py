"""Language-model evaluation behind `python -m biomedlm_jax.evaluate_lm`: each document scored on its
own in windows (`document_windows`), summed into loss, perplexity and bits per byte (`evaluate`)."""
from __future__ import annotations

import functools
import math
from typing import Iterable

import jax
import numpy as np

from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.inference import scoring
from biomedlm_jax.models.gpt import GPT
from biomedlm_jax.training import losses


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
