"""HF `config.json` (a GPT2Config) <-> `GPTConfig`.

Fields are copied by one table both ways; a config whose math this model does not implement (another
model type, cross-attention, untied embeddings, an unknown activation) is refused with its file named.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from biomedlm_jax.core import paths
from biomedlm_jax.core.errors import CheckpointError
from biomedlm_jax.models.gpt_config import ACTIVATIONS, GPTConfig

CONFIG_NAME = "config.json"



# GPT2Config field -> GPTConfig field, for fields copied as they are.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "n_positions": "n_positions",
    "n_embd": "d_model",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_inner": "d_ff",
    "activation_function": "activation",
    "layer_norm_epsilon": "layer_norm_epsilon",
    "embd_pdrop": "embd_pdrop",
    "attn_pdrop": "attn_pdrop",
    "resid_pdrop": "resid_pdrop",
    "initializer_range": "initializer_range",
    "scale_attn_weights": "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn": "reorder_and_upcast_attn",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}



# GPT2Config defaults for fields a config.json may omit (transformers fills them in the same way).
_HF_DEFAULTS = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "resid_pdrop": 0.1,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "pad_token_id": None,
}



def config_from_hf(hf_config: Mapping[str, Any], source: str = CONFIG_NAME, **overrides) -> GPTConfig:
    """GPTConfig from a GPT2Config dict. Refuses fields whose math this model does not implement."""
    model_type = hf_config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{source}: model_type={model_type!r} is not a GPT-2 config (expected 'gpt2'); "
            "only GPT2LMHeadModel-layout checkpoints (GPT-2, BioMedLM) are supported"
        )
    if hf_config.get("add_cross_attention"):
        raise CheckpointError(f"{source}: add_cross_attention=True (encoder-decoder GPT-2) is not supported")
    if hf_config.get("tie_word_embeddings", True) is False:
        raise CheckpointError(f"{source}: tie_word_embeddings=False is not supported; the LM head is tied to wte")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: activation_function={act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(hf_config.get(key), list):
            raise CheckpointError(f"{source}: {key} is a list; a single id is expected")
    kwargs = {ours: hf_config.get(theirs, _HF_DEFAULTS[theirs]) for theirs, ours in _CONFIG_FIELDS.items()}
    if kwargs["d_model"] % kwargs["n_head"]:
        raise CheckpointError(f"{source}: n_embd={kwargs['d_model']} is not divisible by n_head={kwargs['n_head']}")
    try:
        return GPTConfig(**kwargs).replace(**overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e



def config_to_hf(cfg: GPTConfig, torch_dtype: str = "float32") -> dict:
    """GPT2Config dict for `cfg` (what transformers writes for GPT2LMHeadModel)."""
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    for theirs, ours in _CONFIG_FIELDS.items():
        out[theirs] = getattr(cfg, ours)
    out.update(n_ctx=cfg.n_positions, tie_word_embeddings=True, use_cache=True, dtype=torch_dtype)
    return out



def read_hf_config(path: str) -> dict:
    """config.json of an HF checkpoint directory (local or gs://...) as a dict (errors name the file)."""
    cfg_file = paths.join(path, CONFIG_NAME)
    if not paths.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not paths.exists(cfg_file):
        raise FileNotFoundError(f"{cfg_file} not found: an HF checkpoint directory needs a config.json")
    try:
        hf_config = json.loads(paths.read_text(cfg_file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object")
    return hf_config



def load_config(path: str, **overrides) -> GPTConfig:
    return config_from_hf(read_hf_config(path), paths.join(path, CONFIG_NAME), **overrides)
