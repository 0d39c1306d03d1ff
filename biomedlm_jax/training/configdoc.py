"""The generated config reference (docs/configs.md): every key of every shipped config with its
description (`FIELDS`), and `undocumented`, which names keys that gained no description."""
from __future__ import annotations

import os

from biomedlm_jax.training import configlib

CONFIGS = {
    "configs/pretrain.py": ("tiny", "gpt2-small", "biomedlm-2.7b"),
    "configs/seq2seq.py": ("tiny", "medquad"),
    "configs/mcqa.py": ("pubmedqa-tiny", "pubmedqa", "medqa", "medqa+medmcqa", "medmcqa", "mmlu_medical", "bioasq"),
}

FIELDS = {
    # run
    "init_from": "Start from `hf:DIR` (an HF GPT-2/BioMedLM checkpoint) or `orbax:WORKDIR` (another run's latest params). Ignored when the workdir already holds checkpoints (the run resumes).",
    "seed": "Seeds the init, the data order and dropout.",
    "seq_len": "Tokens per training row (LM: rows of seq_len + 1 tokens; MCQA: max tokens per option).",
    "global_batch_size": "Sequences (or questions) per optimizer step, over all devices and micro-batches.",
    "loss_chunk_size": "LM and seq2seq loss: compute the tied head's logits this many positions at a time "
                       "(rematerialised in the backward pass) instead of holding (batch, seq_len, vocab); "
                       "0 = off.",
    "logits_hbm_fraction": "With loss_chunk_size 0: when a micro-batch's fp32 logits and their gradient "
                           "(2 x batch per device x seq_len x vocab x 4 bytes) would exceed this share of the "
                           "device's HBM, compute them in the largest power-of-two chunk of positions that fits it; "
                           "0 = never. Devices that report no HBM size (CPU) never chunk.",
    "grad_accum_steps": "Micro-batches per step; global_batch_size must divide by it.",
    "num_train_steps": "Optimizer steps; also the length of the LR schedule.",
    "warmup_steps": "Linear warmup from 0 to learning_rate.",
    "warmup_ratio": "> 0: warm up over ceil(warmup_ratio * num_train_steps) steps instead of warmup_steps (HF Trainer's warmup_ratio; BioMedLM's fine-tuning used 0.5).",
    "learning_rate": "Peak learning rate.",
    "lr_decay": "After warmup: cosine | linear | constant.",
    "lr_final_ratio": "The decay ends at learning_rate * lr_final_ratio.",
    "optimizer.b1": "Adam beta1.",
    "optimizer.b2": "Adam beta2.",
    "optimizer.eps": "Adam epsilon.",
    "optimizer.weight_decay": "Decoupled weight decay on tensors with ndim >= 2 (see decay_mode).",
    "optimizer.decay_mode": "composer (BioMedLM: per-step shrink (lr_t / lr_peak) * wd) | optax (lr_t * wd).",
    "optimizer.grad_clip_norm": "Clip gradients to this global norm (0 = off).",
    "optimizer.max_consecutive_nonfinite": "Stop the run after this many consecutive skipped (NaN/Inf) steps.",
    "optimizer.mu_dtype": "Adam first moment's storage dtype (\"\" = the params' fp32; \"bfloat16\" halves it).",
    "optimizer.nu_dtype": "Adam second moment's storage dtype (\"\" = fp32; \"bfloat16\" halves it).",
    "lora.rank": "LoRA adapter rank on the targeted projections; 0 = off (full fine-tuning). See models/lora.py.",
    "lora.alpha": "LoRA scale numerator: the adapter's output is multiplied by alpha / rank.",
    "lora.dropout": "Dropout on the adapters' input (training only).",
    "lora.targets": "Comma-separated projections to adapt: qkv, attn_out, mlp_in, mlp_out.",
    "lora.base_dtype": "Storage dtype of the frozen base weights in a LoRA run (\"\" = param dtype; e.g. bfloat16).",
    "lora.from_peft": "Start the adapters from an HF PEFT LoRA directory for GPT-2 (with init_from=hf:BASE).",
    "log_every_steps": "Train metrics (metrics.jsonl, TensorBoard, progress bar) every N steps.",
    "eval_every_steps": "Held-out evaluation every N steps (and at step 0 and the end).",
    "eval_batches": "Held-out batches per evaluation (0 = all).",
    "checkpoint_every_steps": "Save a checkpoint every N steps (and at the end and on SIGTERM).",
    "keep_checkpoints": "Checkpoints kept in WORKDIR/checkpoints (MCQA also keeps WORKDIR/best).",
    "async_checkpoints": "Write checkpoints in the background.",
    "progress_bar": "tqdm progress bar on process 0.",
    "peak_flops_per_device": "Peak FLOP/s for the MFU estimate (0 = look up the device kind; CPU has none).",
    "mesh_shape": "(data, fsdp, tensor) device mesh; -1 = all remaining devices.",
    "logical_axis_rules": "Logical axis name -> mesh axes (default sharding.DEFAULT_RULES).",
    # model
    "model.variant": "Model size from model.VARIANTS (tiny, bench-cpu, gpt2-small, gpt2-medium, biomedlm-2.7b); fields below override it. With init_from, the checkpoint decides the architecture.",
    "model.vocab_size": "Vocabulary size (None = variant / checkpoint).",
    "model.n_positions": "Learned positions (max sequence length).",
    "model.d_model": "Hidden size.",
    "model.n_layer": "Transformer blocks.",
    "model.n_head": "Attention heads.",
    "model.d_ff": "MLP width (None = 4 * d_model).",
    "model.activation": "MLP activation (HF names: gelu_new, gelu, relu, silu, ...).",
    "model.layer_norm_epsilon": "LayerNorm epsilon.",
    "model.embd_pdrop": "Embedding dropout.",
    "model.attn_pdrop": "Attention-probability dropout.",
    "model.resid_pdrop": "Residual dropout.",
    "model.initializer_range": "Std of the normal init.",
    "model.scale_attn_weights": "Divide attention scores by sqrt(head_dim).",
    "model.scale_attn_by_inverse_layer_idx": "Also divide layer i's scores by i + 1 (set in BioMedLM).",
    "model.reorder_and_upcast_attn": "HF flag kept for round trips (scores are always fp32 here).",
    "model.bos_token_id": "BOS id stored in HF configs.",
    "model.eos_token_id": "EOS id stored in HF configs.",
    "model.pad_token_id": "PAD id stored in HF configs.",
    "model.dtype": "Compute dtype (bfloat16 on accelerators); LayerNorm, softmax and loss stay fp32.",
    "model.param_dtype": "Parameter / optimizer-state dtype (fp32 master weights).",
    "model.attention_impl": "auto | xla | cudnn (cuDNN flash attention on GPU, bf16/fp16 only).",
    "model.remat_policy": "none | full | dots_saveable | dots_with_no_batch_dims_saveable.",
    "model.scan_layers": "nn.scan over blocks (compile time independent of depth).",
    "model.kv_cache_layout": "auto | heads_major | seq_major: generation's KV cache axes (auto: seq_major on TPU, where the compiler copied a heads-major cache in and out of the decode loop; heads_major elsewhere, faster on CPU).",
    # data: shared
    "data.task": "lm (next-token on documents) | seq2seq (answer-only loss) | mcqa (classifier head).",
    "data.tokenizer": "Tokenizer directory; empty = the one stored with init_from (or the workdir's).",
    "data.shuffle": "Shuffle rows each epoch (seeded).",
    # data: lm
    "data.prepared_dir": "A prepare_data output directory (memory-mapped rows, its tokenizer and split); overrides train_files / eval_files / tokenizer.",
    "data.train_files": "Comma-separated globs of JSONL / PubTator / PubMed XML / JATS, tokenized at start-up.",
    "data.eval_files": "Held-out files; empty = documents whose id hashes into eval_fraction.",
    "data.eval_fraction": "Share of documents held out by id hash (when eval_files is empty).",
    # data: seq2seq
    "data.format": "seq2seq data: medquad | jsonl | textgen.",
    "data.path": "seq2seq data: a MedQuAD folder, JSONL glob(s), or a textgen directory.",
    "data.layout": "seq2seq rows: biomedlm (BioMedLM's `source <|startoftext|> target <|endoftext|>`, [PAD] added) | template (prompt_template + answer_prefix + answer + EOS); empty = biomedlm for textgen, template otherwise.",
    "data.max_source_length": "biomedlm layout: source tokens kept (from the start), BioMedLM's max_source_length.",
    "data.max_target_length": "biomedlm layout: target tokens kept (from the start), BioMedLM's train/eval_max_target_length.",
    "data.prompt_template": "template layout: the prompt, with {question}.",
    "data.answer_prefix": "template layout: text before the answer (e.g. a space).",
    "data.split_seed": "Seed of the document-level train/dev/test split.",
    "data.dev_fraction": "Share of documents in dev.",
    "data.test_fraction": "Share of documents in test.",
    "data.on_error": "raise | skip (count) bad records.",
    "data.max_examples": "Use at most N examples per split (0 = all).",
    "data.pack": "seq2seq: pack several examples per row (segment ids keep attention inside each example).",
    "data.generate_examples": "Dev questions answered after training for ROUGE-L (0 = skip).",
    "data.max_new_tokens": "Generation length for that eval.",
    "data.no_repeat_ngram_size": "Ban repeated n-grams in that eval (BioMedLM used 6).",
    # data: mcqa
    "data.mcqa_task": "medqa | medmcqa | pubmedqa | bioasq | mmlu_medical (see mcqa_data.REGISTRY).",
    "data.train": "Training file (PATH or PATH:SPLIT).",
    "data.dev": "Dev file (PATH or PATH:SPLIT); empty with carve_dev_fraction > 0.",
    "data.extra_train": "More training items for the same head, never used for dev: comma-separated TASK=PATH[:SPLIT] (e.g. medmcqa=train.json for MedQA).",
    "data.carve_dev_fraction": "> 0: carve train/dev from data.train by a seeded hash (for data with only dev/test locally).",
    "data.truncation": "biomedlm (what tokenizer(first, second, truncation=True) does: longest_first from the right) | left (cut the first segment from the left; the question / option survive).",
    "data.append_eos": "seqcls head: BioMedLM's gpt2_append_eos_tok (EOS after the text, or over the last token of a full row); off in its published command.",
}



