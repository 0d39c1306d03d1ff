"""The sharded train state: its shapes and shardings, batch placement, and a fresh state.

The state is a plain dict {"step", "params", "opt_state", "rng"} that orbax saves as-is. Its abstract
shape and NamedShardings come from the model's logical axis names and the config's rules
(`state_shardings`, nothing allocated); `initial_state` then creates it directly in sharded memory,
with `init_from`'s weights (and a fine-tuned head, and PEFT adapters) put in place. Batches are
global arrays assembled from each process's own rows (`process_batch_rows`, `to_global`).

`LoraPlan` is everything a LoRA run changes in the trainer (models/lora.py has the adapter math): which
params train, the frozen weights' dtype, and checkpoints that hold only the trainable params and a
reference to the frozen base, which resume reads back from there.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from biomedlm_jax.core import errors
from biomedlm_jax.formats import checkpoint, hf, sources
from biomedlm_jax.models import gpt, lora, sharding
from biomedlm_jax.models.gpt_config import GPTConfig

# ----------------------------------------------------------------------------------------------------
# LoRA: what trains, what is stored
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoraPlan:
    """A LoRA run's changes to the trainer. With `cfg.lora_rank` 0 it is inactive: every parameter
    trains and each method is the identity.

    base_vocab: the vocabulary before the task added tokens, when it grew (only the added `wte` rows
    train). base_dtype: the frozen weights' storage dtype (None: the param dtype). base: the frozen
    base's reference (`checkpoint.base_reference`) when the run starts from a checkpoint; its steps
    then store only the trainable params. mask: {path: trainable?}, set by `bind`.
    """

    cfg: GPTConfig
    backbone: Optional[str] = None
    base_vocab: Optional[int] = None
    base_dtype: Optional[str] = None
    base: Optional[dict] = None
    mask: Optional[dict] = None

    @classmethod
    def for_run(cls, config, cfg: GPTConfig, base_cfg: GPTConfig, task) -> "LoraPlan":
        """The plan of a training config: `cfg` the model trained, `base_cfg` the architecture its
        `init_from` weights have (a smaller vocabulary when the task added tokens)."""
        if not cfg.lora_rank:
            return cls(cfg)
        base_dtype = config.lora.get("base_dtype") or None
        base = checkpoint.base_reference(config.init_from, base_cfg.vocab_size)
        if base:
            base["dtype"] = base_dtype or cfg.param_dtype
        grew = cfg.vocab_size > base_cfg.vocab_size
        return cls(cfg, task.backbone, base_cfg.vocab_size if grew else None, base_dtype, base)

    @property
    def active(self) -> bool:
        return bool(self.cfg.lora_rank)

    def trainable(self, params) -> Optional[dict]:
        """{path: trainable?} over `params` (a LoRA run), or None (everything trains)."""
        return lora.trainable_mask(params, self.cfg, self.backbone, self.base_vocab) if self.active else None

    def bind(self, abstract_params) -> "LoraPlan":
        return dataclasses.replace(self, mask=self.trainable(abstract_params))

    def split(self, params) -> tuple[dict, dict]:
        """(trainable, frozen); (params, {}) when inactive."""
        return lora.split(params, self.mask) if self.mask else (params, {})

    def join(self, trainable: dict, frozen: dict) -> dict:
        return lora.join(trainable, frozen) if self.mask else trainable

    def mask_rows(self, grads: dict) -> dict:
        """`grads` (or updates) with the base vocabulary's `wte` rows zeroed when the vocabulary grew."""
        if not self.mask or self.base_vocab is None:
            return grads
        return lora.row_mask_grads(grads, self.backbone, self.base_vocab)

    def stored(self, tree: dict) -> dict:
        """The part of a params tree (or its abstract/shardings) that checkpoints hold."""
        return self.split(tree)[0] if self.base else tree

    def counts(self, params) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        total = int(sum(x.size for x in jax.tree.leaves(params)))
        return (lora.count(params, self.mask)[0] if self.mask else total), total

    def describe(self, trainable: int) -> str:
        if not self.mask:
            return ""
        return f" (LoRA rank {self.cfg.lora_rank} on {','.join(self.cfg.lora_targets)}: {trainable:,} trainable)"

    def restore_frozen(self, state: dict, meta: dict, abstract_params, where: str) -> dict:
        """`state` (restored with only the trainable params) with the frozen ones read from the base,
        which must be the one the run started on."""
        if not self.base:
            return state
        ref = meta.get("lora_base") or {}
        if ref.get("init_from") != self.base["init_from"] or ref.get("sha256") != self.base["sha256"]:
            raise errors.CheckpointError(
                f"{where}: this LoRA run was trained on the base {ref.get('init_from')} (sha256 "
                f"{str(ref.get('sha256'))[:16]}...), but init_from is now {self.base['init_from']} (sha256 "
                f"{self.base['sha256'][:16]}...); its adapters only mean something on their own base")
        # self.base was hashed at this run's start, so the base is checked already
        frozen = checkpoint.frozen_params(ref, self.cfg, self.split(abstract_params)[1], self.backbone, where, check=False)
        return dict(state, params=self.join(state["params"], frozen))


