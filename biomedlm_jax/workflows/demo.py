"""`make demo`'s pipeline (`run`), behind `python -m biomedlm_jax.demo`, whose docstring lists the stages:
a domain tokenizer, corpus preparation, pretraining, seq2seq and MCQA fine-tuning, the paper-style
table, and HF / orbax round trips with their logits checked."""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.data import packing, prepare, readers
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.evaluation import mcqa_eval
from biomedlm_jax.formats import checkpoint, hf
from biomedlm_jax.tasks import mcqa, mcqa_data, seq2seq
from biomedlm_jax.training import configlib, trainer
from biomedlm_jax.workflows import convert

EVAL_FRACTION = 0.1  # held-out abstracts (by PMID hash) for the tokenizer study and eval loss


def run(repo: str = ".", workdir: str = "demo_out", steps: int = 150, vocab_size: int = 16384,
        seq2seq_steps: int = 100) -> None:
    """The whole pipeline (the stages in the module docstring) on `repo`'s configs/ and data/ samples,
    written under `workdir` (emptied first)."""
    given = repo
    repo = os.path.abspath(repo)
    data = os.path.join(repo, "data")
    if not (os.path.isdir(os.path.join(repo, "configs")) and os.path.isdir(data)):
        raise SystemExit(f"--repo={given}: no configs/ and data/ folders there; run the demo from the biomedlm-jax "
                         "checkout (make demo) or pass --repo=CHECKOUT")
    shutil.rmtree(workdir, ignore_errors=True)
    t_start = time.time()
    print(f"== biomedlm-jax demo  (jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)) ==")

    # 1. domain tokenizer ------------------------------------------------------------------------------
    abstracts = os.path.join(data, "pubmed_abstracts", "abstracts.jsonl")
    docs = list(readers.read_documents([abstracts]))
    held = [t for d, t in docs if packing.in_eval_split(d, EVAL_FRACTION)]
    tok = tokenizer_lib.train_bpe((t for d, t in docs if not packing.in_eval_split(d, EVAL_FRACTION)),
                                  vocab_size=vocab_size, show_progress=False)
    tok_dir = os.path.join(workdir, "tokenizer")
    tokenizer_lib.save_tokenizer(tok, tok_dir)
    gpt2 = tokenizer_lib.load_tokenizer(os.path.join(data, "gpt2_tokenizer"))
    cmp = tokenizer_lib.compare({"pubmed": tok, "gpt2": gpt2}, held, ["thrombocytopenia", "pharmacokinetics"])["tokenizers"]
    print(f"[tokenizer] PubMed BPE ({tok.get_vocab_size():,} tokens) trained on {len(docs) - len(held):,} abstracts; "
          f"on {len(held)} held-out: {cmp['pubmed']['tokens_per_word']:.3f} tokens/word vs GPT-2 "
          f"{cmp['gpt2']['tokens_per_word']:.3f}; thrombocytopenia = {' | '.join(p.strip() for p in cmp['pubmed']['terms']['thrombocytopenia'])}"
          f" vs {' | '.join(p.strip() for p in cmp['gpt2']['terms']['thrombocytopenia'])}")

    # 2. offline preparation ----------------------------------------------------------------------------
    config = configlib.load_config_file(os.path.join(repo, "configs", "pretrain.py"), "tiny")
    data_dir = os.path.join(workdir, "data")
    m = prepare.prepare([abstracts], tok_dir, data_dir, seq_len=config.seq_len, eval_fraction=EVAL_FRACTION,
                             progress=False)
    print(f"[prepare] {m['read_stats']['documents']:,} documents -> {m['splits']['train']['rows']:,} train / "
          f"{m['splits']['validation']['rows']:,} validation rows of {m['row_len']} tokens in {os.path.relpath(data_dir)}")

    # 3. pretraining ------------------------------------------------------------------------------------
    config.data.prepared_dir = data_dir
    config.model.vocab_size = tok.get_vocab_size()
    config.num_train_steps = steps
    config.eval_every_steps = steps
    config.checkpoint_every_steps = steps
    pre_dir = os.path.join(workdir, "pretrain")
    print(f"[pretrain] configs/pretrain.py:tiny  {config.num_train_steps} steps x {config.global_batch_size} x "
          f"{config.seq_len} tokens, vocab {config.model.vocab_size:,}")
    s = trainer.train_and_evaluate(config, pre_dir)
    before, after = s["initial_eval_loss"], s["eval_loss"]
    print(f"[pretrain] held-out loss {before:.3f} -> {after:.3f}  (perplexity {np.exp(before):,.0f} -> "
          f"{np.exp(after):,.1f}); {s['tokens_per_s']:,.0f} tokens/s; checkpoints in {os.path.relpath(pre_dir)}")
    # 4. seq2seq fine-tuning + generation ---------------------------------------------------------------
    s2s = configlib.load_config_file(os.path.join(repo, "configs", "seq2seq.py"), "tiny")
    s2s.init_from = f"orbax:{pre_dir}"
    s2s.num_train_steps = seq2seq_steps
    s2s.eval_every_steps = s2s.checkpoint_every_steps = seq2seq_steps
    s2s.progress_bar = False
    s2s_dir = os.path.join(workdir, "seq2seq")
    print(f"[seq2seq] configs/seq2seq.py:tiny from orbax:{os.path.relpath(pre_dir)}, {seq2seq_steps} steps on "
          f"{os.path.relpath(s2s.data.path, repo)}")
    s2 = seq2seq.finetune(s2s, s2s_dir)
    print(f"[seq2seq] held-out answer loss {s2['initial_eval_loss']:.3f} -> {s2['eval_loss']:.3f}; ROUGE-L {s2['rougeL']:.4f}")

    # 5. MCQA fine-tuning + evaluation ------------------------------------------------------------------
    mc = configlib.load_config_file(os.path.join(repo, "configs", "mcqa.py"), "pubmedqa-tiny")
    mc.init_from = f"orbax:{pre_dir}"
    mc.progress_bar = False
    mc_dir = os.path.join(workdir, "mcqa")
    print(f"[mcqa] configs/mcqa.py:pubmedqa-tiny from orbax:{os.path.relpath(pre_dir)}, {mc.num_train_steps} steps")
    t0 = time.time()
    m3 = mcqa.finetune(mc, mc_dir)
    epoch_s = (time.time() - t0) * m3["train_rows"] / (mc.num_train_steps * mc.global_batch_size)
    results = mcqa_eval.evaluate(mcqa_eval.parse_tasks("pubmedqa", data), workdir=mc_dir, progress=False)
    steady = m3["train_rows"] * mc.seq_len / m3["tokens_per_s"]
    print(f"[mcqa] best dev accuracy {m3['best_accuracy']:.3f} (step {m3['best_step']}); one PubMedQA epoch "
          f"({m3['train_rows']} questions) takes {steady:.2f}s of training steps ({epoch_s:.1f}s with compile and eval)\n"
          + mcqa_eval.results_table(results))

    model, params = checkpoint.load_model(pre_dir)
    probe = jnp.asarray(np.arange(2 * 64, dtype=np.int32).reshape(2, 64) * 37 % model.config.vocab_size)
    ref = model.apply({"params": params}, probe)

    # 6. HF export / reload ----------------------------------------------------------------------------
    hf_dir = os.path.join(workdir, "hf")
    convert.convert(f"orbax:{pre_dir}", f"hf:{hf_dir}")
    model2, params2 = hf.load_pretrained(hf_dir)
    diff = float(jnp.abs(model2.apply({"params": params2}, probe) - ref).max())
    print(f"[export] orbax:{os.path.relpath(pre_dir)} -> HF GPT2LMHeadModel safetensors -> {os.path.relpath(hf_dir)} ({sorted(os.listdir(hf_dir))}); "
          f"reloaded max|dlogits| = {diff:.1e}")

    # 7. HF -> orbax -> HF ------------------------------------------------------------------------------
    orbax_dir, hf2_dir = os.path.join(workdir, "orbax"), os.path.join(workdir, "hf_roundtrip")
    convert.convert(f"hf:{hf_dir}", f"orbax:{orbax_dir}")
    convert.convert(f"orbax:{orbax_dir}", f"hf:{hf2_dir}")
    model3, params3 = hf.load_pretrained(hf2_dir)
    diff3 = float(jnp.abs(model3.apply({"params": params3}, probe) - ref).max())
    print(f"[convert] hf -> orbax:{os.path.relpath(orbax_dir)} -> hf:{os.path.relpath(hf2_dir)}; max|dlogits| = {diff3:.1e}")

    # 8. the fine-tuned PubMedQA classifier, exported with its head (transformers' GPT2ForSequenceClassification)
    clf_dir = os.path.join(workdir, "hf_pubmedqa")
    convert.convert(f"orbax:{mc_dir}", f"hf:{clf_dir}")
    dev = mcqa_data.load_pubmedqa(os.path.join(repo, "data", "pubmedqa", "ori_pqal.json"), "dev")
    ours, exported = mcqa.load_classifier(f"orbax:{mc_dir}"), mcqa.load_classifier(f"hf:{clf_dir}")
    scores = [mcqa.predict(c.model, c.params, mcqa_data.encode(dev, c.tok, "seqcls", mc.seq_len)) for c in (ours, exported)]
    diff4 = float(np.abs(scores[0] - scores[1]).max())
    print(f"[export] orbax:{os.path.relpath(mc_dir)} (best) -> {os.path.relpath(clf_dir)} "
          f"({json.load(open(os.path.join(clf_dir, 'config.json')))['architectures'][0]}, labels "
          f"{'/'.join(exported.head['labels'])}); {len(dev)} dev questions, max|dlogits| = {diff4:.1e}")
    if diff > 1e-5 or diff3 > 1e-5 or diff4 > 1e-5 or not after < before or not s2["eval_loss"] < s2["initial_eval_loss"]:
        raise SystemExit("demo FAILED: export round trip changed logits or training did not reduce held-out loss")
    print(f"== demo done in {time.time() - t_start:.0f}s ==")

