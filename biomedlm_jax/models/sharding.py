"""Device mesh and logical-axis sharding (the pjit way, through jax.jit + NamedSharding).

The model names every parameter and activation axis (see models/gpt.py); `DEFAULT_RULES` maps those names
to the mesh axes ("data", "fsdp", "tensor"):

  * data:   pure data parallelism (params replicated);
  * fsdp:   batch split *and* params/optimizer state split along `embed` (ZeRO-3 style);
  * tensor: Megatron-style tensor parallelism over heads, MLP width and vocab.

Parameter names and activation names are distinct, so no rule set built this way maps one mesh axis
twice in a spec (which Flax would silently drop). Training configs may override the rules.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("positions", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """Replace one -1 in `shape` by whatever makes the product equal `n_devices`."""
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape) or n_devices % known:
        raise ValueError(f"mesh shape {tuple(shape)} does not fit {n_devices} devices")
    if -1 in shape:
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh shape {tuple(shape)} uses {math.prod(shape)} devices, but {n_devices} are available")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), axis_names: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A Mesh over all (global) devices; `shape` may contain one -1 ("the rest")."""
    devices = jax.devices() if devices is None else devices
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} and axis names {tuple(axis_names)} differ in length")
    resolved = resolve_mesh_shape(shape, len(devices))
    return Mesh(mesh_utils.create_device_mesh(resolved, devices), tuple(axis_names))


def fit_sharding(shape: Sequence[int], sharding: NamedSharding) -> NamedSharding:
    """`sharding` with the mesh axes dropped from any dimension they do not divide evenly.

    jit refuses uneven shardings, and e.g. GPT-2's vocabulary (50,257, prime-ish) cannot be split over
    a tensor axis of 2; that dimension is then replicated instead (BioMedLM's 28,896 splits up to 32 ways).
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    changed = False
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept = list(names)
        while kept and shape[dim] % math.prod(sharding.mesh.shape[a] for a in kept):
            kept.pop()  # drop the innermost axis first
        if len(kept) != len(names):
            spec[dim] = (kept[0] if len(kept) == 1 else tuple(kept)) if kept else None
            changed = True
    return NamedSharding(sharding.mesh, PartitionSpec(*spec)) if changed else sharding


def values(boxed):
    """The arrays inside flax's LogicallyPartitioned boxes, without applying their sharding constraints
    (`nn.unbox` applies them, which fails on abstract values inside a mesh context)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)


def fit_shardings(abstract, shardings):
    """`fit_sharding` over a pytree of abstract arrays (anything with .shape) and their shardings."""
    return jax.tree.map(lambda a, s: fit_sharding(a.shape, s), abstract, shardings)


def parse_mesh_shape(text: str) -> tuple[int, ...]:
    """'1,-1,1' (or '1 -1 1', as a harness model_args string has it) -> (1, -1, 1)."""
    try:
        return tuple(int(x) for x in str(text).replace(",", " ").split())
    except ValueError:
        raise ValueError(f"mesh shape {text!r}: expected integers for (data, fsdp, tensor), e.g. 1,-1,1") from None


def place_params(model, params, mesh: Mesh, rules=DEFAULT_RULES):
    """`params` of a Flax GPT on `mesh`, sharded by the model's logical axis names and `rules` (the
    trainer's); dimensions an axis does not divide are replicated (`fit_sharding`). Returns (placed
    params, their shardings)."""
    import jax.numpy as jnp

    ids = jnp.ones((1, 8), jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    shardings = fit_shardings(values(boxed), shardings)
    return jax.device_put(params, shardings), shardings
