"""What a compiled program says about a run: HBM per chip, FLOPs beside the model's, bytes moved by
collectives, a lower bound on the step time from the chip's published peaks, and an estimate from the
compiler's own cycle counts. ("Per chip" fields are per JAX device: half a chip on TPU7x.)

The bound (the floor) is a compiler-based estimate, not a measurement: each of compute (the compiled
program's FLOPs at the chip's peak bf16 rate), memory traffic and communication (the bytes each chip
sends over its links, `hlo.link_factor`: an all-reduce twice an all-gather of the same buffer, at the
chip's ICI bandwidth; bytes that cross slices over the data-centre network are counted at ICI speed
too) takes at least its own time, and a step at least the longest of them (perfect overlap of the other
two). The memory term counts only traffic no schedule avoids: a train step reads and writes its whole
state (params, optimizer moments) and lands every collective's result in HBM; a decode step reads its
weights and KV cache. (XLA's cost analysis also reports "bytes accessed", kept as
`cost_analysis_bytes_per_chip`: it counts loop bodies once and every fused operand whole, so it is
neither a bound nor the traffic.) The MFU ceiling is the model's FLOPs over the bound.

The estimate (`estimate`) replaces the compute term by the TPU compiler's per-op `estimated_cycles`,
summed with trip counts and made seconds by `check.cycle_rate`; it includes memory-bound fusions and
kernels below peak, which the floor cannot see. Real steps are slower still (host input, launches,
what the compiler's model misses).

`link_ratio` sets the link bytes beside what FSDP cannot avoid (`fsdp_min_link_bytes`). Issue 43 found
the TPU compiler (libtpu 0.0.42.1) compiling the gradient reduce-scatters on v4-128, v5p-128, v5e-256
and v6e-256 as all-reduces and a slice, even the one a `shard_map`'s `psum_scatter` asks for by name
(`aot --probe=reduce_scatter`; docs/tpu.md shows the HLO).
"""
from __future__ import annotations

import re

from biomedlm_jax.models.quantize import weight_bytes
from biomedlm_jax.planning import hlo
from biomedlm_jax.planning.topology import Slice
from biomedlm_jax.training import metrics

ESTIMATE = "compiler-based estimate, not a measurement"


def memory(compiled) -> dict:
    """HBM per device from XLA's buffer assignment: arguments (params, optimizer state, batch), outputs
    (aliased to the donated arguments), temporaries; peak = arguments + outputs - aliased + temporaries."""
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(ma, f"{n}_size_in_bytes")) for n in ("argument", "output", "alias", "temp"))
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "peak_bytes": arg + out - alias + temp}


def cost(compiled, text: str) -> dict:
    """FLOPs per chip of one execution, read from the optimized HLO with loops counted per iteration
    (hlo.step_flops), beside XLA's own cost analysis, which counts a loop body once (its bytes too)."""
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    return {"xla_flops_per_chip": hlo.step_flops(text),
            "cost_analysis_flops_per_chip": float(ca.get("flops", 0.0)),
            "cost_analysis_bytes_per_chip": float(ca.get("bytes accessed", 0.0))}


def bound(s: Slice, flops: float, hbm_bytes: float, collective_bytes: float) -> dict:
    chip = s.device
    times = {"compute": flops / chip.peak_bf16_flops, "hbm": hbm_bytes / chip.hbm_bandwidth,
             "ici": collective_bytes / chip.ici_bandwidth}
    limit = max(times, key=times.get)
    return {"compute_s": times["compute"], "hbm_s": times["hbm"], "ici_s": times["ici"],
            "step_s_lower_bound": times[limit], "bound_by": limit}


