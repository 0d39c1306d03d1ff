"""A run's orbax checkpoints: the workdir layout, `load_model`, the fallback past a damaged latest step
(`restore_newest`, `move_aside`), `verify`, and a LoRA run's frozen base (reference, sha256 check,
reload). `python -m biomedlm_jax.checkpoint verify WORKDIR` is its command."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from biomedlm_jax.core import errors, paths
from biomedlm_jax.formats import damage, hf, sources
from biomedlm_jax.models import gpt, lora
from biomedlm_jax.models.gpt import GPT, resize_embeddings
from biomedlm_jax.models.gpt_config import GPTConfig

CHECKPOINT_DIR = "checkpoints"

QUARANTINE_DIR = "checkpoints_bad"  # damaged steps, moved aside by restore_newest

BEST_DIR = "best"  # MCQA runs: params-only checkpoint of the best step by dev accuracy (a workdir itself)

TOKENIZER_DIR = "tokenizer"

FORMAT_VERSION = 1



def manager(workdir: str, *, max_to_keep: Optional[int] = None, async_save: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        paths.join(paths.resolve(workdir), CHECKPOINT_DIR), options=options, item_names=("state", "meta")
    )



def model_meta(cfg: GPTConfig, **extra) -> dict:
    return {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), **extra}



def save_params(workdir: str, cfg: GPTConfig, params, step: int = 0, **extra_meta) -> str:
    """Write a params-only checkpoint at `step` (what `convert --to=orbax:` produces). Returns its path."""
    mngr = manager(workdir)
    if step in mngr.all_steps():
        raise FileExistsError(f"{mngr.directory}/{step} already exists; refusing to overwrite a checkpoint")
    state = {"params": nn.unbox(params)}
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(model_meta(cfg, digest=damage.state_digest(state), **extra_meta)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()
    return paths.join(str(mngr.directory), str(step))



def reader(workdir: str) -> ocp.CheckpointManager:
    """Manager for reading an existing workdir; PyTree handler so params can be restored alone (partial restore)."""
    path = paths.join(paths.resolve(workdir), CHECKPOINT_DIR)
    if not paths.isdir(path):
        raise FileNotFoundError(f"{workdir}: no {CHECKPOINT_DIR}/ directory; not a biomedlm_jax workdir")
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )



def latest_step(workdir: str) -> Optional[int]:
    if not paths.isdir(paths.join(workdir, CHECKPOINT_DIR)):
        return None
    return reader(workdir).latest_step()



def read_meta(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, meta dict) of `step`, or of the newest step whose meta reads (damaged ones are moved aside)."""
    mngr = reader(workdir)
    if step is not None:
        return _read_meta(mngr, step)
    if not mngr.all_steps():
        return _read_meta(mngr, None)  # the "no complete checkpoint" error
    return restore_newest(workdir, lambda s: _read_meta(mngr, s)[1], steps=mngr.all_steps())



def _read_meta(mngr: ocp.CheckpointManager, step: Optional[int]) -> tuple[int, dict]:
    path = str(mngr.directory)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"{path}: no complete checkpoint{'' if step is None else f' at step {step}'}")
    with damage.reading(f"{path}/{step}/meta"):
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or "model" not in meta:
        raise errors.CheckpointError(f"{path}/{step}/meta: no 'model' entry; not written by biomedlm_jax")
    return step, meta



def _abstract_params(cfg: GPTConfig, shardings=None):
    ids = jax.ShapeDtypeStruct((1, 1), jax.numpy.int32)
    abstract = jax.eval_shape(lambda x: nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), x)["params"]), ids)
    return place(abstract, shardings)



def place(abstract, shardings=None):
    """Abstract arrays carrying `shardings` (default: the first device), as restore targets."""
    if shardings is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)



def check_against_disk(disk: Any, want: Any, where: str) -> None:
    """Clear error naming the tensor when the stored params do not fit the model's shapes."""
    disk_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(disk)}
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want)}
    missing = sorted(set(want_flat) - set(disk_flat))
    if missing:
        raise errors.CheckpointError(f"{where}: params{missing[0]} missing from the checkpoint ({len(missing)} missing)")
    extra = sorted(set(disk_flat) - set(want_flat))
    if extra:
        raise errors.CheckpointError(f"{where}: checkpoint has params{extra[0]} that the model does not ({len(extra)} extra)")
    for k, w in want_flat.items():
        if tuple(disk_flat[k].shape) != tuple(w.shape):
            raise errors.CheckpointError(
                f"{where}: params{k} has shape {tuple(disk_flat[k].shape)} on disk, the model expects {tuple(w.shape)}"
            )



