"""Mesh construction and sharded init on 8 fake CPU devices: same model as unsharded, params split as the rules say."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sharded_init
from jax.sharding import PartitionSpec as P

from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config, sharding


def test_mesh_shape_resolution():
    assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    for bad in [(-1, -1, 1), (3, -1, 1), (2, 2, 1), (0, -1, 1)]:
        with pytest.raises(ValueError, match="mesh shape"):
            sharding.resolve_mesh_shape(bad, 8)
    mesh = sharding.make_mesh((1, -1, 2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_every_param_has_logical_axes():
    cfg = gpt_config.get_config("tiny", scan_layers=True)
    boxed = jax.eval_shape(lambda k: M.GPT(cfg).init(k, jnp.zeros((1, 4), jnp.int32))["params"], jax.random.PRNGKey(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
    assert boxed["h"]["attn"]["c_attn"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
    rule_names = {name for name, _ in sharding.DEFAULT_RULES}
    assert {n for x in leaves for n in x.names if n} <= rule_names


@pytest.mark.parametrize("shape,scan", [pytest.param((2, 2, 2), True, marks=pytest.mark.slow),
                                        pytest.param((1, 8, 1), False, marks=pytest.mark.slow), ((8, 1, 1), False)])
def test_sharded_init_and_forward_match_single_device(shape, scan):
    cfg = gpt_config.get_config("tiny", vocab_size=64, n_positions=16, scan_layers=scan)
    model = M.GPT(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)))
    mesh = sharding.make_mesh(shape)
    params, shardings = sharded_init(model, ids[:1], mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)

    plain = M.init_params(model, jax.random.PRNGKey(0))
    chex.assert_trees_all_close(params, plain)
    np.testing.assert_allclose(logits, model.apply({"params": plain}, ids), atol=1e-5)
    c_fc = params["h"]["mlp"]["c_fc"]["kernel"] if scan else params["h_0"]["mlp"]["c_fc"]["kernel"]
    want = P(None, "fsdp", "tensor") if scan else P("fsdp", "tensor")
    assert c_fc.sharding.spec == want
    if shape == (1, 8, 1):  # FSDP: each device holds 1/8 of the embedding table
        wte = params["wte"]["embedding"]
        assert wte.addressable_shards[0].data.shape == (64, cfg.d_model // 8)


def test_uneven_dimensions_are_replicated_not_rejected():
    # GPT-2's 50,257-token vocabulary cannot be split over a tensor axis of 2: that dim is replicated.
    mesh = sharding.make_mesh((2, 2, 2))
    sh = sharding.fit_sharding((50257, 64), jax.sharding.NamedSharding(mesh, P("tensor", "fsdp")))
    assert sh.spec == P(None, "fsdp")
    sh = sharding.fit_sharding((6, 4), jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)))
    assert sh.spec == P("data", None)  # 6 splits 2 ways, not 4
    even = jax.sharding.NamedSharding(mesh, P("tensor", "fsdp"))
    assert sharding.fit_sharding((28896, 64), even) is even