def _run(program, s: Slice) -> dict:
    """The fields every train row has: the slice, the mesh, the model and the batch."""
    c = program.config
    return {
        "kind": "train", "topology": s.name, "slices": s.slices, "chips": s.chips * s.slices, "devices": s.devices,
        "chip": s.chip.generation,
        "mesh": dict(program.mesh.shape), "model": program.note, "params": program.params,
        "trainable_params": program.trainable, "task": c.data.get("task", "lm"), "seq_len": c.seq_len,
        "global_batch": c.global_batch_size, "grad_accum": c.grad_accum_steps,
        "micro_batch_per_chip": c.global_batch_size // c.grad_accum_steps / s.devices,
        "remat": program.cfg.remat_policy, "lora_rank": program.cfg.lora_rank, "loss_chunk": program.task.loss_chunk,
        "tokens_per_step": c.global_batch_size * program.task.tokens_per_example(),
        "hbm_capacity_bytes": s.device.hbm_bytes,
    }


def fsdp_min_link_bytes(program, grad_accum: int) -> float:
    """The link bytes per chip per step an FSDP step cannot do without: per micro-batch, two gathers of
    the bf16 weights (forward, backward) and one bf16 reduce-scatter of the trainable params'
    gradients over the fsdp axis; then one all-reduce of each gradient shard over the data axis (and
    slices). 0 when nothing is sharded over fsdp (data parallelism alone: no floor of this form)."""
    f, d = program.mesh.shape["fsdp"], program.mesh.shape["data"]
    if f <= 1:
        return 0.0
    per_micro = (2 * 2 * program.params + 2 * program.trainable) * (f - 1) / f
    data = 2 * (2 * program.trainable / f) * (d - 1) / d
    return grad_accum * per_micro + data


def estimate(s: Slice, cycles: float, cycle_rate: float, link_bytes: float, model_flops: float) -> dict:
    """The step-time estimate beside the floor: compute from the compiler's own per-op cycle estimates
    (`hlo.estimated_cycles`, made seconds by `check.cycle_rate`), communication from the link bytes at
    the ICI bandwidth, overlapped (the TPU compiler runs collectives asynchronously beside compute), so
    the step takes the longer of the two. Still a compiler-based estimate, not a measurement."""
    if not (cycles and cycle_rate):
        return {"step_s_estimate": None, "mfu_estimate": None}
    compute, ici = cycles / cycle_rate, link_bytes / s.device.ici_bandwidth
    step = max(compute, ici)
    return {"estimated_cycles": int(cycles), "compute_s_estimate": compute, "ici_s_estimate": ici,
            "step_s_estimate": step, "bound_by_estimate": "compute" if compute >= ici else "ici",
            "mfu_estimate": model_flops / (s.device.peak_bf16_flops * step)}


def train_report(program, compiled, s: Slice, compile_s: float, cycle_rate: float = 0.0) -> dict:
    """One flat dict (the JSON line) for a compiled train step on slice `s` (`cycle_rate`: the
    compiler's cycles per second at peak, for the estimate; 0 leaves the estimate out)."""
    row = _run(program, s)
    tokens = row["tokens_per_step"]
    model_flops = metrics.flops_per_token(program.cfg, program.config.seq_len) * tokens / s.devices
    text = compiled.as_text()
    mem, xla = memory(compiled), cost(compiled, text)
    coll = hlo.collective_bytes(text, s.devices)
    coll_total = sum(coll["bytes"].values())
    link_total = sum(coll["link_bytes"].values())
    hbm = 2 * mem["argument_bytes"] + coll_total  # the state read and written, the collectives' results
    floor = fsdp_min_link_bytes(program, row["grad_accum"])
    row.update(
        **mem, fits=mem["peak_bytes"] <= s.device.hbm_bytes, **xla, model_flops_per_chip=model_flops,
        flops_ratio=xla["xla_flops_per_chip"] / model_flops if model_flops else None,
        collective_bytes=coll["bytes"], collective_count=coll["count"], collective_bytes_total=coll_total,
        link_bytes=coll["link_bytes"], link_bytes_total=link_total, fsdp_min_link_bytes=floor,
        link_ratio=link_total / floor if floor else None,
        unknown_trip_counts=coll["unknown_trip_counts"], hbm_bytes_min_per_chip=hbm,
    )
    b = bound(s, xla["xla_flops_per_chip"], hbm, link_total)
    mfu = model_flops / (s.device.peak_bf16_flops * b["step_s_lower_bound"]) if b["step_s_lower_bound"] else None
    row.update(b, mfu_ceiling=mfu, estimate=ESTIMATE, compile_s=round(compile_s, 1))
    cycles = hlo.estimated_cycles(text)
    row.update(estimate(s, cycles["cycles"], cycle_rate, link_total, model_flops),
               ops_without_cycle_estimate=cycles["unknown_ops"])
    if b["step_s_lower_bound"]:
        row["chip_hours_per_1b_tokens"] = 1e9 / tokens * b["step_s_lower_bound"] * s.chips * s.slices / 3600
    return row


