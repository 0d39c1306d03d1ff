"""Sampling and prompt-batch helpers shared by the static generator (generate.py) and the engine
(inference/engine.py): the sampling config, logits processors (n-gram bans, top-k, top-p), greedy and sampled
token choice, left padding and real-token positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0  # 0 = off
    eos_id: Optional[int] = None  # stop a row when it produces this token
    pad_id: int = 0  # written after a row has stopped


# ----------------------------------------------------------------------------------------------------
# Logits processing and sampling
# ----------------------------------------------------------------------------------------------------


def ban_repeated_ngrams(logits, tokens, valid, cur_len, n: int):
    """Set to -inf the logits of tokens that would complete an n-gram already in `tokens`.

    tokens: (B, S) with real tokens where `valid`; cur_len: slots [0, cur_len) are written. The
    candidate n-gram is tokens[cur_len-n+1 : cur_len] + next token.
    """
    B, S = tokens.shape
    if n <= 0 or S < n:
        return logits
    m = n - 1
    idx = jnp.arange(S - n + 1)  # window starts
    win = jnp.stack([tokens[:, idx + i] for i in range(n)], axis=-1)  # (B, W, n)
    win_valid = jnp.stack([valid[:, idx + i] for i in range(n)], axis=-1).all(-1) & (idx + n <= cur_len)[None]
    prefix_pos = cur_len - m + jnp.arange(m)  # (m,)
    prefix = jnp.take_along_axis(tokens, jnp.broadcast_to(jnp.clip(prefix_pos, 0, S - 1), (B, m)), axis=1)
    prefix_ok = jnp.take_along_axis(valid, jnp.broadcast_to(jnp.clip(prefix_pos, 0, S - 1), (B, m)), axis=1).all(-1)
    prefix_ok = prefix_ok & (cur_len >= m)
    match = (win[:, :, :m] == prefix[:, None, :]).all(-1) & win_valid & prefix_ok[:, None]  # (B, W)
    banned = jnp.zeros(logits.shape, bool).at[jnp.arange(B)[:, None], win[:, :, m]].max(match)
    return jnp.where(banned, NEG_INF, logits)


def top_k_filter(logits, k: int):
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


def top_p_filter(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability reaches p (always the top one)."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def greedy(logits):
    """First index of the maximum, like argmax. XLA:CPU's variadic-reduce argmax takes ~3.7 ms on a
    (32, 50257) array and was most of a decode step; max, compare and min take ~1.1 ms."""
    top = logits.max(axis=-1, keepdims=True)
    iota = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    return jnp.min(jnp.where(logits == top, iota, logits.shape[-1]), axis=-1).astype(jnp.int32)


def sample_token(logits, rng, cfg: SamplingConfig):
    """logits (B, V) fp32 (already n-gram-processed) -> (B,) int32."""
    if cfg.temperature == 0.0:
        return greedy(logits)
    logits = logits / cfg.temperature
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Prefill and decode
# ----------------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, P), mask (B, P)) with P = the longest prompt rounded up to a multiple of `bucket`."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: give at least one token (e.g. <|endoftext|>)")
    longest = max(len(p) for p in prompts)
    P = -(-longest // bucket) * bucket
    ids = np.full((len(prompts), P), pad_id, np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = True
    return ids, mask


def positions_from_mask(mask):
    """0 at each row's first real token, counting real tokens only."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
