"""LoRA fine-tuning on the shared trainer: which parameters train, and merging adapters into weights.

The adapters themselves live in `model.Projection` (`lora_a`, `lora_b` next to each adapted kernel;
`GPTConfig.lora_*`). A LoRA run trains:
  * every adapter (`lora_a`, `lora_b`);
  * the task's own new parameters: everything outside the backbone (the MCQA `score` head);
  * the embedding rows of tokens the task added (MCQA's [PAD]/[CLS]/[SEP], seq2seq's layout tokens):
    `wte` gets gradients, masked to the rows at and above the base vocabulary, so old rows stay bit
    for bit.
Everything else is frozen: it gets no gradient and no optimizer state, and may be stored in
`lora.base_dtype` (e.g. bfloat16) to halve its memory.

`merge` folds the adapters into the kernels (W + alpha/r * A B) and drops them, giving a plain GPT
whose forward equals the adapted one: what `load_model`, `convert`, evaluation and generation use.

This module is the adapter math and PEFT's file format; it reads no checkpoint. Where a LoRA run's
frozen base comes from (its reference, sha256 check and reload) is checkpoint.py's business.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from biomedlm_jax.core import errors, paths

ADAPTERS = ("lora_a", "lora_b")


def _is_adapter(path: tuple) -> bool:
    return path[-1] in ADAPTERS


def _is_wte(path: tuple, backbone: Optional[str]) -> bool:
    return path[-2:] == ("wte", "embedding") and (backbone is None or path[0] == backbone)


def trainable_mask(params, cfg, backbone: Optional[str] = None, base_vocab: Optional[int] = None) -> dict:
    """{flattened path: bool} over `params` (a plain dict tree). All True when LoRA is off."""
    flat = flax.traverse_util.flatten_dict(params)
    if not cfg.lora_rank:
        return {k: True for k in flat}
    grew = base_vocab is not None and cfg.vocab_size > base_vocab
    return {k: _is_adapter(k) or (backbone is not None and k[0] != backbone) or (grew and _is_wte(k, backbone))
            for k in flat}


def split(params, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees of `params` by `mask`."""
    flat = flax.traverse_util.flatten_dict(params)
    t = {k: v for k, v in flat.items() if mask[k]}
    f = {k: v for k, v in flat.items() if not mask[k]}
    return flax.traverse_util.unflatten_dict(t), flax.traverse_util.unflatten_dict(f)


def join(trainable: dict, frozen: dict) -> dict:
    flat = dict(flax.traverse_util.flatten_dict(frozen))
    flat.update(flax.traverse_util.flatten_dict(trainable))
    return flax.traverse_util.unflatten_dict(flat)


def row_mask_grads(grads: dict, backbone: Optional[str], base_vocab: int) -> dict:
    """Zero the gradient of `wte` rows below `base_vocab` (only added tokens' rows train)."""
    flat = flax.traverse_util.flatten_dict(grads)
    for k, g in flat.items():
        if _is_wte(k, backbone):
            keep = (jnp.arange(g.shape[0]) >= base_vocab)[:, None]
            flat[k] = jnp.where(keep, g, jnp.zeros_like(g))
    return flax.traverse_util.unflatten_dict(flat)


def count(params, mask: dict) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    flat = flax.traverse_util.flatten_dict(params)
    total = sum(int(np.prod(v.shape)) for v in flat.values())
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if mask[k]), total


def merge(params: dict, cfg, stacked: Optional[bool] = None) -> dict:
    """GPT params with every adapter folded into its kernel (W + alpha/r * A B, in fp32) and removed.
    `stacked`: params of a scanned model (a leading layer axis); default cfg.scan_layers."""
    if not cfg.lora_rank:
        return params
    stacked = cfg.scan_layers if stacked is None else stacked
    scale = cfg.lora_alpha / cfg.lora_rank

    def fold(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node and "lora_b" in node and "kernel" in node:
            k, a, b = node["kernel"], node["lora_a"], node["lora_b"]

            def delta(a, b):
                n_in = a.ndim - 1
                return jnp.tensordot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), axes=((n_in,), (0,)))

            d = jax.vmap(delta)(a, b) if stacked else delta(a, b)
            merged = (jnp.asarray(k, jnp.float32) + scale * d).astype(k.dtype)
            return {n: v for n, v in node.items() if n not in ADAPTERS} | {"kernel": merged}
        return {n: fold(v) for n, v in node.items()}

    return fold(params)


# ----------------------------------------------------------------------------------------------------
# HF PEFT interchange: adapter_config.json + adapter_model.safetensors for transformers' GPT2LMHeadModel
# ----------------------------------------------------------------------------------------------------