# ----------------------------------------------------------------------------------------------------
# Shapes and shardings
# ----------------------------------------------------------------------------------------------------


def param_shardings(model, mesh, rules, example_inputs) -> tuple[dict, dict]:
    """(abstract params, NamedShardings) of `model` from its logical axis names, without allocating.
    example_inputs: the model's init arguments, or an int seq_len for a GPT taking (1, seq_len) ids."""
    if isinstance(example_inputs, int):
        example_inputs = (jnp.ones((1, example_inputs), jnp.int32),)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example_inputs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda *xs: model.init(jax.random.PRNGKey(0), *xs)["params"], *shapes)
    params = sharding.values(boxed)
    return params, sharding.fit_shardings(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))


def state_shardings(model, tx, mesh, rules, example_inputs, plan: Optional[LoraPlan] = None):
    """(abstract state, NamedShardings) of {"step", "params", "opt_state", "rng"} without allocating.

    With a LoRA `plan`, the optimizer state covers only the trainable params, and the frozen ones are
    stored in `plan.base_dtype` when given."""
    params, param_sh = param_shardings(model, mesh, rules, example_inputs)
    plan = (plan or LoraPlan(model.config)).bind(params)
    if plan.mask and plan.base_dtype:
        trainable, frozen = plan.split(params)
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(plan.base_dtype)), frozen)
        params = plan.join(trainable, frozen)
    opt_params, opt_param_sh = plan.split(params)[0], plan.split(param_sh)[0]
    opt_state = jax.eval_shape(tx.init, opt_params)
    replicated = NamedSharding(mesh, P())
    # Moments mirror the params' shardings; counters and other scalars are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, opt_param_sh, transform_non_params=lambda _: replicated)
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    shardings = {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


def batch_sharding(mesh, rules) -> NamedSharding:
    """Batch fields are (grad_accum, micro_batch, ...): the micro-batch axis is split over the batch mesh
    axes, trailing axes (tokens, options) are not split."""
    (batch_axes,) = nn.logical_to_mesh_axes(("activation_batch",), rules)
    return NamedSharding(mesh, P(None, batch_axes))


def batch_shards(mesh, rules) -> int:
    """How many ways the micro-batch axis splits: the product of the mesh axes the batch maps to."""
    (batch_axes,) = nn.logical_to_mesh_axes(("activation_batch",), rules)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def abstract_batch(task, grad_accum: int, micro: int, sharding: NamedSharding) -> dict:
    """A train batch as shapes only: the task's fields (`Task.batch_fields`), each (grad_accum, micro,
    *per-example shape), in `sharding`."""
    return {n: jax.ShapeDtypeStruct((grad_accum, micro, *shape), dt, sharding=sharding)
            for n, (shape, dt) in task.batch_fields().items()}


def process_batch_rows(sharding: NamedSharding, shape: tuple) -> tuple[int, int]:
    """The contiguous range of dim-1 rows that this process's devices hold in a batch of `shape`."""
    spans = sorted({(idx[1].start or 0, shape[1] if idx[1].stop is None else idx[1].stop)
                    for idx in sharding.addressable_devices_indices_map(shape).values()})
    start, stop = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"this process's batch rows {spans} are not contiguous; reorder the mesh devices")
        stop = max(stop, b)
    return start, stop


def to_global(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Process-local numpy batch -> global jax arrays laid out by `sharding`."""
    out = {}
    for k, v in local.items():
        shape = (v.shape[0], global_rows) + v.shape[2:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


# ----------------------------------------------------------------------------------------------------
# A fresh state
# ----------------------------------------------------------------------------------------------------


def put_params(params_np, shardings):
    """Host (numpy) params -> global arrays with `shardings` (each process supplies the same values)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx])), params_np, shardings
    )


