"""`make demo`: the BioMedLM pipeline end to end on the tiny config and the sample data in `data/`.

Stages so far (later issues add theirs: domain tokenizer -> sharded pretraining -> MCQA -> seq2seq):
  1. tokenize the shipped PubMed abstracts with the GPT-2 tokenizer, pack into fixed-length rows;
  2. train the `tiny` GPT for a few steps with AdamW, report held-out loss before/after;
  3. export to HF safetensors (loadable by transformers.GPT2LMHeadModel), reload, check logits match;
  4. convert HF -> orbax -> HF with the `convert` CLI code path and check again.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from biomedlm_jax import convert, hf, losses, optim
from biomedlm_jax import model as model_lib
from biomedlm_jax import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data")


def read_abstracts(path: str):
    """{split: [title + "\\n" + abstract, ...]} from the shipped JSONL sample."""
    docs: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                d = json.loads(line)
                text = f"{d['title']}\n{d['abstract']}".strip()
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{i}: bad record: {e}") from e
            docs.setdefault(d.get("split", "train"), []).append(text)
    return docs


def pack(tok, texts, seq_len: int) -> np.ndarray:
    """Concatenate documents separated by <|endoftext|>, cut into (N, seq_len) rows (remainder dropped)."""
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.demo")
    p.add_argument("--workdir", default=os.path.join(REPO, "demo_out"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    t_start = time.time()
    print(f"== biomedlm-jax demo  (jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)) ==")

    # 1. data -----------------------------------------------------------------------------------------
    tok = tokenizer_lib.load_tokenizer(os.path.join(DATA, "gpt2_tokenizer"))
    docs = read_abstracts(os.path.join(DATA, "pubmed_abstracts", "abstracts.jsonl"))
    train, heldout = pack(tok, docs["train"], args.seq_len), pack(tok, docs["dev"], args.seq_len)
    print(f"[data]   {len(docs['train'])} train / {len(docs['dev'])} held-out PubMed abstracts, GPT-2 tokenizer "
          f"({tok.get_vocab_size()} tokens) -> {train.size:,} / {heldout.size:,} tokens in rows of {args.seq_len}")

    # 2. model + a few training steps ------------------------------------------------------------------
    cfg = model_lib.get_config("tiny", n_positions=max(args.seq_len, 128), embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = model_lib.GPT(cfg)
    params = model_lib.init_params(model, jax.random.PRNGKey(0))
    print(f"[model]  tiny GPT: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, "
          f"{model_lib.param_count(params) / 1e6:.2f}M params")
    schedule = optim.lr_schedule(args.lr, warmup_steps=max(1, args.steps // 10), total_steps=args.steps)
    opt = optim.adamw(schedule, args.lr, weight_decay=0.1, decay_mode="optax", grad_clip_norm=1.0)
    opt_state = opt.init(params)

    @jax.jit
    def eval_loss(params, batch):
        return losses.next_token_loss(model.apply({"params": params}, batch), batch)[0]

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: eval_loss(p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_rows = jnp.asarray(heldout[:64])
    before = float(eval_loss(params, eval_rows))
    rng = np.random.default_rng(0)
    params, opt_state, _ = train_step(params, opt_state, jnp.asarray(train[: args.batch]))  # compile
    t0 = time.time()
    for step in range(1, args.steps):
        batch = jnp.asarray(train[rng.integers(0, len(train), args.batch)])
        params, opt_state, loss = train_step(params, opt_state, batch)
    loss = float(loss)
    dt = time.time() - t0
    after = float(eval_loss(params, eval_rows))
    tps = (args.steps - 1) * args.batch * args.seq_len / dt
    print(f"[train]  {args.steps} AdamW steps, batch {args.batch}x{args.seq_len}: last train loss {loss:.3f}, "
          f"{tps:,.0f} tokens/s")
    print(f"[eval]   held-out loss {before:.3f} -> {after:.3f}  (perplexity {np.exp(before):,.0f} -> {np.exp(after):,.1f})")

    # 3. HF export / reload ----------------------------------------------------------------------------
    hf_dir = os.path.join(args.workdir, "hf")
    hf.save_pretrained(model, params, hf_dir, tokenizer=tok)
    model2, params2 = hf.load_pretrained(hf_dir)
    probe = jnp.asarray(heldout[:2])
    ref = model.apply({"params": params}, probe)
    diff = float(jnp.abs(model2.apply({"params": params2}, probe) - ref).max())
    print(f"[export] HF GPT2LMHeadModel safetensors -> {os.path.relpath(hf_dir)} ({sorted(os.listdir(hf_dir))}); "
          f"reloaded max|dlogits| = {diff:.1e}")

    # 4. HF -> orbax -> HF ------------------------------------------------------------------------------
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
