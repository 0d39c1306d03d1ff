"""The one training loop: `train_and_evaluate(config, workdir, task=...)`, read top to bottom.

  setup -> model config -> tokenizer + data -> optimizer -> sharded state (init, init_from, or resume)
  -> jitted train/eval steps -> loop (metrics, eval, checkpoints, preemption) -> final checkpoint.

A task (training/task.py: `LMTask` for pretraining, `seq2seq.Seq2SeqTask`, `mcqa.MCQATask`) supplies the model,
data, loss and eval; this module knows none by name. The train state is a plain dict {"step",
"params", "opt_state", "rng"} (training/state.py) that orbax saves as-is; the data iterator position
goes into the checkpoint's JSON `meta` item beside it (training/checkpoints.py). A workdir that holds a
checkpoint is always resumed from its latest complete step, and the resumed run is bit-identical to
an uninterrupted one (same batches, same dropout keys: both are functions of the step).

Parallelism is the jit way: params and optimizer state live in NamedShardings derived from the
model's logical axis names and the config's rules; the step is `jax.jit` with in/out shardings and a
donated state; the batch is a global array assembled from each process's own rows.
"""
from __future__ import annotations

import hashlib
import math
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from biomedlm_jax.core import paths
from biomedlm_jax.data import input_pipeline
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, hf_config, sources
from biomedlm_jax.models import sharding
from biomedlm_jax.models.gpt_config import GPTConfig
from biomedlm_jax.training import configlib, losses, metrics, optim
from biomedlm_jax.training.checkpoints import Saver, read_best, restore_or_init, save_best
from biomedlm_jax.training.state import (LoraPlan, batch_shards, batch_sharding, process_batch_rows, state_shardings,
                                         to_global)
from biomedlm_jax.training.task import LMTask, for_config

# Incremented each time the train step's Python body is traced; the summary reports it so tests can
# check that the step compiles once for a whole run.
_TRAIN_STEP_TRACES = 0


# ----------------------------------------------------------------------------------------------------
# Pieces (each used by train_and_evaluate; importable for fine-tuning entry points and tests)
# ----------------------------------------------------------------------------------------------------


def model_config(config) -> GPTConfig:
    """The run's GPTConfig: the variant (or init_from's checkpoint) with `config.model` overrides."""
    src = sources.parse_optional(config.init_from)
    if src is None:
        cfg = configlib.resolve_model(config.model)
    elif src.kind == "hf":
        cfg = configlib.resolve_model(config.model, hf_config.load_config(src.path), src.path)
    else:
        _, meta = checkpoint.read_meta(src.path)
        cfg = configlib.resolve_model(config.model, GPTConfig(**meta["model"]), src.path)
    return with_lora(cfg, config)

def with_lora(cfg: GPTConfig, config) -> GPTConfig:
    """`cfg` with the run's `config.lora` adapters (none when the config has no lora section)."""
    lo = config.get("lora")
    if lo is None:
        return cfg
    targets = tuple(t.strip() for t in str(lo.targets).split(",") if t.strip())
    return cfg.replace(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
                       lora_targets=targets)


def load_run_tokenizer(config, workdir: str):
    """The prepared corpus's tokenizer (`data.prepared_dir`), else `data.tokenizer`, else the tokenizer
    stored with init_from's checkpoint, else the workdir's (a resumed run)."""
    if config.data.get("prepared_dir"):
        return tokenizer_lib.load_tokenizer(paths.join(config.data.prepared_dir, "tokenizer"))
    if config.data.get("tokenizer"):
        return tokenizer_lib.load_tokenizer(config.data.tokenizer)
    src = sources.parse_optional(config.init_from)
    candidates = [src.path if src.kind == "hf" else checkpoint.tokenizer_dir(src.path)] if src else []
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


def make_train_step(model, tx, deterministic: bool, task=None, plan: Optional[LoraPlan] = None) -> Callable:
    """(state, batch) -> (state, metrics). LM batch: "inputs"/"targets" (A, b, T) int, optional "weights";
    other tasks' batches are whatever their `loss` reads, each field with leading (A, b).

    Gradients are summed over the A micro-batches (lax.scan) and divided once by the token count, so
    k micro-batches equal one big batch. A non-finite loss poisons the gradients, so the optimizer's
    `apply_if_finite` skips the step (params and moments unchanged) and counts it.

    plan (a bound train_state.LoraPlan, a LoRA run): gradients and updates only for the trainable
    params, the frozen ones are carried through unchanged; of a grown vocabulary only the added
    embedding rows train.
    """

    task = task or LMTask(None)
    plan = plan or LoraPlan(model.config)

    def micro_loss(trainable, frozen, mb, rng):
        return task.loss(model, plan.join(trainable, frozen), mb, rng, deterministic)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        global _TRAIN_STEP_TRACES
        _TRAIN_STEP_TRACES += 1
        params, frozen = plan.split(state["params"])
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
        grads = plan.mask_rows(grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.nan), grads)
        # weight decay must not move a LoRA run's base embedding rows either
        keep_rows = plan.mask_rows if plan.mask and plan.base_vocab is not None else None
        params, opt_state = optim.apply_step(tx, grads, state["opt_state"], params, keep_rows)
        new_state = {
            "step": state["step"] + 1,
            "params": plan.join(params, frozen),
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        consecutive, total = optim.nonfinite_counts(opt_state)
        m = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "nonfinite_consecutive": consecutive,
             "nonfinite_total": total}
        return new_state, m

    return train_step