def decode_report(program, compiled, s: Slice, compile_s: float) -> dict:
    """One flat dict for the engine's decode step on one chip."""
    text = compiled.as_text()
    mem, xla = memory(compiled), cost(compiled, text)  # the decode loop's trip count is dynamic: one step
    loop = hlo.loop_carried_bytes(text)
    row = {
        "kind": "decode", "topology": s.name, "chip": s.chip.generation, "slots": program.slots,
        "cache_len": program.cache_len, "steps_per_sync": program.steps_per_sync,
        "kv_cache_layout": program.cfg.kv_cache_layout,
        "temp_of_kv_cache": round(mem["temp_bytes"] / max(1, weight_bytes(program.kv_cache)), 3),
        "weights_bytes": weight_bytes(program.weights), "kv_cache_bytes": weight_bytes(program.kv_cache), **mem,
        "hbm_capacity_bytes": s.device.hbm_bytes, "fits": mem["peak_bytes"] <= s.device.hbm_bytes, **xla,
        "loop_int8_bytes": loop.get("s8", 0), "loop_float_bytes": sum(v for k, v in loop.items() if k in ("bf16", "f32", "f16")),
        "compile_s": round(compile_s, 1), "estimate": ESTIMATE,
    }
    # each step reads every weight and the whole KV cache (the decode state's arguments)
    row.update(bound(s, xla["xla_flops_per_chip"], mem["argument_bytes"], 0.0), hbm_bytes_min_per_chip=mem["argument_bytes"])
    return row


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT])i?B?\b")
_UNIT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) and "memory" in str(error)


def out_of_memory_report(program, error: Exception, s: Slice, compile_s: float) -> dict:
    """The row for a program the TPU compiler refused because its buffers exceed the chip's HBM: the
    sizes its message gives (what it needed first, then what the chip has)."""
    message = str(error).strip().splitlines()[0]
    sizes = [float(n) * _UNIT[u] for n, u in _SIZE.findall(message)]
    return dict(_run(program, s), peak_bytes=int(sizes[0]) if sizes else None,
                compiler_hbm_bytes=int(sizes[1]) if len(sizes) > 1 else None, fits=False, compiler_error=message,
                step_s_lower_bound=None, estimate=ESTIMATE, compile_s=round(compile_s, 1))


def _gb(x) -> str:
    return f"{x / 1e9:,.2f} GB"