def load_model(workdir: str, step: Optional[int] = None, shardings=None, merge_lora: bool = True, **config_overrides):
    """(GPT model, params) from an orbax workdir: `step`, or the newest step that restores (a damaged
    latest step is reported, moved aside and the next older one used; with `step` given, an error).
    A LoRA run's adapters are merged into the weights (`lora.merge`): the model returned has none
    (`merge_lora=False`: the adapters are kept, for `convert --to=peft:`).

    The architecture comes from the checkpoint's meta; `config_overrides` may change dtypes, attention
    implementation, remat, dropout. `shardings`: optional pytree of jax Shardings for the params (as
    stored, i.e. in the stored scan layout); default is the first device.
    """
    mngr = reader(workdir)
    if step is None and mngr.all_steps():  # the newest step that restores; damaged ones are moved aside
        return restore_newest(workdir, lambda s: load_model(workdir, s, shardings, merge_lora, **config_overrides),
                              steps=mngr.all_steps())[1]
    step, meta = _read_meta(mngr, step)
    stored = GPTConfig(**meta["model"])
    where = f"{paths.join(workdir, CHECKPOINT_DIR)}/{step}/state"
    abstract = _abstract_params(stored, shardings)
    with damage.reading(where):
        disk = mngr.item_metadata(step)["state"]
    disk_tree = getattr(disk, "tree", disk)
    if not isinstance(disk_tree, dict) or "params" not in disk_tree:
        raise errors.CheckpointError(f"{where}: no 'params' entry in the stored state")
    # Models with a task head (MCQA) keep the GPT under params[backbone]; only that part is read.
    backbone = meta.get("backbone")
    disk_params = disk_tree["params"][backbone] if backbone else disk_tree["params"]
    if meta.get("lora_base"):  # a LoRA run's step: its trainable params, the frozen rest from its base
        params = restore_lora_run(mngr, step, meta, stored, {backbone: abstract} if backbone else abstract, where)
    else:
        check_against_disk(disk_params, abstract, where)
        params = restore_params(mngr, step, {backbone: abstract} if backbone else abstract, meta, where)
    params = params[backbone] if backbone else params
    if stored.lora_rank and merge_lora:  # a LoRA run: adapters folded into the weights, a plain GPT comes out
        params, stored = lora.merge(params, stored), stored.replace(lora_rank=0)
    cfg = stored.replace(**config_overrides)
    if cfg.scan_layers != stored.scan_layers:
        params = (gpt.stack_layers if cfg.scan_layers else gpt.unstack_layers)(params, cfg.n_layer)
    if jax.numpy.dtype(cfg.param_dtype) != jax.numpy.dtype(stored.param_dtype):
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    return GPT(cfg), params



def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params, meta: dict, where: str):
    """state["params"] of `step` restored into `abstract_params` (a subtree of the stored params is
    fine: orbax partial restore), placed with the shardings its leaves carry, and checked against the
    digest in the step's `meta` (errors.CheckpointDamaged naming `where` when a read fails or differs)."""
    target = {"params": abstract_params}
    with damage.reading(where):
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
                )
            ),
        )["state"]
        damage.check_digest(restored, meta.get("digest"), where)
    return restored["params"]



def base_reference(init_from: str, vocab: Optional[int]) -> Optional[dict]:
    """{"init_from", "step", "sha256", "vocab"} of a LoRA run's base (`init_from` = hf:DIR or
    orbax:WORKDIR), or None for a random base (then checkpoints keep every weight). sha256 covers the
    weight files: the safetensors of an HF directory, or every file of the orbax step's state."""
    src = sources.parse_optional(init_from)
    if src is None:
        return None
    step = latest_step(src.path) if src.kind == "orbax" else None
    return {"init_from": init_from, "step": step, "sha256": base_sha256(init_from, step), "vocab": vocab}



def base_sha256(init_from: str, step: Optional[int] = None) -> str:
    src = sources.parse(init_from)
    if src.kind == "hf":
        files = [(os.path.basename(f), f) for f in hf.weight_files(src.path)]
    else:
        files = paths.files_under(paths.join(src.path, CHECKPOINT_DIR, str(step), "state"))
    h = hashlib.sha256()
    for name, f in sorted(files):
        h.update(name.encode() + b"\0")
        with paths.Path(f).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()



