"""Pretraining: `train_and_evaluate(config, workdir)`, read top to bottom.

  setup -> model config -> tokenizer + data -> optimizer -> sharded state (init, init_from, or resume)
  -> jitted train/eval steps -> loop (metrics, eval, checkpoints, preemption) -> final checkpoint.

The train state is a plain dict {"step", "params", "opt_state", "rng"} that orbax saves as-is; the data
iterator position goes into the checkpoint's JSON `meta` item beside it. A workdir that holds a
checkpoint is always resumed from its latest complete step, and the resumed run is bit-identical to an
uninterrupted one (same batches, same dropout keys: both are functions of the step).

Parallelism is the jit way: params and optimizer state live in NamedShardings derived from the
model's logical axis names and the config's rules; the step is `jax.jit` with in/out shardings and a
donated state; the batch is a global array assembled from each process's own rows.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from biomedlm_jax import checkpoint, configlib, hf, input_pipeline, lora, losses, metrics, optim, paths, sharding
from biomedlm_jax import tokenizer as tokenizer_lib
from biomedlm_jax.model import GPT, GPTConfig

# Incremented each time the train step's Python body is traced; the summary reports it so tests can
# check that the step compiles once for a whole run.
_TRAIN_STEP_TRACES = 0


# ----------------------------------------------------------------------------------------------------
# Pieces (each used by train_and_evaluate; importable for fine-tuning entry points and tests)
# ----------------------------------------------------------------------------------------------------


class LMTask:
    """Next-token prediction on token rows: pretraining, and seq2seq with per-target loss weights.

    A task tells the shared trainer what differs between objectives: the model (`model`, with
    `backbone` naming the GPT params inside it, None when the model *is* the GPT), the init inputs,
    the data, the loss, the eval sums and how to summarise them. `mcqa.MCQATask` is the other one.
    """

    backbone = None
    best_metric = None  # eval metric to keep a best checkpoint by (None: no best checkpoint)

    def __init__(self, config):
        self.config = config

    def prepare(self, tok, cfg: GPTConfig):
        """(tokenizer, model config) after task-specific changes: MCQA and BioMedLM's seq2seq layout add
        tokens, and the vocabulary grows to hold them. Documents need none."""
        return tok, cfg

    def model(self, cfg: GPTConfig):
        return GPT(cfg)

    def example_inputs(self):
        return (jnp.ones((1, self.config.seq_len), jnp.int32),)

    def tokens_per_example(self) -> int:
        return self.config.seq_len

    def load_data(self, tok):
        return input_pipeline.load_train_eval(self.config.data, self.config.seq_len, tok)

    def eval_batches(self, eval_data, micro, local_rows):
        return input_pipeline.eval_batches(eval_data.rows, micro, local_rows, self.config.eval_batches,
                                           getattr(eval_data, "weights", None), getattr(eval_data, "segments", None),
                                           getattr(eval_data, "positions", None))

    def loss(self, model, params, mb, rng, deterministic: bool):
        """(weighted NLL sum, weight sum) of one micro-batch; fields (b, T): inputs, targets, optional
        weights/positions/segment_ids. With `loss_chunk_size`, logits are built a chunk at a time."""
        kw = dict(position_ids=mb.get("positions"), segment_ids=mb.get("segment_ids"), deterministic=deterministic,
                  rngs={"dropout": rng})
        chunk = self.config.loss_chunk_size if self.config is not None else 0
        if not chunk:
            logits = model.apply({"params": params}, mb["inputs"], **kw)
            return losses.token_nll_sum(logits, mb["targets"], mb.get("weights"))
        hidden = model.apply({"params": params}, mb["inputs"], method=GPT.hidden_states, **kw)

        def head(h):
            return model.apply({"params": params}, h, method=GPT.logits)

        return losses.chunked_token_nll_sum(hidden, head, mb["targets"], mb.get("weights"), chunk)

    def eval_sums(self, model, params, b) -> dict:
        mb = {k: v[0] for k, v in b.items()}  # eval batches carry one micro-batch
        loss_sum, count = self.loss(model, params, mb, jax.random.PRNGKey(0), True)
        return {"loss_sum": loss_sum, "count": count}

    def summarize(self, sums: dict) -> dict:
        loss = sums["loss_sum"] / sums["count"]
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "tokens": sums["count"]}

    def adapt_backbone(self, params_np, cfg: GPTConfig):
        """Loaded GPT params -> the backbone this task's model holds (grown for added tokens)."""
        from biomedlm_jax.model import resize_embeddings

        return resize_embeddings(params_np, cfg.vocab_size)


