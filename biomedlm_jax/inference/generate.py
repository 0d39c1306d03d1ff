"""Static-batch generation with a KV cache: `prefill` the left-padded prompts, then one jitted
`while_loop` decodes every row (greedy or sampled, n-gram bans, EOS, an optional streaming callback).
`python -m biomedlm_jax.generate` drives it (and the continuous-batching engine for --input files)."""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from biomedlm_jax.inference.sampling import (
    SamplingConfig,
    ban_repeated_ngrams,
    left_pad,
    positions_from_mask,
    sample_token,
)
from biomedlm_jax.models.gpt import GPT, init_cache, transposed_head


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def prefill(model: GPT, params, ids, mask, max_len: int):
    """Run the (left-padded) prompts through the model once.

    Returns (last logits (B, V), cache, kv_mask, head): `head` is the (C, V) tied head the decode loop
    multiplies every new token by (`model.transposed_head`)."""
    B, P = ids.shape
    cache = init_cache(model.config, B, max_len)
    kv_mask = jnp.zeros((B, max_len), bool).at[:, :P].set(mask)
    logits, cache = model.apply({"params": params}, ids, kv_mask, positions_from_mask(mask), cache, 0,
                                method="decode")
    return logits[:, -1], cache, kv_mask, transposed_head(params, model.config)



# The streaming callback is looked up at run time, so one compiled loop serves every prompt's callback.
_STREAM_SINK: list = [None]



def _to_sink(step, tok, done):
    if _STREAM_SINK[0] is not None:
        _STREAM_SINK[0](int(step), np.asarray(tok), np.asarray(done))



def _decode_loop(model: GPT, params, ids, mask, last_logits, cache, kv_mask, head, rng, cfg: SamplingConfig,
                 streaming: bool = False):
    B, P = ids.shape
    S = P + cfg.max_new_tokens
    tokens = jnp.zeros((B, S), jnp.int32).at[:, :P].set(ids)
    next_pos = mask.sum(-1).astype(jnp.int32)  # (B,) position of the next token
    eos = -1 if cfg.eos_id is None else cfg.eos_id

    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step < cfg.max_new_tokens) & ~done.all()

    def body(state):
        step, tokens, kv_mask, cache, logits, done, pos, rng = state
        rng, key = jax.random.split(rng)
        cur = P + step
        if cfg.no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens, kv_mask, cur, cfg.no_repeat_ngram_size)
        tok = sample_token(logits, key, cfg)
        tok = jnp.where(done, cfg.pad_id, tok)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], cur, axis=1)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(kv_mask, (~done)[:, None], cur, axis=1)
        if streaming:
            io_callback(_to_sink, None, step, tok, done, ordered=True)
        done = done | (tok == eos)
        logits, cache = model.apply({"params": params}, tok[:, None], kv_mask, pos[:, None], cache, cur, head,
                                    method="decode")
        return step + 1, tokens, kv_mask, cache, logits[:, 0], done, pos + 1, rng

    state = (jnp.int32(0), tokens, kv_mask, cache, last_logits, jnp.zeros((B,), bool), next_pos, rng)
    step, tokens, *_ = jax.lax.while_loop(cond, body, state)
    return tokens[:, P:], step



_decode = jax.jit(_decode_loop, static_argnames=("model", "cfg", "streaming"))



def generate(model: GPT, params, prompts: Sequence[Sequence[int]], rng, cfg: SamplingConfig, *,
             num_return_sequences: int = 1, bucket: int = 64, stream: Optional[Callable] = None) -> list[list[int]]:
    """Generated token ids per prompt (num_return_sequences rows per prompt, in order), each cut at and
    including EOS. `stream(step, tokens (B,), done (B,))` is called with every step's tokens."""
    prompts = [list(p) for p in prompts for _ in range(num_return_sequences)]
    ids, mask = left_pad(prompts, bucket, cfg.pad_id)
    max_len = ids.shape[1] + cfg.max_new_tokens
    if max_len > model.config.n_positions:
        # positions count real tokens, so only the longest real prompt + new tokens must fit
        longest = max(len(p) for p in prompts)
        if longest + cfg.max_new_tokens > model.config.n_positions:
            raise ValueError(f"prompt of {longest} tokens + {cfg.max_new_tokens} new exceeds n_positions="
                             f"{model.config.n_positions}")
    logits, cache, kv_mask, head = prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), max_len)
    _STREAM_SINK[0] = stream
    try:
        out, steps = _decode(model, params, jnp.asarray(ids), jnp.asarray(mask), logits, cache, kv_mask, head, rng,
                             cfg, stream is not None)
        out, steps = np.asarray(out), int(steps)
    finally:
        _STREAM_SINK[0] = None
    out = out[:, :steps]
    results = []
    for row in out:
        row = row.tolist()
        if cfg.eos_id is not None and cfg.eos_id in row:
            row = row[: row.index(cfg.eos_id) + 1]
        results.append(row)
    return results
