"""A training run's checkpoints: resume or start, the asynchronous saver, and the best checkpoint.

`restore_or_init` resumes a workdir from its newest step that restores (a damaged one is moved aside,
see checkpoint.restore_newest) or creates a fresh state; the data iterator's position and the data
fingerprint travel in each step's meta. `Saver` writes steps in the background and turns a failed
write (a full disk) into an error at the next step, naming the step and the last complete one.
MCQA runs also keep WORKDIR/best, a params-only checkpoint of the best step by their eval metric.
"""
from __future__ import annotations

import json
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, damage
from biomedlm_jax.models.gpt_config import GPTConfig
from biomedlm_jax.training.state import LoraPlan, initial_state


def restore_checkpoint(mngr: ocp.CheckpointManager, workdir: str, step: int, abstract_state):
    """(state, meta) of `step`, placed with the shardings carried by `abstract_state`'s leaves and
    checked against the digest saved with them (errors.CheckpointDamaged when a read fails or differs).

    The stored params are checked against the model first, so restoring into a model of another
    shape fails with the tensor's name rather than an orbax shape error."""
    where = f"{paths.join(workdir, checkpoint.CHECKPOINT_DIR)}/{step}/state"
    with damage.reading(where):
        stored = checkpoint.reader(workdir).item_metadata(step)["state"]
    stored = getattr(stored, "tree", stored)
    if not isinstance(stored, dict) or not {"params", "opt_state", "step"} <= set(stored):
        raise errors.CheckpointError(f"{where}: not a training state (has {sorted(stored) if isinstance(stored, dict) else stored})")
    checkpoint.check_against_disk(stored["params"], abstract_state["params"], where)
    with damage.reading(where.removesuffix("state") + "meta"):
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    with damage.reading(where):
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
        damage.check_digest(state, meta.get("digest"), where)
    return state, meta


def restore_or_init(config, workdir: str, mngr: ocp.CheckpointManager, *, model, base_cfg: GPTConfig, tx,
                    abstract, shardings, task, plan: LoraPlan, train_iter, train_rows, tok):
    """(state, where it came from, the step restored or None). Resumes the newest step that restores,
    moving the iterator to its data position; else a fresh state (and the run's tokenizer is saved).
    A workdir whose every step was moved aside is refused rather than restarted from scratch."""
    latest = mngr.latest_step()
    if latest is None and paths.isdir(paths.join(workdir, checkpoint.QUARANTINE_DIR)):
        raise checkpoint.NoGoodCheckpoint(
            f"{workdir}: every checkpoint was moved aside to {checkpoint.QUARANTINE_DIR}/ because it did not restore; "
            "refusing to start from scratch in this workdir (use a new workdir, or remove that folder to do so)")
    if latest is None:
        state, source = initial_state(config, model, base_cfg, tx, abstract, shardings, task, plan)
        if jax.process_index() == 0:
            tokenizer_lib.save_tokenizer(tok, checkpoint.tokenizer_dir(workdir), model_max_length=model.config.n_positions)
        return state, source, None
    stored_abstract = dict(abstract, params=plan.stored(abstract["params"]))
    latest, (state, meta) = checkpoint.restore_newest(
        workdir, lambda s: restore_checkpoint(mngr, workdir, s, stored_abstract), steps=mngr.all_steps())
    mngr.reload()
    state = plan.restore_frozen(state, meta, abstract["params"], workdir)
    train_iter.restore(meta["data"])
    if meta.get("data_fingerprint") not in (None, train_rows.fingerprint()):
        raise errors.DataError(f"{workdir}: the checkpoint at step {latest} was trained on other data "
                               f"(fingerprint {meta['data_fingerprint']}, now {train_rows.fingerprint()})")
    return state, f"resumed from step {latest}", latest