# data.task -> the task class. The task modules register theirs when imported (mcqa.py, seq2seq.py), so
# this module imports none of them; entry points may also pass their task to train_and_evaluate.
TASKS: dict[str, Callable] = {"lm": LMTask}
_TASK_MODULES = {"mcqa": "biomedlm_jax.mcqa", "seq2seq": "biomedlm_jax.seq2seq"}


def register_task(name: str, factory: Callable) -> None:
    TASKS[name] = factory


def task_for(config):
    name = config.data.get("task", "lm")
    if name not in TASKS:
        hint = f"import {_TASK_MODULES[name]} first, or " if name in _TASK_MODULES else ""
        raise ValueError(f"data.task={name!r} has no registered task ({sorted(TASKS)}); {hint}pass "
                         "train_and_evaluate(..., task=...)")
    return TASKS[name](config)


def parse_init_from(spec: str) -> tuple[str, str]:
    """"hf:DIR" / "orbax:WORKDIR" -> (kind, path); "" -> ("", "")."""
    if not spec:
        return "", ""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("hf", "orbax") or not path:
        raise ValueError(f"init_from={spec!r}: expected hf:DIR or orbax:WORKDIR")
    return kind, path


def model_config(config) -> GPTConfig:
    """The run's GPTConfig: the variant (or init_from's checkpoint) with `config.model` overrides."""
    kind, path = parse_init_from(config.init_from)
    if kind == "hf":
        cfg = configlib.resolve_model(config.model, hf.load_config(path), path)
    elif kind == "orbax":
        _, meta = checkpoint.read_meta(path)
        cfg = configlib.resolve_model(config.model, GPTConfig(**meta["model"]), path)
    else:
        cfg = configlib.resolve_model(config.model)
    return with_lora(cfg, config)


def with_lora(cfg: GPTConfig, config) -> GPTConfig:
    """`cfg` with the run's `config.lora` adapters (none when the config has no lora section)."""
    lo = config.get("lora")
    if lo is None:
        return cfg
    targets = tuple(t.strip() for t in str(lo.targets).split(",") if t.strip())
    return cfg.replace(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
                       lora_targets=targets)


def trainable_mask(cfg: GPTConfig, task, base_vocab: Optional[int] = None):
    """A function params -> {path: trainable?} for a LoRA run (see lora.py), or None (all train)."""
    if not cfg.lora_rank:
        return None
    return lambda params: lora.trainable_mask(params, cfg, task.backbone if task else None, base_vocab)


def load_run_tokenizer(config, workdir: str):
    """The prepared corpus's tokenizer (`data.prepared_dir`), else `data.tokenizer`, else the tokenizer
    stored with init_from's checkpoint, else the workdir's (a resumed run)."""
    if config.data.get("prepared_dir"):
        return tokenizer_lib.load_tokenizer(paths.join(config.data.prepared_dir, "tokenizer"))
    if config.data.get("tokenizer"):
        return tokenizer_lib.load_tokenizer(config.data.tokenizer)
    kind, path = parse_init_from(config.init_from)
    candidates = [path if kind == "hf" else checkpoint.tokenizer_dir(path)] if kind else []
    candidates.append(checkpoint.tokenizer_dir(workdir))
    for c in candidates:
        tok = tokenizer_lib.find_tokenizer(c)
        if tok is not None:
            return tok
    raise ValueError("no tokenizer: set --config.data.tokenizer=DIR (or init_from a checkpoint that has one)")


def warmup_steps(config) -> int:
    """`warmup_ratio` of the run (rounded up, as HF's Trainer does) when set, else `warmup_steps`."""
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be within [0, 1], got {config.warmup_ratio}")
    if config.warmup_ratio:
        return math.ceil(config.warmup_ratio * config.num_train_steps)
    return config.warmup_steps


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = optim.lr_schedule(
        config.learning_rate, warmup_steps(config), config.num_train_steps, config.lr_decay, config.lr_final_ratio
    )
    o = config.optimizer
    tx = optim.adamw(
        schedule, config.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        decay_mode=o.decay_mode, grad_clip_norm=o.grad_clip_norm or None, skip_nonfinite=True,
        mu_dtype=o.get("mu_dtype") or None, nu_dtype=o.get("nu_dtype") or None,
    )
    return tx, schedule


