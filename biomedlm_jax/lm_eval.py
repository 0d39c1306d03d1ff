"""Run EleutherAI's lm-evaluation-harness on a JAX checkpoint (no conversion, no PyTorch).

    python -m biomedlm_jax.lm_eval --init_from=hf:/path/to/BioMedLM --tasks=medical_local \\
        --metadata='{"medqa": "/data/medqa/phrases_no_exclude_test.jsonl", "medmcqa": "/data/medmcqa/dev.json",
                     "mmlu": "/data/mmlu/data"}' --batch_size=16 --output_path=results --log_samples

Our flags: `--init_from=hf:DIR|orbax:WORKDIR` (required), `--dtype` (float32 | bfloat16 | float16),
`--max_length` (default: the model's n_positions), `--mesh_shape=data,fsdp,tensor` (shard the
weights, e.g. `1,-1,1`), `--max_gen_toks`, `--bucket`, `--quantize=int8` (Qwix int8 weights for scoring
and generation, models/quantize.py). Every other flag is the harness's own
(`--tasks`, `--num_fewshot`, `--limit`, `--batch_size`, `--log_samples`, `--output_path`,
`--gen_kwargs`, `--metadata`, ...): they are handed to its `run` command with `--model=biomedlm_jax`,
so it writes its usual results and per-sample files. The offline medical tasks shipped in
`biomedlm_jax/lm_eval_tasks` are on the task path unless `--include_path` names another folder.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def build_argv(argv: list[str]) -> list[str]:
    """Our flags -> the harness's `run` command line (with `--model=biomedlm_jax`)."""
    from biomedlm_jax.evaluation.harness import TASKS_DIR

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.lm_eval", description=__doc__.split("\n")[0],
                                add_help=True)
    p.add_argument("--init_from", required=True, help="hf:DIR or orbax:WORKDIR")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max_length", type=int, default=None, help="default: the model's n_positions")
    p.add_argument("--mesh_shape", default=None, help="data,fsdp,tensor (e.g. 1,-1,1 shards the weights)")
    p.add_argument("--max_gen_toks", type=int, default=256)
    p.add_argument("--bucket", type=int, default=64, help="pad request lengths to a multiple of this")
    p.add_argument("--quantize", default="none", help="int8: Qwix int8 weight-only quantization (default none)")
    ours, rest = p.parse_known_args(argv)
    if any(a == "--model" or a.startswith("--model=") or a.startswith("--model_args") for a in rest):
        p.error("--model / --model_args are set by this command; use --init_from, --dtype, ...")
    model_args = [f"init_from={ours.init_from}", f"dtype={ours.dtype}", f"max_gen_toks={ours.max_gen_toks}",
                  f"bucket={ours.bucket}"]
    if ours.max_length:
        model_args.append(f"max_length={ours.max_length}")
    if ours.quantize not in ("", "none"):
        from biomedlm_jax.models import quantize

        try:
            quantize.check_mode(ours.quantize)
        except ValueError as e:
            p.error(str(e))
        model_args.append(f"quantize={ours.quantize}")
    if ours.mesh_shape:
        model_args.append(f"mesh_shape={ours.mesh_shape.replace(',', ' ')}")
    out = ["lm-eval", "run", "--model", "biomedlm_jax", "--model_args", ",".join(model_args)]
    if not any(a == "--include_path" or a.startswith("--include_path=") for a in rest):
        out += ["--include_path", TASKS_DIR]
    return out + rest


def main(argv=None) -> int:
    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("biomedlm_jax.evaluation.harness")  # registers the biomedlm_jax model

    sys.argv = build_argv(list(sys.argv[1:] if argv is None else argv))
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
