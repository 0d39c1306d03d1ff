"""Language-model losses, always in fp32 (logits may arrive in bf16 from a bf16 model)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax


def token_nll_sum(logits, targets, weights: Optional[jnp.ndarray] = None):
    """(sum of weighted cross-entropy, sum of weights) for targets already aligned with logits.

    logits: (B, T, V); targets: (B, T) int; weights: optional (B, T) float (0 = ignore). Returning the
    sum and the count (not the mean) lets gradient accumulation and data parallelism divide once by
    the global token count, so k micro-batches give exactly the big batch's mean loss.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    weights = jnp.ones(nll.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    return (nll * weights).sum(), weights.sum()


def chunked_token_nll_sum(hidden, head: Callable, targets, weights: Optional[jnp.ndarray] = None, chunk: int = 256):
    """`token_nll_sum(head(hidden), ...)` without holding the (B, T, V) logits.

    hidden: (B, T, C) final features; head: (B, t, C) -> (B, t, V) logits (the tied LM head). The
    sequence is cut into pieces of `chunk` positions (the last one shorter when chunk does not divide
    T) and scanned; each piece's logits are rematerialised in the backward pass (jax.checkpoint), so
    the loss holds (B, chunk, V) logits at a time instead of (B, T, V) twice (fp32 logits and their
    gradient). Same value and gradients as the full loss up to summation order.
    """
    if chunk <= 0:
        raise ValueError(f"loss chunk size must be positive, got {chunk}")
    B, T, _ = hidden.shape
    weights = jnp.ones((B, T), jnp.float32) if weights is None else weights.astype(jnp.float32)

    @jax.checkpoint
    def piece_nll(h, t, w):
        return token_nll_sum(head(h), t, w)[0]

    n, rest = divmod(T, chunk)
    total = jnp.zeros([], jnp.float32)
    if n:
        def pieces(x):  # (B, n * chunk, ...) -> (n, B, chunk, ...)
            return jnp.moveaxis(x[:, : n * chunk].reshape(B, n, chunk, *x.shape[2:]), 1, 0)

        def body(acc, xs):
            return acc + piece_nll(*xs), None

        total, _ = jax.lax.scan(body, total, (pieces(hidden), pieces(targets), pieces(weights)))
    if rest:
        total = total + piece_nll(hidden[:, n * chunk :], targets[:, n * chunk :], weights[:, n * chunk :])
    return total, weights.sum()


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), with the NLL clamped at 50 so a diverged run reports a huge number, not inf/overflow."""
    return math.exp(min(float(mean_nll), 50.0))
