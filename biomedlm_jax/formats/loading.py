"""Any checkpoint location (`hf:DIR`, `orbax:WORKDIR`) -> (model, params, tokenizer).

`load` reads what is there; `load_for_inference` turns remat off, can load the weights in a compute
dtype, and requires tokenizer files. Used by generation, scoring, evaluation and the benchmarks.
"""
from __future__ import annotations

from typing import Optional

from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, hf, sources


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