def check_base(ref: dict, where: str) -> None:
    """Error naming the base when its weights are not the ones the run started from."""
    now = base_sha256(ref["init_from"], ref.get("step"))
    if now != ref["sha256"]:
        base = ref["init_from"] + ("" if ref.get("step") is None else f" (step {ref['step']})")
        raise errors.CheckpointError(
            f"{where}: the LoRA run's base {base} changed under it (sha256 {ref['sha256'][:16]}... when the run "
            f"started, {now[:16]}... now); its adapters only mean something on the base they were trained on")



def load_base(ref: dict, cfg: GPTConfig) -> dict:
    """The frozen base's params (numpy, a plain GPT with `cfg`'s layout and vocabulary: rows the task
    added are filled as at the run's start; they are trainable, so the checkpoint overrides them)."""
    src = sources.parse(ref["init_from"])
    plain = cfg.replace(lora_rank=0, vocab_size=ref.get("vocab") or cfg.vocab_size)
    if src.kind == "hf":
        params = hf.load_params_numpy(src.path, plain, dtype=np.dtype(jax.numpy.dtype(cfg.param_dtype)))
    else:  # a base that is itself a LoRA run comes back merged
        _, params = load_model(src.path, step=ref.get("step"), scan_layers=cfg.scan_layers)
        params = jax.device_get(params)
    return resize_embeddings(params, cfg.vocab_size)



def frozen_params(ref: dict, cfg: GPTConfig, frozen_abstract, backbone: Optional[str], where: str,
                  check: bool = True):
    """A LoRA run's frozen params, shaped and placed as `frozen_abstract`'s leaves say (a sub-tree of
    the whole model's params, under `backbone` for a model with a head), read from its base in the
    dtype the run kept them in (ref["dtype"]), after checking the base's sha256 (unless the caller
    has just done so: `check=False`)."""
    if check:
        check_base(ref, where)
    base = flax.traverse_util.flatten_dict(load_base(ref, cfg))
    kept = np.dtype(jax.numpy.dtype(ref.get("dtype") or cfg.param_dtype))
    out = {}
    for k, a in flax.traverse_util.flatten_dict(frozen_abstract).items():
        x = np.asarray(base[k[1:] if backbone else k]).astype(kept).astype(a.dtype)
        out[k] = jax.make_array_from_callback(x.shape, a.sharding, lambda idx, x=x: x[idx])
    return flax.traverse_util.unflatten_dict(out)



def restore_lora_run(mngr: ocp.CheckpointManager, step: int, meta: dict, cfg: GPTConfig, abstract_params,
                     where: str):
    """The full params (shaped like `abstract_params`, a whole model's, placed as its leaves say) of a
    LoRA run's step, which stores only the trainable ones: the frozen rest comes from `frozen_params`."""
    ref, backbone = meta["lora_base"], meta.get("backbone")
    mask = lora.trainable_mask(abstract_params, cfg, backbone, ref.get("vocab"))
    t_abs, f_abs = lora.split(abstract_params, mask)
    with damage.reading(where):
        disk = mngr.item_metadata(step)["state"]
    check_against_disk(getattr(disk, "tree", disk)["params"], t_abs, where)
    trained = restore_params(mngr, step, t_abs, meta, where)
    return lora.join(trained, frozen_params(ref, cfg, f_abs, backbone, where))



def tokenizer_dir(workdir: str) -> str:
    return paths.join(workdir, TOKENIZER_DIR)



class NoGoodCheckpoint(errors.CheckpointDamaged):
    """No step of a workdir restores; the message lists each step and why."""



