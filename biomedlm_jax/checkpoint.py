"""Orbax checkpoints of this project: one layout shared by training runs and `convert`.

    WORKDIR/
      checkpoints/<step>/state   orbax PyTree: {"params": ..., and whatever else the trainer keeps}
      checkpoints/<step>/meta    JSON: {"model": GPTConfig fields, "format_version": 1, ...}
      tokenizer/                 optional tokenizer files (tokenizer.json, vocab.json, merges.txt)
      best/                      MCQA runs: the best step by dev accuracy, itself a workdir of this layout

`load_model` restores only `state["params"]` (orbax partial restore), so it reads both a converted
HF checkpoint and a full training state (params + optimizer + data position) written by the trainer.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from biomedlm_jax import hf
from biomedlm_jax.model import GPT, GPTConfig

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"  # MCQA runs: params-only checkpoint of the best step by dev accuracy (a workdir itself)
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


def manager(workdir: str, *, max_to_keep: Optional[int] = None, async_save: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options, item_names=("state", "meta")
    )


def model_meta(cfg: GPTConfig, **extra) -> dict:
    return {"format_version": FORMAT_VERSION, "model": cfg.to_dict(), **extra}


def save_params(workdir: str, cfg: GPTConfig, params, step: int = 0, **extra_meta) -> str:
    """Write a params-only checkpoint at `step` (what `convert --to=orbax:` produces). Returns its path."""
    mngr = manager(workdir)
    if step in mngr.all_steps():
        raise FileExistsError(f"{mngr.directory}/{step} already exists; refusing to overwrite a checkpoint")
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": nn.unbox(params)}),
            meta=ocp.args.JsonSave(model_meta(cfg, **extra_meta)),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(str(mngr.directory), str(step))


def _reader(workdir: str) -> ocp.CheckpointManager:
    """Manager for reading; PyTree handler so params can be restored alone (partial restore)."""
    path = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{workdir}: no {CHECKPOINT_DIR}/ directory; not a biomedlm_jax workdir")
    return ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def latest_step(workdir: str) -> Optional[int]:
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return None
    return _reader(workdir).latest_step()


def read_meta(workdir: str, step: Optional[int] = None) -> tuple[int, dict]:
    """(step, meta dict) of `step` or of the latest complete checkpoint."""
    return _read_meta(_reader(workdir), step)


def _read_meta(mngr: ocp.CheckpointManager, step: Optional[int]) -> tuple[int, dict]:
    path = str(mngr.directory)
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(f"{path}: no complete checkpoint{'' if step is None else f' at step {step}'}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or "model" not in meta:
        raise hf.CheckpointError(f"{path}/{step}/meta: no 'model' entry; not written by biomedlm_jax")
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


def _check_against_disk(disk: Any, want: Any, where: str) -> None:
    """Clear error naming the tensor when the stored params do not fit the model's shapes."""
    disk_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(disk)}
    want_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want)}
    missing = sorted(set(want_flat) - set(disk_flat))
    if missing:
        raise hf.CheckpointError(f"{where}: params{missing[0]} missing from the checkpoint ({len(missing)} missing)")
    extra = sorted(set(disk_flat) - set(want_flat))
    if extra:
        raise hf.CheckpointError(f"{where}: checkpoint has params{extra[0]} that the model does not ({len(extra)} extra)")
    for k, w in want_flat.items():
        if tuple(disk_flat[k].shape) != tuple(w.shape):
            raise hf.CheckpointError(
                f"{where}: params{k} has shape {tuple(disk_flat[k].shape)} on disk, the model expects {tuple(w.shape)}"
            )


def load_model(workdir: str, step: Optional[int] = None, shardings=None, **config_overrides):
    """(GPT model, params) from an orbax workdir (latest step unless `step`).

    The architecture comes from the checkpoint's meta; `config_overrides` may change dtypes, attention
    implementation, remat, dropout. `shardings`: optional pytree of jax Shardings for the params (as
    stored, i.e. in the stored scan layout); default is the first device.
    """
    mngr = _reader(workdir)
    step, meta = _read_meta(mngr, step)
    stored = GPTConfig(**meta["model"])
    where = f"{os.path.join(workdir, CHECKPOINT_DIR)}/{step}/state"
    abstract = _abstract_params(stored, shardings)
    disk = mngr.item_metadata(step)["state"]
    disk_tree = getattr(disk, "tree", disk)
    if not isinstance(disk_tree, dict) or "params" not in disk_tree:
        raise hf.CheckpointError(f"{where}: no 'params' entry in the stored state")
    # Models with a task head (MCQA) keep the GPT under params[backbone]; only that part is read.
    backbone = meta.get("backbone")
    disk_params = disk_tree["params"][backbone] if backbone else disk_tree["params"]
    _check_against_disk(disk_params, abstract, where)
    params = restore_params(mngr, step, {backbone: abstract} if backbone else abstract)
    params = params[backbone] if backbone else params
    cfg = stored.replace(**config_overrides)
    if cfg.scan_layers != stored.scan_layers:
        params = (hf.stack_layers if cfg.scan_layers else hf.unstack_layers)(params, cfg.n_layer)
    if jax.numpy.dtype(cfg.param_dtype) != jax.numpy.dtype(stored.param_dtype):
        params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), params)
    return GPT(cfg), params


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
    """state["params"] of `step` restored into `abstract_params` (a subtree of the stored params is
    fine: orbax partial restore), placed with the shardings its leaves carry."""
    target = {"params": abstract_params}
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
        ),
    )
    return restored["state"]["params"]


def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER_DIR)
