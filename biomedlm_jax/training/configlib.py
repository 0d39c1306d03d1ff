"""Helpers for ml_collections configs: the `model` section and how it resolves to a GPTConfig.

A config's `model` section holds `variant` (a name from `model.VARIANTS`) and one typed placeholder
per `GPTConfig` field, all None by default: `--config.model.n_layer=4` overrides that field, and the
locked config rejects a misspelled field. Fields left None come from the variant, or from the
checkpoint when the run starts from one (`init_from`).
"""
from __future__ import annotations

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from biomedlm_jax.models import gpt_config, sharding
from biomedlm_jax.models.gpt_config import GPTConfig

# Fields that change the shapes or the math of the weights. Starting from a checkpoint, the checkpoint
# decides them; a config that sets one to a different value is an error (not a silent reinit).
ARCHITECTURE_FIELDS = (
    "vocab_size", "n_positions", "d_model", "n_layer", "n_head", "d_ff", "activation", "layer_norm_epsilon",
    "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
)


def _field_types() -> dict[str, type]:
    """GPTConfig fields a `model` section exposes; the LoRA ones come from the `lora` section instead."""
    hints = typing.get_type_hints(GPTConfig)
    out = {}
    for f in dataclasses.fields(GPTConfig):
        if f.name.startswith("lora_"):
            continue
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        out[f.name] = args[0] if args else t
    return out


def model_section(variant: str, **fields) -> ml_collections.ConfigDict:
    """ConfigDict(variant=..., <every GPTConfig field>=placeholder) with `fields` set."""
    if variant not in gpt_config.VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose from {sorted(gpt_config.VARIANTS)}")
    section = ml_collections.ConfigDict()
    section.variant = variant
    for name, t in _field_types().items():
        section[name] = config_dict.placeholder(t)
    for name, value in fields.items():
        if name not in section:
            raise ValueError(f"unknown GPTConfig field {name!r}")
        section[name] = value
    return section


def overrides(section) -> dict:
    """The GPTConfig fields a model section sets (not None)."""
    return {k: v for k, v in section.items() if k != "variant" and v is not None}


def resolve_model(section, base: GPTConfig | None = None, source: str = "") -> GPTConfig:
    """GPTConfig from a model section: on top of `base` (a checkpoint's config) or of the variant."""
    over = overrides(section)
    if base is None:
        return gpt_config.get_config(section.variant, **over)
    for name in ARCHITECTURE_FIELDS:
        if name in over and over[name] != getattr(base, name):
            raise ValueError(
                f"config.model.{name}={over[name]!r} but the checkpoint {source} has {name}={getattr(base, name)!r}; "
                "architecture fields come from the checkpoint (leave them unset)"
            )
    return base.replace(**over)


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config=path:arg` would load it (for code and notebooks)."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(f"config_{os.path.basename(path)[:-3]}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def biomedlm_finetune_schedule(c: ml_collections.ConfigDict) -> None:
    """What BioMedLM's published fine-tuning commands fix (github.com/stanford-crfm/BioMedLM,
    finetune/README.md, run with HF's Trainer): warmup_ratio 0.5, and the Trainer's defaults for the rest,
    i.e. linear decay to 0, AdamW betas (0.9, 0.999), eps 1e-8, no weight decay, clipping at 1.0. The
    learning rate, epochs and batch size are placeholders there, so each config sets its own."""
    c.warmup_ratio = 0.5
    c.lr_decay = "linear"
    c.lr_final_ratio = 0.0
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1.0


def train_config(train_files: str = "", tokenizer: str = "") -> ml_collections.ConfigDict:
    """The keys every training config has (pretraining, seq2seq); experiment configs override values."""
    c = ml_collections.ConfigDict()
    c.model = model_section("tiny")
    # "" = random init; "hf:DIR" = continue from an HF GPT-2/BioMedLM checkpoint; "orbax:WORKDIR" = from
    # another run's latest checkpoint (params only). A workdir that already holds checkpoints always resumes.
    c.init_from = ""
    c.seed = 0

    c.seq_len = 128
    c.loss_chunk_size = 0  # LM loss: positions per logits chunk (0 = whole sequence at once)
    # loss_chunk_size 0: chunk anyway when the fp32 logits and their gradient would take more than this
    # share of a device's HBM (trainer.auto_loss_chunk; 0 = never; CPU reports no HBM: never there)
    c.logits_hbm_fraction = 0.05
    c.global_batch_size = 8  # sequences per optimizer step, across all devices and micro-batches
    c.grad_accum_steps = 1  # micro-batches per step (global_batch_size must divide by it)
    c.num_train_steps = 150
    c.warmup_steps = 15
    c.warmup_ratio = 0.0  # > 0: warm up over this share of num_train_steps instead
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
    # Adam moments' storage dtype ("" = the params' dtype, fp32). "bfloat16" halves the optimizer state.
    c.optimizer.mu_dtype = ""
    c.optimizer.nu_dtype = ""

    # LoRA adapters (rank 0 = off, full fine-tuning). See biomedlm_jax/models/lora.py for what trains.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 16.0
    c.lora.dropout = 0.0
    c.lora.targets = "qkv,attn_out,mlp_in,mlp_out"  # comma-separated subset of these four
    c.lora.base_dtype = ""  # storage dtype of the frozen base weights ("" = param dtype; e.g. bfloat16)
    c.lora.from_peft = ""  # start the adapters from an HF PEFT LoRA directory for GPT-2 (with init_from=hf:BASE)

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
    c.data.task = "lm"  # lm (next-token on documents) | seq2seq (prompt -> answer, loss on the answer)
    # A directory from `python -m biomedlm_jax.prepare_data` (memory-mapped rows, its own tokenizer and
    # train/validation split). When set, train_files / eval_files / tokenizer are not used.
    c.data.prepared_dir = ""
    c.data.train_files = train_files  # comma-separated globs of JSONL ({"text"} or {"title","abstract"})
    c.data.eval_files = ""  # "" = hold out documents by a hash of their id
    c.data.eval_fraction = 0.05
    c.data.tokenizer = tokenizer  # "" = take it from init_from
    c.data.shuffle = True
    return c