def state_shardings(model, tx, mesh, rules, example_inputs, trainable=None, base_dtype=None):
    """(abstract state, NamedShardings) of {"step", "params", "opt_state", "rng"} without allocating.

    example_inputs: the model's init arguments, or an int seq_len for a GPT taking (1, seq_len) ids.
    trainable: params -> {path: bool} (a LoRA run, see `trainable_mask`): the optimizer state covers only
    the trainable params, and the frozen ones are stored in `base_dtype` when given."""
    if isinstance(example_inputs, int):
        example_inputs = (jnp.ones((1, example_inputs), jnp.int32),)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in example_inputs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda *xs: model.init(jax.random.PRNGKey(0), *xs)["params"], *shapes)
    params = sharding.values(boxed)
    param_sh = sharding.fit_shardings(params, nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules))
    mask = trainable(params) if trainable else None
    if mask is not None and base_dtype:
        frozen_dtype = jnp.dtype(base_dtype)
        params = lora.join(*[jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt or x.dtype), part)
                             for part, dt in zip(lora.split(params, mask), (None, frozen_dtype))])
    opt_params, opt_param_sh = (lora.split(params, mask)[0], lora.split(param_sh, mask)[0]) if mask else (params, param_sh)
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


def batch_sharding(mesh, rules) -> NamedSharding:
    """Batch fields are (grad_accum, micro_batch, ...): the micro-batch axis is split over the batch mesh
    axes, trailing axes (tokens, options) are not split."""
    (batch_axes,) = nn.logical_to_mesh_axes(("activation_batch",), rules)
    return NamedSharding(mesh, P(None, batch_axes))


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


def put_params(params_np, shardings):
    """Host (numpy) params -> global arrays with `shardings` (each process supplies the same values)."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x[idx])), params_np, shardings
    )


def make_train_step(model, tx, deterministic: bool, task=None, mask=None, base_vocab=None) -> Callable:
    """(state, batch) -> (state, metrics). LM batch: "inputs"/"targets" (A, b, T) int, optional "weights";
    other tasks' batches are whatever their `loss` reads, each field with leading (A, b).

    Gradients are summed over the A micro-batches (lax.scan) and divided once by the token count, so
    k micro-batches equal one big batch. A non-finite loss poisons the gradients, so the optimizer's
    `apply_if_finite` skips the step (params and moments unchanged) and counts it.

    mask ({path: trainable?}, a LoRA run): gradients and updates only for the trainable params, the
    frozen ones are carried through unchanged; with `base_vocab`, only the added embedding rows train.
    """

    task = task or LMTask(None)

    def micro_loss(trainable, frozen, mb, rng):
        return task.loss(model, lora.join(trainable, frozen) if mask else trainable, mb, rng, deterministic)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        global _TRAIN_STEP_TRACES
        _TRAIN_STEP_TRACES += 1
        params, frozen = lora.split(state["params"], mask) if mask else (state["params"], {})
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        n_micro = jax.tree.leaves(batch)[0].shape[0]

        def body(carry, xs):
            g_acc, l_acc, c_acc = carry
            mb, i = xs
            (l, c), g = grad_fn(params, frozen, mb, jax.random.fold_in(step_rng, i))
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        carry = (zeros, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))
        (grads, loss_sum, count), _ = jax.lax.scan(body, carry, (batch, jnp.arange(n_micro)))
        count = jnp.maximum(count, 1.0)
        loss = loss_sum / count
        grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        if base_vocab is not None:
            grads = lora.row_mask_grads(grads, task.backbone, base_vocab)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        # weight decay must not move a LoRA run's base embedding rows either
        keep_rows = (lambda u: lora.row_mask_grads(u, task.backbone, base_vocab)) if base_vocab is not None else None
        params, opt_state = optim.apply_step(tx, grads, state["opt_state"], params, keep_rows)
        new_state = {
            "step": state["step"] + 1,
            "params": lora.join(params, frozen) if mask else params,
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        consecutive, total = optim.nonfinite_counts(opt_state)
        m = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "nonfinite_consecutive": consecutive,
             "nonfinite_total": total}
        return new_state, m

    return train_step


def make_eval_step(model, task=None) -> Callable:
    """`eval_step(params, batch, acc) -> acc + task.eval_sums(batch)`.

    The running sums go through every step, so the eval batches form one chain on each device, as the
    train steps do. Independent multi-device programs in flight at once can deadlock XLA:CPU, whose
    collectives need one pool thread per participating device (a pool of max(cores, devices) threads).
    """
    task = task or LMTask(None)

    def eval_step(params, batch, acc):
        return jax.tree.map(jnp.add, acc, task.eval_sums(model, params, batch))

    return eval_step


def restore_checkpoint(mngr: ocp.CheckpointManager, workdir: str, step: int, abstract_state):
    """(state, meta) of `step`, placed with the shardings carried by `abstract_state`'s leaves.

    The stored params are checked against the model first, so restoring into a model of another
    shape fails with the tensor's name rather than an orbax shape error."""
    reader = checkpoint._reader(workdir)
    stored = reader.item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    where = f"{paths.join(workdir, checkpoint.CHECKPOINT_DIR)}/{step}/state"
    if not isinstance(stored, dict) or not {"params", "opt_state", "step"} <= set(stored):
        raise hf.CheckpointError(f"{where}: not a training state (has {sorted(stored) if isinstance(stored, dict) else stored})")
    checkpoint._check_against_disk(stored["params"], abstract_state["params"], where)
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]