class Saver:
    """Saves steps through `mngr` (asynchronously when it is), each with its meta: the model config, the
    data position and fingerprint, the run config, the task's entries and a LoRA run's base reference.

    A failed save (e.g. a full disk) stops the run at the next step, with an error naming the step and
    why; the previous complete checkpoints are untouched (orbax writes a step under a temporary name and
    renames it only when complete)."""

    def __init__(self, mngr: ocp.CheckpointManager, workdir: str, config, cfg: GPTConfig, task, plan: LoraPlan,
                 train_iter, train_rows):
        self.mngr, self.workdir, self.plan = mngr, workdir, plan
        self.meta = dict(cfg=cfg, config=json.loads(config.to_json_best_effort()), extra=task.meta())
        self.train_iter, self.train_rows = train_iter, train_rows
        self.in_flight: Optional[int] = None  # the step whose save has not been confirmed yet

    def save(self, step: int, state: dict) -> None:
        self.check(wait=True)
        meta = checkpoint.model_meta(self.meta["cfg"], data=self.train_iter.state(),
                                     data_fingerprint=self.train_rows.fingerprint(), config=self.meta["config"],
                                     **self.meta["extra"])
        if self.plan.base:  # only the trainable params, and where the frozen ones come from
            state = dict(state, params=self.plan.stored(state["params"]))
            meta["lora_base"] = self.plan.base
        meta["digest"] = damage.state_digest(state)  # what a restore compares the arrays it reads with
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
        self.in_flight = step

    def check(self, wait: bool) -> None:
        """Raise CheckpointSaveError if the save in flight failed. Without `wait`, only when it has
        finished (one process) or never (several processes check only at save points, which they
        reach together)."""
        if self.in_flight is None or (not wait and (jax.process_count() > 1 or self.mngr.is_saving_in_progress())):
            return
        s, self.in_flight = self.in_flight, None
        try:
            self.mngr.wait_until_finished()
            self.mngr.check_for_errors()
            error = None if paths.isdir(paths.join(self.workdir, checkpoint.CHECKPOINT_DIR, str(s))) else \
                RuntimeError(f"step {s} was not finalised (see the orbax error logged above)")
        except Exception as e:  # noqa: BLE001 - whatever the writer raised
            error = e
        if error is not None:
            raise checkpoint.CheckpointSaveError(
                f"saving step {s} to {paths.join(self.workdir, checkpoint.CHECKPOINT_DIR)} failed "
                f"({errors.one_line(error)}); the last complete checkpoint is step "
                f"{checkpoint.latest_step(self.workdir)}. Training stopped instead of going on without checkpoints."
            ) from error

    def close(self) -> None:
        self.check(wait=True)
        self.mngr.close()


# ----------------------------------------------------------------------------------------------------
# The best checkpoint (tasks with a best_metric)
# ----------------------------------------------------------------------------------------------------


def read_best(workdir: str, task) -> float:
    """The best eval metric saved so far in WORKDIR/best (-inf when there is none)."""
    best = paths.join(workdir, checkpoint.BEST_DIR)
    if not task.best_metric or checkpoint.latest_step(best) is None:
        return -np.inf
    return float(checkpoint.read_meta(best)[1].get(task.best_metric, -np.inf))


def save_best(workdir: str, cfg: GPTConfig, params, step: int, task, value: float) -> None:
    """Params-only checkpoint of the best step by `task.best_metric` in WORKDIR/best (replacing the
    previous best only once the new one is complete)."""
    best = paths.join(workdir, checkpoint.BEST_DIR)
    tmp = best + ".saving"
    if jax.process_index() == 0:
        paths.rmtree(tmp)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("best: cleared")
    checkpoint.save_params(tmp, cfg, params, step, **{task.best_metric: value}, **task.meta())
    if jax.process_index() == 0:
        paths.copytree(checkpoint.tokenizer_dir(workdir), checkpoint.tokenizer_dir(tmp))
        paths.rmtree(best)
        paths.rename(tmp, best)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("best: saved")
