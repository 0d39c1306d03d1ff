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

gguf:FILE writes a llama.cpp file (GPT-2 architecture, the run's own tokenizer; formats/gguf.py), F16 by
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

from biomedlm_jax.core import errors
from biomedlm_jax.workflows.convert import convert


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
    errors.add_verbose_flag(p)
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