def table(row: dict) -> str:
    """The readable form of a report."""
    lines = []
    if row["kind"] in ("train", "fit"):
        lines += [
            f"TPU compile check: {row['task']} step of {row['params'] / 1e9:.2f}B params ({row['model']}) on "
            f"{row['slices']} x {row['topology']} ({row['chips']} {row['chip']} chips"
            + (f", {row['devices']} devices" if row.get("devices", row["chips"]) != row["chips"] else "")
            + f"), mesh {row['mesh']}",
            f"  batch        {row['global_batch']} x {row['seq_len']} tokens, grad_accum {row['grad_accum']}, "
            f"{row['micro_batch_per_chip']:g} per chip per micro-batch, remat {row['remat']}"
            + (f", logits {row['loss_chunk']} positions at a time" if row.get("loss_chunk") else ""),
        ]
    else:
        lines.append(f"TPU compile check: decode step, {row['slots']} slots x {row['cache_len']} cache columns, "
                     f"{row['steps_per_sync']} steps per sync, one {row['chip']} device, {row['kv_cache_layout']} KV cache "
                     f"(loop temporaries {100 * row['temp_of_kv_cache']:.1f}% of it)")
        lines.append(f"  weights      {_gb(row['weights_bytes'])}, KV cache {_gb(row['kv_cache_bytes'])}; "
                     f"the loop carries {_gb(row['loop_int8_bytes'])} int8, {_gb(row['loop_float_bytes'])} float")
    fits = "fits" if row["fits"] else "DOES NOT FIT"
    if "compiler_error" in row:
        need = _gb(row["peak_bytes"]) if row["peak_bytes"] else "more"
        lines += [f"  HBM per chip needs {need} of {_gb(row['hbm_capacity_bytes'])}: {fits}",
                  f"  the TPU compiler: {row['compiler_error']}", f"  (compiled in {row['compile_s']} s)"]
        return "\n".join(lines)
    lines.append(f"  HBM per chip {_gb(row['peak_bytes'])} peak (arguments {_gb(row['argument_bytes'])}, temporaries "
                 f"{_gb(row['temp_bytes'])}) of {_gb(row['hbm_capacity_bytes'])}: {fits}")
    if row["kind"] in ("train", "fit"):
        ratio = f"{row['flops_ratio']:.2f}" if row["flops_ratio"] else "n/a"
        coll = ", ".join(f"{k} {_gb(v)}" for k, v in row["collective_bytes"].items() if v) or "none"
        lines += [
            f"  FLOPs/chip   compiled {row['xla_flops_per_chip']:.3e}, model {row['model_flops_per_chip']:.3e} "
            f"(ratio {ratio}: remat recomputation and other work beyond the model's matmuls)",
            f"  collectives  {coll} per chip per step",
            f"  links        {_gb(row['link_bytes_total'])} sent per chip per step"
            + (f", {row['link_ratio']:.2f}x the FSDP minimum ({_gb(row['fsdp_min_link_bytes'])})" if row.get("link_ratio") else ""),
            f"  step time    >= {row['step_s_lower_bound'] * 1e3:,.1f} ms ({row['bound_by']}-bound: compute "
            f"{row['compute_s'] * 1e3:,.1f}, HBM {row['hbm_s'] * 1e3:,.1f}, ICI {row['ici_s'] * 1e3:,.1f} ms); "
            f"MFU <= {row['mfu_ceiling']:.0%}",
        ]
        if row.get("step_s_estimate"):
            lines.append(f"  estimate     {row['step_s_estimate'] * 1e3:,.1f} ms ({row['bound_by_estimate']}: compiler's "
                         f"cycles {row['compute_s_estimate'] * 1e3:,.1f} ms, links {row['ici_s_estimate'] * 1e3:,.1f} ms); "
                         f"MFU ~{row['mfu_estimate']:.0%}")
        if "chip_hours_per_1b_tokens" in row:
            lines.append(f"  cost         >= {row['chip_hours_per_1b_tokens']:,.1f} chip-hours per 1B tokens")
        lines.append(f"  ({ESTIMATE}; compiled in {row['compile_s']} s)")
    else:
        lines.append(f"  per decode step: >= {_gb(row['hbm_bytes_min_per_chip'])} read, "
                     f"{row['xla_flops_per_chip']:.3e} FLOPs; >= {row['step_s_lower_bound'] * 1e3:,.2f} ms "
                     f"({row['bound_by']}-bound) ({ESTIMATE}; compiled in {row['compile_s']} s)")
    return "\n".join(lines)
