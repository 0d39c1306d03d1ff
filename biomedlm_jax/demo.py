"""`make demo`: the BioMedLM pipeline end to end on the tiny config and the sample data in `data/`.

Stages so far (later issues add theirs: domain tokenizer -> MCQA -> seq2seq):
  1. pretrain the `tiny` GPT with the real trainer (`configs/pretrain.py:tiny`, `train_and_evaluate`):
     the shipped PubMed abstracts are tokenized (GPT-2 tokenizer), packed, batched on a device mesh;
     held-out loss before/after, tokens/s, orbax checkpoints in demo_out/pretrain;
  2. export the latest checkpoint to HF safetensors (loadable by transformers.GPT2LMHeadModel),
     reload, check logits match;
  3. convert HF -> orbax -> HF with the `convert` CLI code path and check again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax import checkpoint, configlib, convert, hf, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.demo")
    p.add_argument("--workdir", default=os.path.join(REPO, "demo_out"))
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    t_start = time.time()
    print(f"== biomedlm-jax demo  (jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)) ==")

    # 1. pretraining ------------------------------------------------------------------------------------
    config = configlib.load_config_file(os.path.join(REPO, "configs", "pretrain.py"), "tiny")
    config.num_train_steps = args.steps
    config.eval_every_steps = args.steps
    config.checkpoint_every_steps = args.steps
    pre_dir = os.path.join(args.workdir, "pretrain")
    print(f"[pretrain] configs/pretrain.py:tiny  {config.num_train_steps} steps x {config.global_batch_size} x "
          f"{config.seq_len} tokens, data {os.path.relpath(config.data.train_files, REPO)}")
    s = train.train_and_evaluate(config, pre_dir)
    before, after = s["initial_eval_loss"], s["eval_loss"]
    print(f"[pretrain] held-out loss {before:.3f} -> {after:.3f}  (perplexity {np.exp(before):,.0f} -> "
          f"{np.exp(after):,.1f}); {s['tokens_per_s']:,.0f} tokens/s; checkpoints in {os.path.relpath(pre_dir)}")
    model, params = checkpoint.load_model(pre_dir)
    probe = jnp.asarray(np.arange(2 * 64, dtype=np.int32).reshape(2, 64) * 37 % model.config.vocab_size)
    ref = model.apply({"params": params}, probe)

    # 2. HF export / reload ----------------------------------------------------------------------------
    hf_dir = os.path.join(args.workdir, "hf")
    convert.convert(f"orbax:{pre_dir}", f"hf:{hf_dir}")
    model2, params2 = hf.load_pretrained(hf_dir)
    diff = float(jnp.abs(model2.apply({"params": params2}, probe) - ref).max())
    print(f"[export] orbax:{os.path.relpath(pre_dir)} -> HF GPT2LMHeadModel safetensors -> {os.path.relpath(hf_dir)} ({sorted(os.listdir(hf_dir))}); "
          f"reloaded max|dlogits| = {diff:.1e}")

    # 3. HF -> orbax -> HF ------------------------------------------------------------------------------
    orbax_dir, hf2_dir = os.path.join(args.workdir, "orbax"), os.path.join(args.workdir, "hf_roundtrip")
    convert.convert(f"hf:{hf_dir}", f"orbax:{orbax_dir}")
    convert.convert(f"orbax:{orbax_dir}", f"hf:{hf2_dir}")
    model3, params3 = hf.load_pretrained(hf2_dir)
    diff3 = float(jnp.abs(model3.apply({"params": params3}, probe) - ref).max())
    print(f"[convert] hf -> orbax:{os.path.relpath(orbax_dir)} -> hf:{os.path.relpath(hf2_dir)}; max|dlogits| = {diff3:.1e}")
    if diff > 1e-5 or diff3 > 1e-5 or not after < before:
        raise SystemExit("demo FAILED: export round trip changed logits or training did not reduce held-out loss")
    print(f"== demo done in {time.time() - t_start:.0f}s ==")


if __name__ == "__main__":
    main()
