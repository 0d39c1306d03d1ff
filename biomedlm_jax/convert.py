"""Convert checkpoints between HF safetensors (GPT2LMHeadModel) and this project's orbax workdirs.

    python -m biomedlm_jax.convert --from=hf:DIR --to=orbax:WORKDIR
    python -m biomedlm_jax.convert --from=orbax:WORKDIR --to=hf:DIR [--step=N] [--dtype=bfloat16]
    python -m biomedlm_jax.convert --from=orbax:LORA_WORKDIR --to=peft:DIR
    python -m biomedlm_jax.convert --from=hf:DIR|orbax:WORKDIR --to=gguf:FILE.gguf [--gguf_type=F16|Q8_0|F32]

A LoRA run (config `lora.rank` > 0) exports to hf: with its adapters merged into the weights (a plain
GPT2LMHeadModel, or the classifier below), and to peft: as an HF PEFT adapter (adapter_config.json +
adapter_model.safetensors, GPT-2 module names) that `peft.PeftModel.from_pretrained(
GPT2LMHeadModel.from_pretrained(BASE), DIR)` loads. PEFT export covers LM runs on the base's own
vocabulary; a run that added tokens or a task head (MCQA, seq2seq's BioMedLM layout) exports merged.

gguf:FILE writes a llama.cpp file (GPT-2 architecture, the run's own tokenizer; gguf_export.py), F16 by
default or Q8_0; LoRA adapters are merged first. A classifier (an MCQA workdir) is refused: its head
has no place in llama.cpp's graph.

`orbax:WORKDIR` is a training workdir (the latest complete checkpoint is used unless --step) or the
output of a previous hf->orbax conversion. Tokenizer files travel with the weights both ways
(HF dir <-> WORKDIR/tokenizer/). Existing outputs are never overwritten unless --overwrite (HF) —
orbax steps are never overwritten.

A finetune_mcqa workdir exported to hf: is its classifier, head included (WORKDIR/best unless
--step): a seqcls head as transformers' GPT2ForSequenceClassification (`score.weight`, id2label,
pad_token_id, a tokenizer whose pad token is [PAD]), which AutoModelForSequenceClassification loads;
a choice head in BioMedLM's GPT2ForMultipleChoice layout (`classifier.weight` / `classifier.bias`;
docs/mcqa.md shows the torch lines that load it).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import jax

from biomedlm_jax import checkpoint, hf, lora, mcqa, mcqa_data, paths, sources
from biomedlm_jax import tokenizer as tokenizer_lib
from biomedlm_jax.model import GPT, GPTConfig


def parse_location(spec: str, flag: str) -> tuple[str, str]:
    """(kind, path) of a --from / --to value (sources.parse; --to also takes peft:DIR); exits with the
    parser's message on anything else."""
    try:
        src = sources.parse(spec, flag, ("hf", "orbax", "peft", "gguf") if flag == "--to" else sources.KINDS)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return src.kind, src.path


def load(spec: str, step=None, **overrides):
    """(model, params, tokenizer or None) from 'hf:DIR' or 'orbax:WORKDIR'."""
    kind, path = parse_location(spec, "--from")
    if kind == "hf":
        model, params = hf.load_pretrained(path, **overrides)
        return model, params, tokenizer_lib.find_tokenizer(path)
    model, params = checkpoint.load_model(path, step=step, **overrides)
    return model, params, tokenizer_lib.find_tokenizer(checkpoint.tokenizer_dir(path))


def load_for_inference(spec: str, dtype: Optional[str] = None):
    """(model, params, tokenizer) for generation / scoring: no remat, and with `dtype` the weights are
    loaded in it too (decoding reads every weight per token, so bf16 storage halves that traffic and
    leaves no fp32 copy to cast each step). A checkpoint without tokenizer files is an error."""
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    model, params, tok = load(spec, remat_policy="none", **overrides)
    if tok is None:
        raise SystemExit(f"{spec}: no tokenizer files next to the checkpoint")
    return model, params, tok


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
    """An LM checkpoint as a llama.cpp GGUF file (see gguf_export.py)."""
    from biomedlm_jax import gguf_export

    if gguf_type.upper() not in gguf_export.TYPES:
        raise ValueError(f"--gguf_type={gguf_type}: choose from {', '.join(gguf_export.TYPES)}")
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
    return gguf_export.write_gguf(model.config, params, tok, dst_path, gguf_type)


def convert(src: str, dst: str, *, step=None, dtype=None, overwrite=False, max_shard_size="5GB",
            gguf_type: str = "F16") -> str:
    dst_kind, dst_path = parse_location(dst, "--to")
    if dst_kind == "peft":
        return export_peft(src, dst_path, step, overwrite)
    if dst_kind == "gguf":
        return export_gguf(src, dst_path, step, gguf_type, overwrite)
    if dst_kind == "hf" and paths.exists(paths.join(dst_path, hf.CONFIG_NAME)) and not overwrite:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="hf:DIR or orbax:WORKDIR")
    p.add_argument("--to", dest="dst", required=True, help="hf:DIR, orbax:WORKDIR, peft:DIR (a LoRA run's adapters) or gguf:FILE (llama.cpp)")
    p.add_argument("--step", type=int, default=None, help="orbax step to read/write (default: latest / 0)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="storage dtype")
    p.add_argument("--max_shard_size", default="5GB", help="HF output: shard safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help="replace an existing HF output directory or GGUF file")
    p.add_argument("--gguf_type", default="F16", help="gguf: output: F16 (default), Q8_0 or F32")
    args = p.parse_args(argv)
    try:
        out = convert(args.src, args.dst, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                      max_shard_size=args.max_shard_size, gguf_type=args.gguf_type)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
