"""Compile a run for a Cloud TPU slice from any host (libtpu's compile-only devices; no TPU needed) and
report whether it fits, what it moves and what it costs at least.

    python -m biomedlm_jax.aot --config=configs/pretrain.py:biomedlm-2.7b --topology=v5e-256 \\
        [--slices=N] [--config.key=value ...] [--fit] [--options=4]
    python -m biomedlm_jax.aot --config=configs/pretrain.py:biomedlm-2.7b --topology=v5e-1 --generate \\
        --slots=16 --max_len=1024 --max_new_tokens=256 [--quantize=int8]
    python -m biomedlm_jax.aot --topology=v5e-256 --probe=reduce_scatter

Topologies are Cloud TPU accelerator types: v4-N, v5p-N and tpu7x-N count TensorCores (2 per chip),
v5e-N (or v5litepod-N) and v6e-N count chips. Prints one JSON line, then a table. Exits 1 when the program
does not fit the chip's HBM (or --fit finds nothing that fits), 2 on a bad flag. docs/tpu.md.
"""
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/pretrain.py:biomedlm-2.7b",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU type: v4-N, v5p-N, tpu7x-N (TensorCores), v5e-N, v6e-N (chips)")
_SLICES = flags.DEFINE_integer("slices", 1, "Slices joined over the data-centre network (they multiply the data axis)")
_FIT = flags.DEFINE_bool("fit", False, "Find the micro-batch and remat policy that fit, and print their overrides")
_OPTIONS = flags.DEFINE_integer("options", 4, "MCQA configs: answer options per question (choice head)")
_GENERATE = flags.DEFINE_bool("generate", False, "Compile the decode engine's step for one chip instead")
_SLOTS = flags.DEFINE_integer("slots", 16, "--generate: decode slots (sequences in flight)")
_MAX_LEN = flags.DEFINE_integer("max_len", 1024, "--generate: context per slot, prompt + answer tokens")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "--generate: answer budget per request")
_QUANTIZE = flags.DEFINE_string("quantize", "none", "--generate: none | int8 (weight-only)")
_STEPS = flags.DEFINE_integer("steps_per_sync", 8, "--generate: decode steps per host round trip")
_PROBE = flags.DEFINE_enum("probe", None, ["reduce_scatter"],
                           "Compile a probe instead of the config's step: reduce_scatter says whether the TPU "
                           "compiler keeps a reduce-scatter the program asks for on this slice")
flags.mark_flags_as_required(["topology"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from biomedlm_jax.models import quantize
    from biomedlm_jax.planning import check, fit, report, topology

    try:
        s = topology.parse(_TOPOLOGY.value, _SLICES.value)
        mode = quantize.check_mode(_QUANTIZE.value)
    except ValueError as e:
        print(f"aot: error: {e}", file=sys.stderr)
        return 2
    if _PROBE.value:
        row = check.reduce_scatter_probe(s)
        print(json.dumps(row, sort_keys=True))
        print(f"{s.describe()}: a shard_map gradient that asks for a reduce-scatter compiles as "
              f"{', '.join(row['compiled_as']) or 'nothing counted'}\n  {row['hlo'][:200]}")
        return 0
    config = _CONFIG.value
    if config is None:
        print("aot: error: --config is required (except with --probe)", file=sys.stderr)
        return 2
    if _GENERATE.value:
        row = check.decode(config, s, _SLOTS.value, _MAX_LEN.value, _MAX_NEW.value, mode, _STEPS.value)
    elif _FIT.value:
        found = check.fit(config, s, _OPTIONS.value, log=lambda m: print(m, file=sys.stderr, flush=True))
        tried = [{k: t.get(k) for k in ("remat", "grad_accum", "fits", "peak_bytes", "step_s_lower_bound", "bound_by",
                                         "step_s_estimate", "link_ratio")}
                 for t in found["tried"]]
        if found["best"] is None:
            print(json.dumps({"kind": "fit", "topology": s.name, "fits": False, "tried": tried}))
            print(f"nothing fits {s.describe()}: every remat policy runs out of HBM at one sequence per chip "
                  "(try a bigger slice or a LoRA config)")
            return 1
        row = dict(found["best"], kind="fit", overrides=found["overrides"], tried=tried)
    else:
        row = check.train(config, s, _OPTIONS.value)
    print(json.dumps(row, sort_keys=True), flush=True)
    print(report.table(row))
    if row["kind"] == "fit":
        print(f"  overrides    {fit.overrides(row)}")
    return 0 if row["fits"] else 1


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