class Preemption:
    """A preemption notice (SIGTERM) ends the run at a step boundary that every process agrees on.

    One process: a Python SIGTERM handler sets a flag that the loop reads after each step.
    Several processes: `jax.distributed` starts JAX's preemption sync manager, whose own SIGTERM
    handler tells the coordination service; the service picks a step every process will reach, and
    `multihost_utils.reached_preemption_sync_point(step)` is True on all of them at that step. Neither
    path puts a collective or a device sync in the step loop.
    """

    def __init__(self):
        self._flag = False
        self._old = None
        self._multi = jax.process_count() > 1
        # With jax_enable_preemption_service turned off there is no sync manager: fall back to a Python
        # handler on every process and an all-gather of the flags after each step.
        self._sync_manager = self._multi and bool(jax.config.jax_enable_preemption_service)

    def __enter__(self):
        # With the sync manager, a Python handler would replace the one it installed.
        if not self._sync_manager and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def requested(self, step: int) -> bool:
        """Call after every step with the step just completed (the same steps on every process)."""
        if self._sync_manager:
            return multihost_utils.reached_preemption_sync_point(step)
        if self._multi:
            return bool(np.max(multihost_utils.process_allgather(np.int32(self._flag))))
        return self._flag


def _check_config(config, cfg: GPTConfig, mesh) -> None:
    if config.seq_len > cfg.n_positions:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's n_positions={cfg.n_positions}")
    if config.global_batch_size % config.grad_accum_steps:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}"
        )
    micro = config.global_batch_size // config.grad_accum_steps
    (batch_axes,) = nn.logical_to_mesh_axes(("activation_batch",), config.logical_axis_rules)
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if micro % ways:
        raise ValueError(
            f"micro-batch of {micro} sequences (global_batch_size / grad_accum_steps) does not split over "
            f"{ways} batch shards of mesh {dict(mesh.shape)}"
        )
    if config.loss_chunk_size < 0:
        raise ValueError(f"loss_chunk_size must be 0 (off) or positive, got {config.loss_chunk_size}")
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "num_train_steps"):
        if config[key] <= 0:
            raise ValueError(f"{key} must be positive, got {config[key]}")


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, *, devices: Optional[Sequence] = None,
                       hooks: Sequence[Callable[[int, dict], None]] = (), task=None) -> dict:
    """Train (or resume) `config` in `workdir`; returns a summary dict of the run.

    `devices`: the devices of the mesh (default all); `hooks`: called as hook(step, metrics) for every
    step, in order, on every process (e.g. for notebooks). Step metrics are fetched from the device in
    groups (at each log, eval and checkpoint step), so a hook sees step k once that group is fetched.
    `task`: the task object (LMTask, seq2seq.Seq2SeqTask, mcqa.MCQATask; default: `task_for(config)`).
    """
    # --- setup ---------------------------------------------------------------------------------------
    workdir = paths.resolve(workdir)  # a local folder or an object-store URL (gs://bucket/run)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(tuple(config.mesh_shape), devices=devices)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    if jax.process_count() > 1:  # every process must run the same config (issue: silent divergence)
        digest = np.frombuffer(bytes.fromhex(_config_digest(config)), np.uint8)
        multihost_utils.assert_equal(digest, "processes were started with different configs")

    # --- model + tokenizer ---------------------------------------------------------------------------
    task = task if task is not None else task_for(config)
    base_cfg = model_config(config)  # the architecture init_from's weights have
    _check_config(config, base_cfg, mesh)
    tok, cfg = task.prepare(load_run_tokenizer(config, workdir), base_cfg)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is {cfg.vocab_size}")
    model = task.model(cfg)
    seq_len, global_batch, accum = config.seq_len, config.global_batch_size, config.grad_accum_steps
    micro = global_batch // accum

    # --- data ----------------------------------------------------------------------------------------
    train_rows, eval_rows = task.load_data(tok)
    b_sharding = batch_sharding(mesh, rules)
    local_rows = process_batch_rows(b_sharding, (accum, micro, seq_len))
    train_iter = input_pipeline.BatchIterator(
        train_rows.rows, global_batch, seed=config.seed, shuffle=config.data.shuffle, grad_accum=accum,
        local_rows=local_rows, weights=getattr(train_rows, "weights", None),
        segments=getattr(train_rows, "segments", None), positions=getattr(train_rows, "positions", None),
    )

    # --- optimizer + sharded state -------------------------------------------------------------------
    tx, schedule = make_optimizer(config)
    # LoRA: only adapters, the task head and added embedding rows train (lora.py); None = everything
    base_vocab = base_cfg.vocab_size if cfg.lora_rank and cfg.vocab_size > base_cfg.vocab_size else None
    trainable = trainable_mask(cfg, task, base_vocab)
    abstract, shardings = state_shardings(model, tx, mesh, rules, task.example_inputs(), trainable,
                                          config.get("lora", {}).get("base_dtype") or None)
    mask = trainable(abstract["params"]) if trainable else None
    # A LoRA run on a base checkpoint saves only its trainable params, and a reference to the base
    # (lora.base_reference: path, sha256); it reloads the frozen weights from there on resume.
    lora_base = lora.base_reference(config.init_from, base_cfg.vocab_size) if mask else None
    if lora_base:
        lora_base["dtype"] = config.lora.get("base_dtype") or cfg.param_dtype
    ckpt_abstract = dict(abstract, params=lora.split(abstract["params"], mask)[0]) if lora_base else abstract
    mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    latest = mngr.latest_step()
    if latest is None and paths.isdir(paths.join(workdir, checkpoint.QUARANTINE_DIR)):
        raise checkpoint.NoGoodCheckpoint(
            f"{workdir}: every checkpoint was moved aside to {checkpoint.QUARANTINE_DIR}/ because it did not restore; "
            "refusing to start from scratch in this workdir (use a new workdir, or remove that folder to do so)")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if latest is not None:
            # a damaged latest step is moved aside and the next older one restored (checkpoint.restore_newest)
            latest, (state, meta) = checkpoint.restore_newest(
                workdir, lambda s: restore_checkpoint(mngr, workdir, s, ckpt_abstract), steps=mngr.all_steps())
            mngr.reload()
            if lora_base:  # the frozen weights come from the base, which must be the one the run started on
                ref = meta.get("lora_base") or {}
                if ref.get("init_from") != lora_base["init_from"] or ref.get("sha256") != lora_base["sha256"]:
                    raise hf.CheckpointError(
                        f"{workdir}: this LoRA run was trained on the base {ref.get('init_from')} (sha256 "
                        f"{str(ref.get('sha256'))[:16]}...), but init_from is now {lora_base['init_from']} (sha256 "
                        f"{lora_base['sha256'][:16]}...); its adapters only mean something on their own base")
                fresh, _ = _initial_state(config, model, base_cfg, tx, abstract, shardings, task, mask)
                state = dict(state, params=lora.join(state["params"], lora.split(fresh["params"], mask)[1]))
                del fresh
            train_iter.restore(meta["data"])
            if meta.get("data_fingerprint") not in (None, train_rows.fingerprint()):
                raise input_pipeline.DataError(
                    f"{workdir}: the checkpoint at step {latest} was trained on other data "
                    f"(fingerprint {meta['data_fingerprint']}, now {train_rows.fingerprint()})"
                )
            source = f"resumed from step {latest}"
        else:
            state, source = _initial_state(config, model, base_cfg, tx, abstract, shardings, task, mask)
            if is_main:
                tokenizer_lib.save_tokenizer(tok, checkpoint.tokenizer_dir(workdir), model_max_length=cfg.n_positions)

    # --- compiled steps ------------------------------------------------------------------------------
    replicated = NamedSharding(mesh, P())
    p_train_step = jax.jit(
        make_train_step(model, tx, not any((cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop, cfg.lora_dropout)), task,
                        mask, base_vocab),
        in_shardings=(shardings, b_sharding), out_shardings=(shardings, replicated), donate_argnums=0,
    )
    p_eval_step = jax.jit(make_eval_step(model, task), in_shardings=(shardings["params"], b_sharding, replicated),
                          out_shardings=replicated, donate_argnums=2)

    sum_shapes = []  # the eval sums' shapes, worked out at the first evaluation

    def evaluate(params) -> dict:
        sums = None  # summed on the device; one transfer at the end
        for b in task.eval_batches(eval_rows, micro, local_rows):
            b = to_global(b, b_sharding, micro)
            if sums is None:
                if not sum_shapes:
                    sum_shapes.append(jax.eval_shape(lambda p, x: task.eval_sums(model, p, x), params, b))
                sums = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), replicated), sum_shapes[0])
            sums = p_eval_step(params, b, sums)
        sums = {} if sums is None else {k: float(v) for k, v in jax.device_get(sums).items()}
        return task.summarize(sums) if sums.get("count") else {}

    meta_extra = task.meta() if hasattr(task, "meta") else {}

    in_flight = None  # the step whose (asynchronous) save has not been confirmed yet

    def check_saves(wait: bool) -> None:
        """A failed save (e.g. a full disk) stops the run at the next step, with an error naming the
        step and why; the previous complete checkpoints are untouched (orbax writes a step under a
        temporary name and renames it only when complete)."""
        nonlocal in_flight
        if in_flight is None or (not wait and (jax.process_count() > 1 or mngr.is_saving_in_progress())):
            return  # several processes check only at save points, which they reach together
        s, in_flight = in_flight, None
        try:
            mngr.wait_until_finished()
            mngr.check_for_errors()
            error = None if paths.isdir(paths.join(workdir, checkpoint.CHECKPOINT_DIR, str(s))) else \
                RuntimeError(f"step {s} was not finalised (see the orbax error logged above)")
        except Exception as e:  # noqa: BLE001 - whatever the writer raised
            error = e
        if error is not None:
            raise checkpoint.CheckpointSaveError(
                f"saving step {s} to {paths.join(workdir, checkpoint.CHECKPOINT_DIR)} failed "
                f"({checkpoint._reason(error)}); the last complete checkpoint is step "
                f"{checkpoint.latest_step(workdir)}. Training stopped instead of going on without checkpoints."
            ) from error

    def save(step: int) -> None:
        meta = checkpoint.model_meta(
            cfg, data=train_iter.state(), data_fingerprint=train_rows.fingerprint(),
            config=json.loads(config.to_json_best_effort()), **meta_extra,
        )
        saved = state
        if lora_base:  # only the trainable params, and where the frozen ones come from
            saved = dict(state, params=lora.split(state["params"], mask)[0])
            meta["lora_base"] = lora_base
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved), meta=ocp.args.JsonSave(meta)),
                  force=True)

    # --- loop ----------------------------------------------------------------------------------------
    start_step = int(jax.device_get(state["step"]))
    writer = metrics.MetricsWriter(workdir)
    peak = config.peak_flops_per_device or metrics.peak_flops_per_device(mesh.devices.flat[0])
    n_devices = mesh.devices.size
    traces_before = _TRAIN_STEP_TRACES
    summary = {"start_step": start_step, "source": source, "preempted": False,
               "train_rows": input_pipeline.num_rows(train_rows.rows),
               "eval_rows": input_pipeline.num_rows(eval_rows.rows),
               "params": int(sum(x.size for x in jax.tree.leaves(abstract["params"])))}
    summary["trainable_params"] = lora.count(abstract["params"], mask)[0] if mask else summary["params"]
    if is_main:
        unit = "rows of " + f"{seq_len + 1} tokens" if task.backbone is None else "examples"
        lora_note = (f" (LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: {summary['trainable_params']:,} "
                     "trainable)") if mask else ""
        print(f"[train] {source}; {summary['params']:,} params{lora_note} on mesh {dict(mesh.shape)}; "
              f"{summary['train_rows']:,} train / {summary['eval_rows']:,} eval {unit}", flush=True)

    from tqdm import tqdm

    bar = tqdm(total=config.num_train_steps, initial=start_step, disable=not (config.progress_bar and is_main),
               dynamic_ncols=True, unit="step", mininterval=0.5 if sys.stderr.isatty() else 30.0)
    window: list[dict] = []  # fetched metrics of the finite steps since the last log row
    pending: list[tuple[int, dict]] = []  # (step, metrics still on device)
    last_m: dict = {}
    t_window, tokens_window = time.time(), 0
    last_saved = latest
    step = start_step

    def fetch_metrics() -> None:
        """Copy the buffered step metrics to the host in one transfer; run the NaN stop and the hooks.

        Steps are dispatched without waiting for their results, so the host prepares the next batch
        while the device computes; this is the loop's only wait on the device besides eval and saves.
        """
        nonlocal last_m
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            m = {k: float(v) for k, v in m.items()}
            last_m = m
            if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
                window.append(m)
            if m["nonfinite_consecutive"] >= config.optimizer.max_consecutive_nonfinite:
                mngr.wait_until_finished()
                raise FloatingPointError(
                    f"stopping at step {s}: {int(m['nonfinite_consecutive'])} consecutive steps had a non-finite "
                    f"loss or gradient norm (skipped, params unchanged). Last complete checkpoint: step "
                    f"{mngr.latest_step()}. Lower the learning rate or inspect the data before row position "
                    f"{train_iter.position}."
                )
            for hook in hooks:
                hook(s, m)
        pending.clear()

    with Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        best = [_read_best(workdir, task)]
        if start_step == 0 and summary["eval_rows"]:
            ev = evaluate(state["params"])
            summary["initial_eval_loss"] = ev.get("loss")
            if task.best_metric:
                summary[f"initial_{task.best_metric}"] = ev.get(task.best_metric)
            writer.write(0, ev, "eval")
        while step < config.num_train_steps:
            batch = to_global(next(train_iter), b_sharding, micro)
            state, m = p_train_step(state, batch)
            check_saves(wait=False)  # cheap until the save in flight has finished
            pending.append((step + 1, m))
            step += 1
            bar.update(1)
            tokens_window += global_batch * task.tokens_per_example()
            last = step == config.num_train_steps
            log_now = step % config.log_every_steps == 0 or last
            eval_now = summary["eval_rows"] and (step % config.eval_every_steps == 0 or last)
            save_now = step % config.checkpoint_every_steps == 0 or last
            if log_now or eval_now or save_now:
                fetch_metrics()
            preempted = preemption.requested(step)
            if preempted and pending:
                fetch_metrics()
            if log_now:
                dt = max(time.time() - t_window, 1e-9)
                tok_s = tokens_window / dt
                row = {
                    "loss": np.mean([w["loss"] for w in window]) if window else float("nan"),
                    "grad_norm": np.mean([w["grad_norm"] for w in window]) if window else float("nan"),
                    # skipped steps do not advance the optimizer's schedule count
                    "learning_rate": float(schedule(step - 1 - int(last_m["nonfinite_total"]))),
                    "tokens_per_s": tok_s,
                    "mfu": metrics.mfu(tok_s, cfg, seq_len, n_devices, peak),
                    "skipped_steps": last_m["nonfinite_total"],
                    "epoch": train_iter.epoch,
                }
                row["perplexity"] = float(np.exp(min(row["loss"], 50.0)))
                writer.write(step, row, "train")
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
                summary.update(train_loss=row["loss"], tokens_per_s=tok_s, mfu=row["mfu"])
                window, t_window, tokens_window = [], time.time(), 0
            if eval_now:
                ev = evaluate(state["params"])
                writer.write(step, ev, "eval")
                summary["eval_loss"] = ev.get("loss")
                if is_main:
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in ev.items() if k not in ("tokens", "count"))
                    bar.write(f"[eval]  step {step}: {shown}")
                if task.best_metric and ev.get(task.best_metric, -np.inf) > best[0]:
                    best[0] = ev[task.best_metric]
                    _save_best(workdir, cfg, state["params"], step, task, best[0])
                    summary[f"best_{task.best_metric}"] = best[0]
                    summary["best_step"] = step
            if save_now or (preempted and last_saved != step):
                check_saves(wait=True)
                save(step)
                last_saved = in_flight = step
            if preempted:
                summary["preempted"] = True
                if is_main:
                    bar.write(f"[train] SIGTERM: saved step {step}; rerun the same command to resume")
                break
    check_saves(wait=True)
    mngr.close()
    bar.close()
    writer.close()
    summary.update(step=step, skipped_steps=int(last_m.get("nonfinite_total", 0)),
                   train_step_traces=_TRAIN_STEP_TRACES - traces_before, last_checkpoint=last_saved)
    return summary