def _leaves(d, prefix=""):
    for k, v in d.items():
        if hasattr(v, "items"):
            yield from _leaves(v, prefix + k + ".")
        else:
            yield prefix + k, v



def _fmt(v, repo: str) -> str:
    if isinstance(v, str):
        v = v.replace(repo + os.sep, "").replace(os.path.dirname(repo) + os.sep, "../")
        return f"`{v}`" if v else "`\"\"`"
    if isinstance(v, tuple) and len(v) > 4:
        return "(see models/sharding.py)"
    return f"`{v}`"



def render(repo: str = ".") -> str:
    """docs/configs.md of the checkout at `repo` (its configs/ folder)."""
    repo = os.path.abspath(repo)
    out = ["# Config reference", "",
           "Generated by `python -m biomedlm_jax.configdoc > docs/configs.md` from the config files; a test keeps "
           "it in sync. Override any key on the command line: `--config.learning_rate=3e-4 --config.model.n_layer=4`. "
           "Configs are locked, so a misspelled key is an error. Model fields shown as `None` come from `model.variant` "
           "(or the `init_from` checkpoint).", ""]
    for path, variants in CONFIGS.items():
        configs = {v: dict(_leaves(configlib.load_config_file(os.path.join(repo, path), v))) for v in variants}
        keys = sorted(set().union(*configs.values()), key=lambda k: (k.count("."), k))
        out += [f"## `{path}`", "", "| key | meaning | " + " | ".join(f"`{v}`" for v in variants) + " |",
                "|---|---|" + "---|" * len(variants)]
        for k in keys:
            meaning = FIELDS.get(k, "**undocumented**").replace("|", "\\|")
            out.append(f"| `{k}` | {meaning} | "
                       + " | ".join(_fmt(configs[v].get(k, ""), repo) if k in configs[v] else "" for v in variants) + " |")
        out.append("")
    return "\n".join(out)



def undocumented(repo: str = ".") -> list[str]:
    keys = set()
    for path, variants in CONFIGS.items():
        for v in variants:
            keys |= {k for k, _ in _leaves(configlib.load_config_file(os.path.join(repo, path), v))}
    return sorted(keys - set(FIELDS))