def put_leaves(params: dict, new: dict, shardings: dict, abstract: dict) -> dict:
    """`params` with the host arrays of `new` ({flattened path: array}) put in their places, in the
    abstract dtype and with the param's sharding."""
    flat = flax.traverse_util.flatten_dict(params)
    sh, ab = flax.traverse_util.flatten_dict(shardings), flax.traverse_util.flatten_dict(abstract)
    for k, v in new.items():
        flat[k] = put_params(np.asarray(v).astype(ab[k].dtype), sh[k])
    return flax.traverse_util.unflatten_dict(flat)


def overlay(params: dict, loaded: dict, shardings: dict, abstract: dict, source: str) -> dict:
    """`params` with every array of `loaded` (host numpy) put in its place, in the abstract dtype.
    Only LoRA adapters may be missing from `loaded`; anything else missing, or extra, is an error."""
    flat, new = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(loaded)
    extra = sorted("/".join(k) for k in set(new) - set(flat))
    missing = sorted("/".join(k) for k in set(flat) - set(new) if k[-1] not in lora.ADAPTERS)
    if extra or missing:
        raise errors.CheckpointError(f"{source}: params {(extra or missing)[:3]} {'not in the model' if extra else 'missing'}")
    return put_leaves(params, new, shardings, abstract)


def load_init_from(src: sources.Source, base_cfg: GPTConfig) -> dict:
    """The GPT params (numpy) of `init_from`, in `base_cfg`'s layout and param dtype."""
    if src.kind == "hf":
        return hf.load_params_numpy(src.path, base_cfg, dtype=np.dtype(jnp.dtype(base_cfg.param_dtype)))
    stored = GPTConfig(**checkpoint.read_meta(src.path)[1]["model"])
    _, loaded = checkpoint.load_model(src.path, **{k: getattr(base_cfg, k) for k in ("scan_layers", "param_dtype")
                                                   if getattr(base_cfg, k) != getattr(stored, k)})
    return jax.device_get(loaded)


def initial_state(config, model, base_cfg: GPTConfig, tx, abstract, shardings, task,
                  plan: Optional[LoraPlan] = None) -> tuple[dict, str]:
    """(state, where its params came from): random init into sharded memory; with `init_from`, the
    backbone's params are then replaced by the checkpoint's (a task head and LoRA adapters keep their
    init, unless init_from has that head or `lora.from_peft` names adapters). With a LoRA `plan`, the
    optimizer state covers only the trainable params."""
    plan = plan or LoraPlan(model.config)
    if plan.active and plan.mask is None:
        plan = plan.bind(abstract["params"])
    rng = jax.random.PRNGKey(config.seed)
    init_key, rng = jax.random.split(rng)
    inputs = task.example_inputs()
    params = jax.jit(lambda k: nn.unbox(model.init(k, *inputs)["params"]), out_shardings=shardings["params"])(init_key)
    src = sources.parse_optional(config.init_from)
    where = "random init"
    if src is not None:
        loaded = task.adapt_backbone(load_init_from(src, base_cfg), model.config)
        where = f"initialised from {'HF' if src.kind == 'hf' else 'orbax'} checkpoint {src.path}"
        b = task.backbone
        if b is None:
            params = overlay(params, loaded, shardings["params"], abstract["params"], src.path)
        else:
            params = dict(params, **{b: overlay(params[b], loaded, shardings["params"][b], abstract["params"][b], src.path)})
            for name, head in (task.initial_head(src, base_cfg) or {}).items():  # a classifier keeps its head
                params = dict(params, **{name: put_params(head, shardings["params"][name])})
                where += f" (with its {name} head)"
    from_peft = config.get("lora", {}).get("from_peft")
    if from_peft:  # the adapters start from an existing PEFT LoRA adapter instead of A random, B zero
        if not model.config.lora_rank:
            raise ValueError("lora.from_peft is set but lora.rank is 0")
        adapters = lora.read_peft(from_peft, model.config)
        if model.config.scan_layers:
            adapters = flax.traverse_util.flatten_dict(gpt.stack_layers(flax.traverse_util.unflatten_dict(adapters),
                                                                       model.config.n_layer))
        if task.backbone is not None:
            adapters = {(task.backbone,) + k: v for k, v in adapters.items()}
        params = put_leaves(params, adapters, shardings["params"], abstract["params"])
        where += f", LoRA adapters from PEFT {from_peft}"
    # frozen LoRA base weights in lora.base_dtype (a no-op cast for everything else)
    params = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract["params"]),
                     out_shardings=shardings["params"], donate_argnums=0)(params)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(plan.split(params)[0])
    state = {
        "step": put_params(np.zeros([], np.int32), shardings["step"]),
        "params": params,
        "opt_state": opt_state,
        "rng": put_params(np.asarray(rng), shardings["rng"]),
    }
    return state, where