def _initial_state(config, model, base_cfg, tx, abstract, shardings, task, mask=None):
    """Fresh state: random init into sharded memory; with `init_from`, the backbone's params are then
    replaced by the checkpoint's (a task head and LoRA adapters keep their init). `mask`: a LoRA run's
    trainable params (the optimizer state covers only those)."""
    rng = jax.random.PRNGKey(config.seed)
    init_key, rng = jax.random.split(rng)
    inputs = task.example_inputs()
    params = jax.jit(lambda k: nn.unbox(model.init(k, *inputs)["params"]), out_shardings=shardings["params"])(init_key)
    kind, path = parse_init_from(config.init_from)
    source = "random init"
    if kind:
        if kind == "hf":
            loaded = hf.load_params_numpy(path, base_cfg, dtype=np.dtype(jnp.dtype(base_cfg.param_dtype)))
            source = f"initialised from HF checkpoint {path}"
        else:
            stored = GPTConfig(**checkpoint.read_meta(path)[1]["model"])
            _, loaded = checkpoint.load_model(path, **{k: getattr(base_cfg, k) for k in ("scan_layers", "param_dtype")
                                                     if getattr(base_cfg, k) != getattr(stored, k)})
            loaded = jax.device_get(loaded)
            source = f"initialised from orbax checkpoint {path}"
        loaded = task.adapt_backbone(loaded, model.config)
        if task.backbone is None:
            params = _overlay(params, loaded, shardings["params"], abstract["params"], path)
        else:
            params = dict(params, **{task.backbone: _overlay(params[task.backbone], loaded, shardings["params"][task.backbone],
                                                             abstract["params"][task.backbone], path)})
            heads = task.initial_head(kind, path, base_cfg) if hasattr(task, "initial_head") else None
            for name, head in (heads or {}).items():  # a fine-tuned classifier continues with its own head
                params = dict(params, **{name: put_params(head, shardings["params"][name])})
                source += f" (with its {name} head)"
    from_peft = config.get("lora", {}).get("from_peft")
    if from_peft:  # the adapters start from an existing PEFT LoRA adapter instead of A random, B zero
        if not model.config.lora_rank:
            raise ValueError("lora.from_peft is set but lora.rank is 0")
        adapters = lora.read_peft(from_peft, model.config)
        if model.config.scan_layers:
            adapters = flax.traverse_util.flatten_dict(hf.stack_layers(flax.traverse_util.unflatten_dict(adapters),
                                                                       model.config.n_layer))
        if task.backbone is not None:
            adapters = {(task.backbone,) + k: v for k, v in adapters.items()}
        params = _put_leaves(params, adapters, shardings["params"], abstract["params"])
        source += f", LoRA adapters from PEFT {from_peft}"
    # frozen LoRA base weights in lora.base_dtype (a no-op cast for everything else)
    params = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract["params"]),
                     out_shardings=shardings["params"], donate_argnums=0)(params)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(lora.split(params, mask)[0] if mask else params)
    state = {
        "step": put_params(np.zeros([], np.int32), shardings["step"]),
        "params": params,
        "opt_state": opt_state,
        "rng": put_params(np.asarray(rng), shardings["rng"]),
    }
    return state, source


