"""LM losses: the chunked tied-head loss equals the full-logits loss, in value and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomedlm_jax.training import losses


def _problem(B=2, T=12, C=16, V=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(k[0], (B, T, C))
    emb = jax.random.normal(k[1], (V, C)) * 0.3
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)  # some positions ignored
    return hidden, emb, targets, weights


def _head(emb):
    return lambda h: jnp.einsum("btc,vc->btv", h, emb)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 20])  # 5: a shorter last piece; 20 > T
@pytest.mark.parametrize("with_weights", [True, False])
def test_chunked_loss_matches_full_logits(chunk, with_weights):
    hidden, emb, targets, weights = _problem()
    w = weights if with_weights else None

    def full(h, e):
        return losses.token_nll_sum(_head(e)(h), targets, w)

    def chunked(h, e):
        return losses.chunked_token_nll_sum(h, _head(e), targets, w, chunk)

    (l_full, n_full), (l_chunk, n_chunk) = full(hidden, emb), chunked(hidden, emb)
    np.testing.assert_allclose(l_chunk, l_full, rtol=1e-5)
    assert float(n_chunk) == float(n_full) == (float(weights.sum()) if with_weights else 24.0)
    g_full = jax.grad(lambda h, e: full(h, e)[0], argnums=(0, 1))(hidden, emb)
    g_chunk = jax.grad(lambda h, e: chunked(h, e)[0], argnums=(0, 1))(hidden, emb)
    for a, b in zip(g_chunk, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_the_full_logits():
    """The largest array in the backward pass is one chunk's logits, not (B, T, V)."""
    hidden, emb, targets, weights = _problem(T=16, V=500)
    grad = jax.grad(lambda h, e: losses.chunked_token_nll_sum(h, _head(e), targets, weights, 4)[0], argnums=(0, 1))

    def walk(jaxpr, out):
        for eqn in jaxpr.eqns:
            out += [v.aval.shape for v in eqn.outvars]
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub, out)
        return out

    shapes = walk(jax.make_jaxpr(grad)(hidden, emb).jaxpr, [])
    assert (2, 4, 500) in shapes and (2, 16, 500) not in shapes


def test_chunk_size_must_be_positive():
    hidden, emb, targets, _ = _problem(T=12)
    with pytest.raises(ValueError, match="must be positive, got 0"):
        losses.chunked_token_nll_sum(hidden, _head(emb), targets, None, 0)
