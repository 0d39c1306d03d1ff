"""`GPTConfig`: the architecture's hyperparameters, its named variants (`get_config`) and their checks.

The model owns its defaults here: GPT-2 small/medium, BioMedLM 2.7B and the tiny test and benchmark
shapes, compute `dtype` and `param_dtype`, remat, scan, attention implementation and the LoRA settings.
`ACTIVATIONS` maps GPT-2's activation names (HF's `activation_function`) to functions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS = {
    # HF names (transformers.activations.ACT2FN) -> jax functions with the same math.
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),  # same formula, other constants order
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}



# Projections LoRA can adapt: attention c_attn (fused q/k/v), attention c_proj, MLP c_fc, MLP c_proj.
LORA_TARGETS = ("qkv", "attn_out", "mlp_in", "mlp_out")



REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
KV_CACHE_LAYOUTS = ("auto", "heads_major", "seq_major")



@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """All hyper-parameters of the model. Field names follow nanoGPT/HF where they exist.

    HF `GPT2Config` equivalents: vocab_size=vocab_size, n_positions=n_positions, d_model=n_embd,
    n_layer=n_layer, n_head=n_head, d_ff=n_inner (None -> 4*d_model), activation=activation_function,
    layer_norm_epsilon, embd_pdrop, attn_pdrop, resid_pdrop, initializer_range, scale_attn_weights,
    scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_ff: Optional[int] = None
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    # Divide attention scores by sqrt(head_dim) (standard). False = no scaling (HF option).
    scale_attn_weights: bool = True
    # Additionally divide scores of layer i (0-based) by (i + 1): the Mistral/BioMedLM stability trick.
    scale_attn_by_inverse_layer_idx: bool = False
    # HF upcasts q.k to fp32 when set. Here attention scores/softmax are always fp32-accumulated, which
    # gives the same result, so the flag is kept only to round-trip HF configs.
    reorder_and_upcast_attn: bool = False
    # Token ids that HF stores in its config; kept so save/load round-trips them.
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: Optional[int] = None
    # Compute / storage dtypes, attention backend and memory/compile-time options.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # auto | xla | cudnn  (jax.nn.dot_product_attention implementation)
    remat_policy: str = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    scan_layers: bool = False  # nn.scan over blocks: params stacked on a leading "layers" axis
    # Generation's KV cache axes: heads_major (B*H, S, hd) | seq_major (S, B*H, hd) | auto (seq_major on
    # TPU, where the compiler lays the cache out sequence-major and copied a heads-major cache in and out
    # of the decode loop; heads_major elsewhere). Per layer, with a leading n_layer axis under scan_layers.
    kv_cache_layout: str = "auto"
    # LoRA adapters (Hu et al. 2021) on the projections named in lora_targets: y = x W + b + (alpha/r) x A B,
    # A (in, r) random, B (r, out) zero, so step 0 equals the base model. rank 0 = no adapters.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = LORA_TARGETS

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} not supported; choose from {sorted(ACTIVATIONS)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose from {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose from {ATTENTION_IMPLS}")
        if self.kv_cache_layout not in KV_CACHE_LAYOUTS:
            raise ValueError(f"kv_cache_layout={self.kv_cache_layout!r}; choose from {KV_CACHE_LAYOUTS}")
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises TypeError on an unknown dtype name
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # lists from JSON meta / configs
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"lora_targets {sorted(unknown)} unknown; choose from {LORA_TARGETS}")
        if self.attention_impl == "cudnn" and jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, not {self.dtype}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    def replace(self, **overrides) -> "GPTConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @property
    def kv_seq_major(self) -> bool:
        """Whether generation's KV cache is (S, B*H, hd) per layer (else (B*H, S, hd)); see kv_cache_layout."""
        if self.kv_cache_layout == "auto":
            return jax.default_backend() == "tpu"
        return self.kv_cache_layout == "seq_major"

    def lora_on(self, target: str) -> bool:
        return self.lora_rank > 0 and target in self.lora_targets



# Published sizes: GPT-2 small 124M / medium 355M (Radford et al. 2019, HF gpt2 / gpt2-medium);
# BioMedLM 2.7B (stanford-crfm/BioMedLM config.json: 32 layers, 2560 wide, 20 heads, vocab 28,896,
# eos/pad id 28895, scale_attn_by_inverse_layer_idx and reorder_and_upcast_attn set, dropout 0).
VARIANTS: dict[str, dict] = {
    # Seconds on a laptop CPU; used by the tests and `make demo`.
    "tiny": dict(vocab_size=50257, n_positions=128, d_model=64, n_layer=2, n_head=4),
    # Issue 9's benchmark shape for a 2-core CPU.
    "bench-cpu": dict(vocab_size=28896, n_positions=256, d_model=256, n_layer=4, n_head=4),
    "gpt2-small": dict(vocab_size=50257, n_positions=1024, d_model=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(vocab_size=50257, n_positions=1024, d_model=1024, n_layer=24, n_head=16),
    "biomedlm-2.7b": dict(
        vocab_size=28896,
        n_positions=1024,
        d_model=2560,
        n_layer=32,
        n_head=20,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
        bos_token_id=28895,
        eos_token_id=28895,
        pad_token_id=28895,
    ),
}



def get_config(variant: str = "tiny", **overrides) -> GPTConfig:
    """Config of a named variant with field overrides (e.g. from an ml_collections `config.model`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose from {sorted(VARIANTS)}")
    return GPTConfig(**VARIANTS[variant]).replace(**overrides)