def _overlay(params: dict, loaded: dict, shardings: dict, abstract: dict, source: str) -> dict:
    """`params` with every array of `loaded` (host numpy) put in its place, in the abstract dtype.
    Only LoRA adapters may be missing from `loaded`; anything else missing, or extra, is an error."""
    flat, new = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(loaded)
    extra = sorted("/".join(k) for k in set(new) - set(flat))
    missing = sorted("/".join(k) for k in set(flat) - set(new) if k[-1] not in lora.ADAPTERS)
    if extra or missing:
        raise hf.CheckpointError(f"{source}: params {(extra or missing)[:3]} {'not in the model' if extra else 'missing'}")
    return _put_leaves(params, new, shardings, abstract)


def _put_leaves(params: dict, new: dict, shardings: dict, abstract: dict) -> dict:
    """`params` with the host arrays of `new` ({flattened path: array}) put in their places, in the
    abstract dtype and with the param's sharding."""
    flat = flax.traverse_util.flatten_dict(params)
    sh, ab = flax.traverse_util.flatten_dict(shardings), flax.traverse_util.flatten_dict(abstract)
    for k, v in new.items():
        flat[k] = put_params(np.asarray(v).astype(ab[k].dtype), sh[k])
    return flax.traverse_util.unflatten_dict(flat)