# our target -> (flax path inside a block, GPT-2 module path inside a block)
PEFT_MODULES = {"qkv": (("attn", "c_attn"), "attn.c_attn"), "attn_out": (("attn", "c_proj"), "attn.c_proj"),
                "mlp_in": (("mlp", "c_fc"), "mlp.c_fc"), "mlp_out": (("mlp", "c_proj"), "mlp.c_proj")}
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_config(cfg, base: str = "") -> dict:
    """PEFT's LoraConfig for these adapters. GPT-2's projections are Conv1D (fan_in_fan_out), and its
    attention and MLP output projections share the name c_proj, so the targets are a regex on the full
    module names."""
    mods = "|".join(PEFT_MODULES[t][1].replace(".", r"\.") for t in cfg.lora_targets)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or None,
            "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": rf".*\.h\.\d+\.({mods})$", "fan_in_fan_out": True, "bias": "none",
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def to_peft(params: dict, cfg) -> dict[str, np.ndarray]:
    """PEFT tensors (`base_model.model.transformer.h.{i}.<module>.lora_A/B.weight`) from unstacked GPT
    params with adapters. PEFT's lora_A is (r, fan_in) and lora_B (fan_out, r): ours transposed."""
    out = {}
    for i in range(cfg.n_layer):
        for t in cfg.lora_targets:
            path, module = PEFT_MODULES[t]
            node = params[f"h_{i}"][path[0]][path[1]]
            a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
            prefix = f"base_model.model.transformer.h.{i}.{module}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, cfg.lora_rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(cfg.lora_rank, -1).T)
    return out


def read_peft(path: str, cfg) -> dict:
    """Adapters of a PEFT LoRA directory for GPT-2 as {flattened flax path: array} (unstacked, our
    shapes). Its rank, alpha and target modules must be the run's (`cfg.lora_*`); errors name the file."""
    local = paths.downloaded(path)
    cfg_file, weights = os.path.join(local, PEFT_CONFIG), os.path.join(local, PEFT_WEIGHTS)
    for f in (cfg_file, weights):
        if not os.path.exists(f):
            raise FileNotFoundError(f"{paths.join(path, os.path.basename(f))} not found: not a PEFT adapter directory")
    pc = json.loads(open(cfg_file, encoding="utf-8").read())
    if pc.get("peft_type") != "LORA":
        raise errors.CheckpointError(f"{cfg_file}: peft_type {pc.get('peft_type')!r}; only LORA adapters are read")
    for key, ours in (("r", cfg.lora_rank), ("lora_alpha", cfg.lora_alpha)):
        if float(pc.get(key, -1)) != float(ours):
            raise errors.CheckpointError(f"{cfg_file}: {key}={pc.get(key)} but the run has lora {key}={ours}; set "
                                     f"--config.lora.{'rank' if key == 'r' else 'alpha'}={pc.get(key)}")
    if pc.get("use_rslora") or pc.get("use_dora") or pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise errors.CheckpointError(f"{cfg_file}: rsLoRA / DoRA / per-module ranks are not supported")
    tensors = load_file(weights)
    C, H, hd, F, r = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ffn_dim, cfg.lora_rank
    shapes = {"qkv": ((C,), (3, H, hd)), "attn_out": ((H, hd), (C,)), "mlp_in": ((C,), (F,)), "mlp_out": ((F,), (C,))}
    out, used = {}, set()
    for i in range(cfg.n_layer):
        for t in cfg.lora_targets:
            path_, module = PEFT_MODULES[t]
            names = [f"base_model.model.transformer.h.{i}.{module}.lora_{x}.weight" for x in "AB"]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise errors.CheckpointError(f"{weights}: {missing[0]} missing (the run adapts {','.join(cfg.lora_targets)})")
            a, b = tensors[names[0]], tensors[names[1]]
            in_shape, out_shape = shapes[t]
            if a.shape != (r, int(np.prod(in_shape))) or b.shape != (int(np.prod(out_shape)), r):
                raise errors.CheckpointError(f"{weights}: {names[0]} / {names[1]} have shapes {a.shape} / {b.shape}, the "
                                         f"model expects {(r, int(np.prod(in_shape)))} / {(int(np.prod(out_shape)), r)}")
            key = (f"h_{i}",) + path_
            out[key + ("lora_a",)] = a.T.reshape(in_shape + (r,)).astype(np.float32)
            out[key + ("lora_b",)] = b.T.reshape((r,) + out_shape).astype(np.float32)
            used.update(names)
    extra = sorted(set(tensors) - used)
    if extra:
        raise errors.CheckpointError(f"{weights}: {extra[0]} is not an adapter of the run's targets ({len(extra)} unused)")
    return out


def save_peft(out_dir: str, params: dict, cfg, base: str = "") -> None:
    """Write `params`' adapters (unstacked) as a PEFT directory (local or gs://)."""
    with paths.staged(out_dir) as local:
        save_file(to_peft(params, cfg), os.path.join(local, PEFT_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(local, PEFT_CONFIG), "w", encoding="utf-8") as f:
            json.dump(peft_config(cfg, base), f, indent=2)
