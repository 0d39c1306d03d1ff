"""Orbax checkpoints of this project: one layout shared by training runs and `convert`.

    WORKDIR/
      checkpoints/<step>/state   orbax PyTree: {"params": ..., and whatever else the trainer keeps}
      checkpoints/<step>/meta    JSON: {"model": GPTConfig fields, "format_version": 1, ...}
      tokenizer/                 optional tokenizer files (tokenizer.json, vocab.json, merges.txt)
      best/                      MCQA runs: the best step by dev accuracy, itself a workdir of this layout
      checkpoints_bad/<step>-<time>/  steps that did not restore, moved aside (never deleted), with REASON.txt

WORKDIR may be a local folder or an object-store URL such as gs://bucket/run (see core/paths.py).

A LoRA run's steps hold only its trainable params, with meta["lora_base"] naming the base (init_from,
step, sha256 of its weights); `load_model` and `restore_lora_run` read the frozen rest from there.

`load_model` restores only `state["params"]` (orbax partial restore), so it reads both a converted
HF checkpoint and a full training state (params + optimizer + data position) written by the trainer.

A damaged step (a checksum mismatch, a truncated or missing file, meta that does not parse) does not
stop a run: `restore_newest` says so in one line, moves the step aside into `checkpoints_bad/` so it
never counts as "latest" again, and restores the next older step. With no step left it raises
`NoGoodCheckpoint`, listing every step and why. `python -m biomedlm_jax.checkpoint verify
--workdir=DIR` reads every step and reports each as ok or bad.
"""
from __future__ import annotations

from biomedlm_jax.core import errors
from biomedlm_jax.formats.checkpoint import verify


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.checkpoint", description="Checkpoint tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="read every step of a workdir; exit 1 if the latest step is bad")
    v.add_argument("--workdir", required=True)
    errors.add_verbose_flag(v)
    args = p.parse_args(argv)
    return 0 if verify(args.workdir) else 1



if __name__ == "__main__":
    raise SystemExit(main())
