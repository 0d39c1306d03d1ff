"""Language-model losses, always in fp32 (logits may arrive in bf16 from a bf16 model)."""
from __future__ import annotations

from typing import Optional

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
