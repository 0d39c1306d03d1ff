"""Pretraining configs: `python -m biomedlm_jax.pretrain --config=configs/pretrain.py:VARIANT --workdir=DIR`.

Variants
  tiny           2-layer GPT on the abstracts shipped in data/ (GPT-2 tokenizer); a CPU run of ~1 minute.
  gpt2-small     124M GPT-2 with nanoGPT's recipe (lr 6e-4, 2k warmup, cosine to 10%, wd 0.1, b2 0.95,
                 ~0.5M-token batches); point `data.train_files` at your corpus.
  biomedlm-2.7b  BioMedLM's published recipe, from the model card (huggingface.co/stanford-crfm/BioMedLM,
                 "Training Details") and the paper (Bolton et al. 2024, arXiv:2403.18421):
                 32 layers x 2560, 20 heads, vocab 28,896, sequence 1024, global batch 1024 sequences,
                 300B tokens (= 286,102 steps of 1,048,576 tokens, ~8.7 passes over 34.6B tokens),
                 Decoupled AdamW (Composer semantics, see optim.py) with lr 1.6e-4 and weight decay
                 1.6e-5, bf16 compute with fp32 params and optimizer state, FSDP.
                 Not published, so chosen here: b1/b2/eps 0.9/0.95/1e-8, linear warmup over 1% of the
                 steps, cosine decay to 10% of the peak, global-norm clipping at 1.0, no dropout.
                 Needs `data.tokenizer` = the BioMedLM tokenizer (or `init_from=hf:DIR` holding one).

Every key can be overridden: `--config.learning_rate=3e-4 --config.model.n_layer=4`. The config is
locked, so a misspelled key is an error. `model` fields left None come from `model.variant` (or, with
`init_from`, from that checkpoint).
"""
import os

import ml_collections

from biomedlm_jax import configlib, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_ABSTRACTS = os.path.join(REPO, "data", "pubmed_abstracts", "abstracts.jsonl")
GPT2_TOKENIZER = os.path.join(REPO, "data", "gpt2_tokenizer")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = configlib.model_section("tiny")
    # "" = random init; "hf:DIR" = continue from an HF GPT-2/BioMedLM checkpoint; "orbax:WORKDIR" = from
    # another run's latest checkpoint (params only). A workdir that already holds checkpoints always resumes.
    c.init_from = ""
    c.seed = 0

    c.seq_len = 128
    c.global_batch_size = 8  # sequences per optimizer step, across all devices and micro-batches
    c.grad_accum_steps = 1  # micro-batches per step (global_batch_size must divide by it)
    c.num_train_steps = 150
    c.warmup_steps = 15
    c.learning_rate = 3e-3  # peak
    c.lr_decay = "cosine"  # cosine | linear | constant
    c.lr_final_ratio = 0.1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 3e-4  # Composer semantics: per-step shrink (lr_t / lr_peak) * weight_decay
    c.optimizer.decay_mode = "composer"  # composer | optax
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.max_consecutive_nonfinite = 10  # stop the run after this many skipped steps in a row

    c.log_every_steps = 10
    c.eval_every_steps = 50
    c.eval_batches = 0  # 0 = the whole held-out set
    c.checkpoint_every_steps = 50
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.progress_bar = True
    c.peak_flops_per_device = 0.0  # 0 = look up the device kind (metrics.PEAK_FLOPS); CPU has none

    c.mesh_shape = (-1, 1, 1)  # ("data", "fsdp", "tensor"); -1 = all remaining devices
    c.logical_axis_rules = sharding.DEFAULT_RULES

    c.data = ml_collections.ConfigDict()
    # A directory from `python -m biomedlm_jax.prepare_data` (memory-mapped rows, its own tokenizer and
    # train/validation split). When set, train_files / eval_files / tokenizer are not used.
    c.data.prepared_dir = ""
    c.data.train_files = SAMPLE_ABSTRACTS  # comma-separated globs of JSONL ({"text"} or {"title","abstract"})
    c.data.eval_files = ""  # "" = hold out documents by a hash of their id
    c.data.eval_fraction = 0.05
    c.data.tokenizer = GPT2_TOKENIZER  # "" = take it from init_from
    c.data.shuffle = True
    return c


def get_config(arg=None):
    variant = arg or "tiny"
    c = base_config()
    if variant == "tiny":
        c.model = configlib.model_section("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    elif variant == "gpt2-small":
        c.model = configlib.model_section(
            "gpt2-small", dtype="bfloat16", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
        )
        c.seq_len = 1024
        c.global_batch_size = 512
        c.grad_accum_steps = 4
        c.num_train_steps = 600_000
        c.warmup_steps = 2_000
        c.learning_rate = 6e-4
        c.optimizer.decay_mode = "optax"
        c.optimizer.weight_decay = 0.1
        c.log_every_steps = 100
        c.eval_every_steps = 2_000
        c.eval_batches = 50
        c.checkpoint_every_steps = 2_000
    elif variant == "biomedlm-2.7b":
        c.model = configlib.model_section(
            "biomedlm-2.7b", dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"
        )
        c.seq_len = 1024
        c.global_batch_size = 1024
        c.grad_accum_steps = 1  # raise it when 1024 sequences do not fit the slice in one step
        c.num_train_steps = 286_102  # 300e9 tokens / (1024 * 1024)
        c.warmup_steps = 2_861  # 1% (not published)
        c.learning_rate = 1.6e-4
        c.optimizer.decay_mode = "composer"
        c.optimizer.weight_decay = 1.6e-5
        c.mesh_shape = (1, -1, 1)  # FSDP over all devices, as BioMedLM trained (PyTorch FSDP)
        c.log_every_steps = 50
        c.eval_every_steps = 2_000
        c.eval_batches = 50
        c.checkpoint_every_steps = 1_000
        c.data.tokenizer = ""
    else:
        raise ValueError(f"unknown pretrain variant {variant!r}; choose tiny, gpt2-small or biomedlm-2.7b")
    c.lock()
    return c