def train_step_program(model, tx, task, plan: LoraPlan, mesh, rules) -> tuple:
    """(jitted train step, abstract state, state shardings, bound plan): the step exactly as a run
    compiles it, with the state's shardings on `mesh` and nothing allocated, so it can also be lowered
    for devices this host does not have (planning.programs: the TPU compile check)."""
    cfg = model.config
    abstract, shardings = state_shardings(model, tx, mesh, rules, task.example_inputs(), plan)
    plan = plan.bind(abstract["params"])
    deterministic = not any((cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop, cfg.lora_dropout))
    step = jax.jit(make_train_step(model, tx, deterministic, task, plan),
                   in_shardings=(shardings, batch_sharding(mesh, rules)),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    return step, abstract, shardings, plan


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


def log_row(window: list[dict], last_m: dict, schedule, step: int, tokens_per_s: float, mfu: float,
            epoch: int) -> dict:
    """The train row written every `log_every_steps`: means over the window's finite steps."""
    loss = np.mean([w["loss"] for w in window]) if window else float("nan")
    return {
        "loss": loss,
        "grad_norm": np.mean([w["grad_norm"] for w in window]) if window else float("nan"),
        # skipped steps do not advance the optimizer's schedule count
        "learning_rate": float(schedule(step - 1 - int(last_m["nonfinite_total"]))),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "skipped_steps": last_m["nonfinite_total"],
        "epoch": epoch,
        "perplexity": losses.perplexity(loss),
    }


def device_hbm_bytes(device) -> Optional[int]:
    """The memory a device offers (`bytes_limit` of its memory stats: GPU, TPU), None where it reports
    none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # compile-only and CPU devices may not implement it
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def auto_loss_chunk(config, cfg: GPTConfig, mesh, hbm_bytes: Optional[int]) -> int:
    """Positions per logits chunk for the LM loss: `loss_chunk_size` when set; else 0 (whole sequence)
    unless the micro-batch's fp32 logits and their gradient, 2 x (sequences per device) x seq_len x
    vocab x 4 bytes, would exceed `logits_hbm_fraction` of `hbm_bytes`: then the largest power-of-two
    share of seq_len whose logits fit that budget (at least 1). BioMedLM's vocabulary makes them large:
    16 sequences of 1024 per device are 3.8 GB (issue 43)."""
    fraction = config.get("logits_hbm_fraction", 0.0)
    if config.loss_chunk_size or not fraction or not hbm_bytes:
        return config.loss_chunk_size
    ways = batch_shards(mesh, config.logical_axis_rules)
    per_device = max(1, config.global_batch_size // config.grad_accum_steps // ways)
    T = config.seq_len

    def need(chunk):
        return 2 * per_device * chunk * cfg.vocab_size * 4

    if need(T) <= fraction * hbm_bytes:
        return 0
    chunk = T
    while chunk > 1 and need(chunk) > fraction * hbm_bytes:
        chunk = (chunk + 1) // 2
    return chunk


def check_config(config, cfg: GPTConfig, mesh) -> None:
    """What a run's config must satisfy on `mesh` before anything compiles (ValueError naming the key)."""
    if config.seq_len > cfg.n_positions:
        raise ValueError(f"seq_len={config.seq_len} exceeds the model's n_positions={cfg.n_positions}")
    if config.global_batch_size % config.grad_accum_steps:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}"
        )
    micro = config.global_batch_size // config.grad_accum_steps
    ways = batch_shards(mesh, config.logical_axis_rules)
    if micro % ways:
        raise ValueError(
            f"micro-batch of {micro} sequences (global_batch_size / grad_accum_steps) does not split over "
            f"{ways} batch shards of mesh {dict(mesh.shape)}"
        )
    if config.loss_chunk_size < 0:
        raise ValueError(f"loss_chunk_size must be 0 (off) or positive, got {config.loss_chunk_size}")
    if not 0 <= config.get("logits_hbm_fraction", 0.0) <= 1:
        raise ValueError(f"logits_hbm_fraction must be in [0, 1], got {config.logits_hbm_fraction}")
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
    `task`: the task object (LMTask, seq2seq.Seq2SeqTask, mcqa.MCQATask; default: `tasks.for_config(config)`, the LM task).
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
    task = task if task is not None else for_config(config)
    base_cfg = model_config(config)  # the architecture init_from's weights have
    check_config(config, base_cfg, mesh)
    tok, cfg = task.prepare(load_run_tokenizer(config, workdir), base_cfg)
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the model's vocab_size is {cfg.vocab_size}")
    model = task.model(cfg)
    task.loss_chunk = auto_loss_chunk(config, cfg, mesh, device_hbm_bytes(mesh.devices.flat[0]))
    if is_main and task.loss_chunk != config.loss_chunk_size:
        print(f"[train] loss: logits in chunks of {task.loss_chunk} positions (logits_hbm_fraction="
              f"{config.logits_hbm_fraction} of the device's HBM)", flush=True)
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

    # --- optimizer + sharded state (fresh, from init_from, or resumed) --------------------------------
    tx, schedule = make_optimizer(config)
    plan = LoraPlan.for_run(config, cfg, base_cfg, task)  # LoRA: only adapters, a head, added rows train
    p_train_step, abstract, shardings, plan = train_step_program(model, tx, task, plan, mesh, rules)
    mngr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, source, latest = restore_or_init(
            config, workdir, mngr, model=model, base_cfg=base_cfg, tx=tx, abstract=abstract, shardings=shardings,
            task=task, plan=plan, train_iter=train_iter, train_rows=train_rows, tok=tok)
    saver = Saver(mngr, workdir, config, cfg, task, plan, train_iter, train_rows)

    # --- compiled steps ------------------------------------------------------------------------------
    replicated = NamedSharding(mesh, P())
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

    # --- loop ----------------------------------------------------------------------------------------
    start_step = int(jax.device_get(state["step"]))
    writer = metrics.MetricsWriter(workdir)
    peak = config.peak_flops_per_device or metrics.peak_flops_per_device(mesh.devices.flat[0])
    n_devices = mesh.devices.size
    traces_before = _TRAIN_STEP_TRACES
    trainable_n, total_n = plan.counts(abstract["params"])
    summary = {"start_step": start_step, "source": source, "preempted": False,
               "train_rows": input_pipeline.num_rows(train_rows.rows),
               "eval_rows": input_pipeline.num_rows(eval_rows.rows), "params": total_n, "trainable_params": trainable_n}
    if is_main:
        unit = "rows of " + f"{seq_len + 1} tokens" if task.backbone is None else "examples"
        print(f"[train] {source}; {total_n:,} params{plan.describe(trainable_n)} on mesh {dict(mesh.shape)}; "
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
                saver.mngr.wait_until_finished()
                raise FloatingPointError(
                    f"stopping at step {s}: {int(m['nonfinite_consecutive'])} consecutive steps had a non-finite "
                    f"loss or gradient norm (skipped, params unchanged). Last complete checkpoint: step "
                    f"{saver.mngr.latest_step()}. Lower the learning rate or inspect the data before row position "
                    f"{train_iter.position}."
                )
            for hook in hooks:
                hook(s, m)
        pending.clear()

    with Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        best = [read_best(workdir, task)]
        if start_step == 0 and summary["eval_rows"]:
            ev = evaluate(state["params"])
            summary["initial_eval_loss"] = ev.get("loss")
            if task.best_metric:
                summary[f"initial_{task.best_metric}"] = ev.get(task.best_metric)
            writer.write(0, ev, "eval")
        while step < config.num_train_steps:
            batch = to_global(next(train_iter), b_sharding, micro)
            state, m = p_train_step(state, batch)
            saver.check(wait=False)  # cheap until the save in flight has finished
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
                tok_s = tokens_window / max(time.time() - t_window, 1e-9)
                row = log_row(window, last_m, schedule, step, tok_s, metrics.mfu(tok_s, cfg, seq_len, n_devices, peak),
                              train_iter.epoch)
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
                    save_best(workdir, cfg, state["params"], step, task, best[0])
                    summary[f"best_{task.best_metric}"] = best[0]
                    summary["best_step"] = step
            if save_now or (preempted and last_saved != step):
                saver.save(step, state)
                last_saved = step
            if preempted:
                summary["preempted"] = True
                if is_main:
                    bar.write(f"[train] SIGTERM: saved step {step}; rerun the same command to resume")
                break
    saver.close()
    bar.close()
    writer.close()
    summary.update(step=step, skipped_steps=int(last_m.get("nonfinite_total", 0)),
                   train_step_traces=_TRAIN_STEP_TRACES - traces_before, last_checkpoint=last_saved)
    return summary


def _config_digest(config) -> str:
    return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()
