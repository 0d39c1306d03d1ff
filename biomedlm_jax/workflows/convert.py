"""Checkpoint conversion between HF safetensors, orbax, PEFT adapters and GGUF, the library behind
`python -m biomedlm_jax.convert` (its docstring describes each direction). A fine-tuned MCQA classifier
travels to HF with its head; LoRA runs export merged (hf:) or as adapters (peft:)."""
from __future__ import annotations

import jax

from biomedlm_jax.core import paths
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, hf, hf_config, sources
from biomedlm_jax.formats.loading import load, parse_location
from biomedlm_jax.models import lora
from biomedlm_jax.models.gpt import GPT
from biomedlm_jax.models.gpt_config import GPTConfig
from biomedlm_jax.tasks import mcqa, mcqa_data


def _mcqa_classifier(src: str, step=None):
    """The fine-tuned classifier of an orbax MCQA workdir (mcqa.Classifier), or None for other sources."""
    kind, path = parse_location(src, "--from")
    if kind != "orbax":
        return None
    try:
        return mcqa.load_classifier(src, step)
    except mcqa.NotAClassifier:
        return None



def export_classifier(clf, dst_path: str, dtype=None, max_shard_size="5GB") -> None:
    """Write an mcqa.Classifier as an HF classifier directory (see the module docstring)."""
    h = clf.head
    score = jax.device_get(clf.params["score"])
    head = hf.ClassifierHead(h["head"], score["kernel"], score.get("bias"),
                             tuple(h["labels"]) if h["head"] == "seqcls" and h.get("labels") else None, h["pad_id"])
    special = {"pad_token": mcqa_data.PAD}
    if h["head"] == "choice":
        special.update(cls_token=mcqa_data.CLS, sep_token=mcqa_data.SEP)
    hf.save_pretrained(GPT(clf.model.config), clf.params["transformer"], dst_path, tokenizer=clf.tok, dtype=dtype,
                       max_shard_size=max_shard_size, head=head, special_tokens=special)



def export_peft(src: str, dst_path: str, step=None, overwrite=False) -> str:
    """A LoRA run's adapters as an HF PEFT directory (see the module docstring)."""
    kind, path = parse_location(src, "--from")
    if kind != "orbax":
        raise ValueError(f"--from={src}: a PEFT adapter comes from a LoRA training workdir (orbax:WORKDIR)")
    if paths.exists(paths.join(dst_path, lora.PEFT_CONFIG)) and not overwrite:
        raise FileExistsError(f"{dst_path} already holds a PEFT adapter; pass --overwrite to replace it")
    _, meta = checkpoint.read_meta(path, step)
    cfg = GPTConfig(**meta["model"])
    if not cfg.lora_rank:
        raise ValueError(f"{path}: not a LoRA run (lora.rank 0); export it with --to=hf:")
    if meta.get("backbone"):
        raise ValueError(f"{path}: an MCQA run (a classifier head and added tokens), which PEFT's causal-LM adapter "
                         "cannot carry; export it merged with --to=hf:")
    ref = meta.get("lora_base") or {}  # absent for a LoRA run on a random base
    base_vocab = ref.get("vocab") or cfg.vocab_size
    if base_vocab != cfg.vocab_size:
        raise ValueError(f"{path}: the run grew the vocabulary from {base_vocab} to {cfg.vocab_size} (added tokens), "
                         "which a PEFT adapter does not carry; export it merged with --to=hf:")
    _, params = checkpoint.load_model(path, step=step, merge_lora=False, scan_layers=False)
    base = ref.get("init_from", "")
    lora.save_peft(dst_path, jax.device_get(params), cfg.replace(scan_layers=False),
                   sources.parse(base).path if base.startswith("hf:") else "")
    return dst_path



def export_gguf(src: str, dst_path: str, step=None, gguf_type: str = "F16", overwrite=False) -> str:
    """An LM checkpoint as a llama.cpp GGUF file (see formats/gguf.py)."""
    from biomedlm_jax.formats import gguf

    if gguf_type.upper() not in gguf.TYPES:
        raise ValueError(f"--gguf_type={gguf_type}: choose from {', '.join(gguf.TYPES)}")
    if paths.exists(dst_path) and not overwrite:
        raise FileExistsError(f"{dst_path} already exists; pass --overwrite to replace it")
    if paths.is_remote(dst_path):
        raise ValueError(f"--to=gguf:{dst_path}: write GGUF files to a local path")
    clf = _mcqa_classifier(src, step)
    if clf is not None:
        raise ValueError(f"--from={src} is an MCQA classifier ({clf.head['head']} head): llama.cpp's GPT-2 graph has only "
                         "the tied LM head, so the classifier cannot travel in GGUF; export it with --to=hf:DIR")
    model, params, tok = load(src, step=step, scan_layers=False)
    if tok is None:
        raise ValueError(f"{src}: no tokenizer files next to the checkpoint; GGUF carries the tokenizer")
    return gguf.write_gguf(model.config, params, tok, dst_path, gguf_type)



def convert(src: str, dst: str, *, step=None, dtype=None, overwrite=False, max_shard_size="5GB",
            gguf_type: str = "F16") -> str:
    dst_kind, dst_path = parse_location(dst, "--to")
    if dst_kind == "peft":
        return export_peft(src, dst_path, step, overwrite)
    if dst_kind == "gguf":
        return export_gguf(src, dst_path, step, gguf_type, overwrite)
    if dst_kind == "hf" and paths.exists(paths.join(dst_path, hf_config.CONFIG_NAME)) and not overwrite:
        raise FileExistsError(f"{dst_path} already holds an HF checkpoint; pass --overwrite to replace it")
    clf = _mcqa_classifier(src, step) if dst_kind == "hf" else None
    if clf is not None:
        export_classifier(clf, dst_path, dtype, max_shard_size)
        return dst_path
    model, params, tok = load(src, step=step, scan_layers=False)
    if dst_kind == "hf":
        hf.save_pretrained(model, params, dst_path, tokenizer=tok, dtype=dtype, max_shard_size=max_shard_size)
        return dst_path
    if dtype is not None:
        model = type(model)(model.config.replace(param_dtype=dtype))
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    out = checkpoint.save_params(dst_path, model.config, params, step=step or 0, converted_from=src)
    if tok is not None:
        tokenizer_lib.save_tokenizer(tok, checkpoint.tokenizer_dir(dst_path), model_max_length=model.config.n_positions)
    return out
