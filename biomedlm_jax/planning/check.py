"""The TPU compile check behind `python -m biomedlm_jax.aot`: compile a run's real programs for a Cloud
TPU slice this host does not have, and report what they need and cost (planning.report)."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from biomedlm_jax.planning import fit as fit_lib
from biomedlm_jax.planning import programs, report, topology


def train(config, s: topology.Slice, options: int = 4, devices: Optional[list] = None) -> dict:
    """Compile the config's train step for slice `s`; the report row."""
    program = programs.train_program(config, s, devices or topology.compile_devices(s), options)
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs whose buffers exceed the chip's HBM
        if not report.is_out_of_memory(e):
            raise
        return report.out_of_memory_report(program, e, s, time.perf_counter() - t0)
    return report.train_report(program, compiled, s, time.perf_counter() - t0)


def fit(config, s: topology.Slice, options: int = 4, log: Callable[[str], None] = print) -> dict:
    """`--fit`: {"best": row or None, "tried": rows, "overrides": flags or None}."""
    from biomedlm_jax.models import sharding

    devices = topology.compile_devices(s)
    shape = sharding.resolve_mesh_shape(tuple(config.mesh_shape), s.chips)
    batch_ways = shape[0] * shape[1] * s.slices  # data x fsdp (slices multiply data)

    def compile_row(remat: str, accum: int) -> dict:
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.grad_accum_steps = accum
            c.model.remat_policy = remat
        return train(c, s, options, devices)

    out = fit_lib.search(config.global_batch_size, batch_ways, compile_row, log)
    out["overrides"] = fit_lib.overrides(out["best"]) if out["best"] else None
    return out


def decode(config, s: topology.Slice, slots: int, max_len: int, max_new_tokens: int, quantize: Optional[str] = None,
           steps_per_sync: int = 8) -> dict:
    """`--generate`: compile the engine's decode step for one chip of slice `s`."""
    cfg, note = programs.architecture(config)
    # the smallest slice of the generation: one chip of v5e / v6e; v4 and v5p come as 2x2x1 at least
    one = topology.parse(f"{s.chip.generation}-1") if s.chip.generation in ("v5e", "v6e") else s
    device = topology.compile_devices(dataclasses.replace(one, slices=1))[0]
    if max_new_tokens >= max_len:
        raise ValueError(f"--max_new_tokens={max_new_tokens} must be below --max_len={max_len}")
    program = programs.decode_program(cfg, device, slots, max_len - max_new_tokens, max_new_tokens, quantize,
                                      steps_per_sync)
    t0 = time.perf_counter()
    compiled = program.lowered.compile()
    row = report.decode_report(program, compiled, s, time.perf_counter() - t0)
    row.update(model=note, quantize=quantize or "none", dtype=cfg.dtype)
    return row
