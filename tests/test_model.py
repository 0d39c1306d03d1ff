"""The Flax GPT: shapes/dtypes/sizes of every variant, causality, masks, scan/remat, dropout, sharding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config


def expected_param_count(V, P, C, L, F=None):
    """Independent count of GPT-2 parameters (tied head): embeddings + L blocks + final LN."""
    F = F or 4 * C
    per_block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    return V * C + P * C + L * per_block + 2 * C


def abstract_params(cfg):
    return jax.eval_shape(lambda: M.init_params(M.GPT(cfg), jax.random.PRNGKey(0)))


@pytest.mark.parametrize(
    "variant,published",
    [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168), ("biomedlm-2.7b", None), ("tiny", None)],
)
def test_variant_param_counts(variant, published):
    cfg = gpt_config.get_config(variant)
    count = sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))  # eval_shape: nothing is allocated, even for 2.7B
    assert count == expected_param_count(cfg.vocab_size, cfg.n_positions, cfg.d_model, cfg.n_layer)
    if published is not None:  # HF's gpt2 / gpt2-medium parameter counts
        assert count == published
    if variant == "biomedlm-2.7b":
        # BioMedLM's HF checkpoint holds 2,594,247,680 parameters; "2.7B" is the model's nominal name.
        assert count == 2_594_247_680
        assert abs(count - 2.7e9) / 2.7e9 < 0.05


@pytest.mark.parametrize("variant", sorted(gpt_config.VARIANTS))
def test_variant_shapes_and_dtypes(variant):
    cfg = gpt_config.get_config(variant, dtype="bfloat16", param_dtype="float32")
    params = abstract_params(cfg)
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: jnp.zeros((), jnp.float32), params))
    C, H = cfg.d_model, cfg.n_head
    chex.assert_shape(params["wte"]["embedding"], (cfg.vocab_size, C))
    chex.assert_shape(params["wpe"]["embedding"], (cfg.n_positions, C))
    chex.assert_shape(params["h_0"]["attn"]["c_attn"]["kernel"], (C, 3, H, C // H))
    chex.assert_shape(params["h_0"]["mlp"]["c_fc"]["kernel"], (C, 4 * C))
    assert f"h_{cfg.n_layer - 1}" in params and f"h_{cfg.n_layer}" not in params
    out = jax.eval_shape(lambda p: M.GPT(cfg).apply({"params": p}, jnp.zeros((2, 16), jnp.int32)), params)
    assert out.shape == (2, 16, cfg.vocab_size) and out.dtype == jnp.float32


def test_biomedlm_variant_matches_paper():
    cfg = gpt_config.get_config("biomedlm-2.7b")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_positions, cfg.vocab_size) == (32, 2560, 20, 1024, 28896)
    assert cfg.activation == "gelu_new" and cfg.eos_token_id == 28895


@pytest.fixture(scope="module")
def tiny():
    cfg = gpt_config.get_config("tiny", vocab_size=97, n_positions=32, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(0))


@pytest.mark.slow
def test_forward_shapes_fp32_and_bf16(tiny):
    model, params = tiny
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 20)))
    logits = model.apply({"params": params}, ids)
    chex.assert_shape(logits, (3, 20, 97))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)

    bf16 = M.GPT(model.config.replace(dtype="bfloat16"))
    hidden = bf16.apply({"params": params}, ids, method=M.GPT.hidden_states)
    chex.assert_type(hidden, jnp.bfloat16)
    logits16 = bf16.apply({"params": params}, ids)
    chex.assert_type(logits16, jnp.float32)  # head accumulates in fp32
    np.testing.assert_allclose(logits16, logits, atol=0.05 * float(jnp.abs(logits).max()))


def test_causality(tiny):
    """Changing token t changes no logit before t."""
    model, params = tiny
    ids = np.random.default_rng(1).integers(0, 97, (2, 24))
    changed = ids.copy()
    changed[:, 15] = (changed[:, 15] + 1) % 97
    a = model.apply({"params": params}, jnp.asarray(ids))
    b = model.apply({"params": params}, jnp.asarray(changed))
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert not np.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.slow
def test_padding_masks(tiny):
    """Right padding: real positions unaffected. Left padding + shifted positions == unpadded run."""
    model, params = tiny
    ids = np.random.default_rng(2).integers(0, 97, (1, 10))
    ref = model.apply({"params": params}, jnp.asarray(ids))

    right = np.concatenate([ids, np.full((1, 6), 5)], axis=1)
    mask = np.concatenate([np.ones((1, 10)), np.zeros((1, 6))], axis=1)
    out = model.apply({"params": params}, jnp.asarray(right), attention_mask=jnp.asarray(mask))
    np.testing.assert_allclose(out[:, :10], ref, atol=1e-5)

    left = np.concatenate([np.full((1, 6), 5), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 6)), np.ones((1, 10))], axis=1)
    pos = np.concatenate([np.zeros((1, 6)), np.arange(10)[None]], axis=1).astype(np.int32)
    out = model.apply({"params": params}, jnp.asarray(left), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(pos))
    np.testing.assert_allclose(out[:, 6:], ref, atol=1e-5)


def test_sequence_longer_than_context_is_an_error(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="n_positions"):
        model.apply({"params": params}, jnp.zeros((1, 33), jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_scan_and_remat_match_plain_layers(remat):
    """scan_layers/remat change memory and compile time, never values or gradients."""
    from biomedlm_jax.models.gpt import stack_layers

    base = gpt_config.get_config("tiny", vocab_size=61, n_positions=16, n_layer=3, scale_attn_by_inverse_layer_idx=True,
                        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    plain = M.GPT(base)
    params = M.init_params(plain, jax.random.PRNGKey(3))
    scanned = M.GPT(base.replace(scan_layers=True, remat_policy=remat))
    sparams = stack_layers(params, base.n_layer)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 16)))

    def forward(m):  # compiled: op by op, the gradients of three models took seconds
        return jax.jit(lambda p: m.apply({"params": p}, ids))

    def grad(m):
        return jax.jit(jax.grad(lambda p: jnp.mean(m.apply({"params": p}, ids) ** 2)))

    want = forward(plain)(params)
    np.testing.assert_allclose(want, forward(scanned)(sparams), atol=1e-5)
    looped = M.GPT(base.replace(remat_policy=remat))  # remat without scan: same params layout
    np.testing.assert_allclose(want, forward(looped)(params), atol=1e-5)
    g_plain = grad(plain)(params)
    chex.assert_trees_all_close(g_plain, grad(looped)(params), atol=1e-5)
    chex.assert_trees_all_close(stack_layers(g_plain, base.n_layer), grad(scanned)(sparams), atol=1e-5)


def test_dropout_active_only_in_training():
    cfg = gpt_config.get_config("tiny", vocab_size=61, n_positions=16, attn_pdrop=0.3, resid_pdrop=0.1, embd_pdrop=0.1)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 16), jnp.int32)
    a = model.apply({"params": params}, ids)
    np.testing.assert_array_equal(a, model.apply({"params": params}, ids))  # eval: deterministic
    t1 = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    t2 = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(t1, a) and not np.allclose(t1, t2)


@pytest.mark.slow
def test_dropout_attention_path_matches_fused_attention():
    """The explicit attention used when attn dropout is on is the same math as jax.nn.dot_product_attention."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (2, 9, 3, 8)) for key in (k1, k2, k3))
    mask = jnp.asarray(np.array([[1] * 9, [0, 0] + [1] * 7], bool))[:, None, None, :]
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.35, is_causal=True)
    out = M._attention_with_dropout(q, k, v, mask, 0.35, jax.random.PRNGKey(1), rate=1e-12)
    np.testing.assert_allclose(out[:, 2:], ref[:, 2:], atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model variant"):
        gpt_config.get_config("gpt5")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        gpt_config.get_config("tiny", n_layers=3)
    with pytest.raises(ValueError, match="activation"):
        gpt_config.get_config("tiny", activation="mish")
    with pytest.raises(ValueError, match="divisible"):
        gpt_config.get_config("tiny", n_head=5)
    with pytest.raises(ValueError, match="attention_impl"):
        gpt_config.get_config("tiny", attention_impl="flash")


def test_forward_compiles_once(tiny):
    model, params = tiny

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(p, ids):
        return model.apply({"params": p}, ids)

    for seed in range(3):
        forward(params, jnp.asarray(np.random.default_rng(seed).integers(0, 97, (2, 8))))


def test_cudnn_attention_needs_half_precision():
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        gpt_config.get_config("tiny", attention_impl="cudnn")
    gpt_config.get_config("tiny", attention_impl="cudnn", dtype="bfloat16")