class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (e.g. no space left); the message names the step and the cause."""



def _is_damage(e: BaseException) -> bool:
    """A step that cannot be read (not a model that does not fit it, which is the caller's error)."""
    return not isinstance(e, damage.NOT_DAMAGE)



def move_aside(workdir: str, step: int, reason: str, details: str = "") -> str:
    """Rename WORKDIR/checkpoints/<step> into WORKDIR/checkpoints_bad/ (never deleted) with a REASON.txt.
    Only process 0 renames; every process waits for it. Returns the new path."""
    src = paths.join(paths.resolve(workdir), CHECKPOINT_DIR, str(step))
    dst = paths.join(paths.resolve(workdir), QUARANTINE_DIR, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
        paths.makedirs(paths.join(paths.resolve(workdir), QUARANTINE_DIR))
        paths.rename(src, dst)
        paths.write_text(paths.join(dst, "REASON.txt"), reason + "\n" + (f"\n{details}" if details else ""))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"moved aside step {step}")
    return dst



def _agree(ok: bool) -> bool:
    """True only if every process restored its part (so all of them fall back together)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))



def restore_newest(workdir: str, restore: Callable[[int], Any], steps: Optional[list[int]] = None,
                   log: Callable[[str], None] = None) -> tuple[int, Any]:
    """(step, restore(step)) for the newest of `steps` (default: the workdir's) that restores.

    A step that fails is moved aside (`move_aside`, its REASON.txt keeps the whole error) and the next
    older step is tried; once one restores, one line says which steps were damaged and why, where they
    went and which step the run goes on from (`BIOMEDLM_VERBOSE=1` also prints each underlying error).
    If none restores, NoGoodCheckpoint lists each step and why; nothing starts from scratch. An error
    that says the model does not fit the checkpoint (errors.CheckpointError) is raised as it is."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if steps is None:
        steps = reader(workdir).all_steps()
    failures = []  # (step, reason, where it was moved)
    for step in sorted(steps, reverse=True):
        try:
            with damage.reading(f"{paths.join(workdir, CHECKPOINT_DIR)}/{step}"):
                result, error = restore(step), None
        except Exception as e:  # noqa: BLE001 - anything that stops a step from restoring
            if not _is_damage(e):
                raise
            result, error = None, e
        if _agree(error is None):
            if failures:
                moved = "; ".join(f"step {s} ({r}) moved to {d}" for s, r, d in failures)
                log(f"[checkpoint] {workdir}: {moved}; resuming from step {step}")
            return step, result
        reason = _reason(error, workdir, step) if error is not None else "another process could not restore it"
        dst = move_aside(workdir, step, reason, damage.details(error) if error is not None else "")
        failures.append((step, reason, dst))
    listing = "; ".join(f"step {s}: {r}" for s, r, _ in failures) or "no checkpoints"
    raise NoGoodCheckpoint(f"{workdir}: no checkpoint restores ({listing}). The damaged steps are in "
                           f"{paths.join(workdir, QUARANTINE_DIR)}; nothing was started from scratch.")



def _reason(e: BaseException, workdir: str, step: int) -> str:
    """What went wrong with `step`, without repeating the step's own folder."""
    text = damage.describe(e)
    for prefix in (f"{paths.join(workdir, CHECKPOINT_DIR)}/{step}", f"{paths.join(paths.resolve(workdir), CHECKPOINT_DIR)}/{step}"):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip("/")
    return text



def verify_step(mngr: ocp.CheckpointManager, step: int) -> str:
    """Read every array and the meta of `step` and compare the arrays with the digest saved with them
    (formats/damage.py). Returns a summary; raises errors.CheckpointDamaged naming what failed."""
    where = f"{mngr.directory}/{step}"
    with damage.reading(where):
        stored = mngr.item_metadata(step)["state"]
        tree = getattr(stored, "tree", stored)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=args), meta=ocp.args.JsonRestore()))
        leaves = jax.tree.leaves(restored["state"])
        if not isinstance(restored["meta"], dict) or "model" not in restored["meta"]:
            raise errors.CheckpointError(f"{where}/meta: no 'model' entry")
        damage.check_digest(restored["state"], restored["meta"].get("digest"), where)
    return f"{len(leaves)} arrays, {sum(np.asarray(x).nbytes for x in leaves):,} bytes"



def verify(workdir: str, out=sys.stdout) -> bool:
    """Report every step of WORKDIR (and WORKDIR/best) as ok or bad; True when each latest step is ok."""
    ok = True
    for where in (workdir, paths.join(workdir, BEST_DIR)):
        if not paths.isdir(paths.join(where, CHECKPOINT_DIR)):
            if where == workdir:
                print(f"{workdir}: no {CHECKPOINT_DIR}/ directory", file=out)
                return False
            continue
        mngr = reader(where)
        steps = sorted(mngr.all_steps())
        if not steps:
            print(f"{where}: no complete checkpoint", file=out)
            ok = False
        for step in steps:
            try:
                print(f"{where} step {step}: ok ({verify_step(mngr, step)})", file=out)
            except Exception as e:  # noqa: BLE001 - report whatever stops the step from reading
                print(f"{where} step {step}: bad ({damage.describe(e)})", file=out)
                ok = ok and step != steps[-1]
    bad = paths.join(workdir, QUARANTINE_DIR)
    if paths.isdir(bad):
        names = paths.listdir(bad)
        print(f"{bad}: {len(names)} step(s) moved aside earlier: {', '.join(names)}", file=out)
    return ok