def _read_best(workdir: str, task) -> float:
    """The best eval metric saved so far in WORKDIR/best (-inf when there is none)."""
    best = paths.join(workdir, checkpoint.BEST_DIR)
    if not task.best_metric or checkpoint.latest_step(best) is None:
        return -np.inf
    return float(checkpoint.read_meta(best)[1].get(task.best_metric, -np.inf))


def _save_best(workdir: str, cfg: GPTConfig, params, step: int, task, value: float) -> None:
    """Params-only checkpoint of the best step by `task.best_metric` in WORKDIR/best (replacing the
    previous best only once the new one is complete)."""
    best = paths.join(workdir, checkpoint.BEST_DIR)
    tmp = best + ".saving"
    if jax.process_index() == 0:
        paths.rmtree(tmp)
    multihost_utils.sync_global_devices("best: cleared") if jax.process_count() > 1 else None
    extra = task.meta() if hasattr(task, "meta") else {}
    checkpoint.save_params(tmp, cfg, params, step, **{task.best_metric: value}, **extra)
    if jax.process_index() == 0:
        paths.copytree(checkpoint.tokenizer_dir(workdir), checkpoint.tokenizer_dir(tmp))
        paths.rmtree(best)
        paths.rename(tmp, best)
    multihost_utils.sync_global_devices("best: saved") if jax.process_count() > 1 else None


def _config_digest(config) -> str:
    import hashlib

    return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()
