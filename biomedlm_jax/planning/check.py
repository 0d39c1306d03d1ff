"""The TPU compile check behind `python -m biomedlm_jax.aot`: compile a run's real programs for a Cloud
TPU slice this host does not have, and report what they need and cost (planning.report)."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from biomedlm_jax.planning import fit as fit_lib
from biomedlm_jax.planning import programs, report, topology


_RATES: dict = {}  # device kind -> cycle_rate


def cycle_rate(s: topology.Slice, device) -> float:
    """The TPU compiler's cycles per second at the device's peak: the rate at which its own per-op
    estimate for a large bf16 matmul (8192 x 8192 x 8192, compiled here once per device kind) takes
    exactly the FLOPs at the published peak. It turns `estimated_cycles` into seconds without a clock
    frequency (Google publishes none), and says how far from its best matmul the compiler expects a
    program to run: a program of such matmuls estimates to the peak floor, anything else to more."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from biomedlm_jax.planning import hlo

    if device.device_kind not in _RATES:
        n, on = 8192, SingleDeviceSharding(device)
        x = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=on)
        text = jax.jit(jnp.matmul).lower(x, x).compile().as_text()
        cycles = hlo.estimated_cycles(text)["cycles"]
        _RATES[device.device_kind] = s.device.peak_bf16_flops * cycles / (2.0 * n**3) if cycles else 0.0
    return _RATES[device.device_kind]


def train(config, s: topology.Slice, options: int = 4, devices: Optional[list] = None) -> dict:
    """Compile the config's train step for slice `s`; the report row."""
    devices = devices or topology.compile_devices(s)
    program = programs.train_program(config, s, devices, options)
    t0 = time.perf_counter()
    try:
        compiled = program.lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs whose buffers exceed the chip's HBM
        if not report.is_out_of_memory(e):
            raise
        return report.out_of_memory_report(program, e, s, time.perf_counter() - t0)
    return report.train_report(program, compiled, s, time.perf_counter() - t0, cycle_rate(s, devices[0]))


def fit(config, s: topology.Slice, options: int = 4, log: Callable[[str], None] = print) -> dict:
    """`--fit`: {"best": row or None, "tried": rows, "overrides": flags or None}."""
    from biomedlm_jax.models import sharding

    devices = topology.compile_devices(s)
    shape = sharding.resolve_mesh_shape(tuple(config.mesh_shape), s.devices_per_slice)
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
    # (TPU7x: one chip, tpu7x-2, whose two devices are its TensorCores; the step runs on one)
    smallest = {"v5e": "v5e-1", "v6e": "v6e-1", "tpu7x": "tpu7x-2"}
    one = topology.parse(smallest[s.chip.generation]) if s.chip.generation in smallest else s
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


def reduce_scatter_probe(s: topology.Slice, rows: int = 2560, cols: int = 10240) -> dict:
    """`--probe=reduce_scatter`: whether the TPU compiler keeps a reduce-scatter the program asks for.

    The smallest FSDP step written by hand: a (rows, cols) weight sharded over every device, gathered in
    bf16 inside `shard_map` (`all_gather`), whose gradient is therefore a `psum_scatter`: the lowered
    program holds a `reduce_scatter` by name. Returns what the compiled program does instead (issue 43:
    on v4-128, v5p-128, v5e-256 and v6e-256 libtpu 0.0.42.1 compiles it as an all-reduce of the whole
    gradient and a slice; on v5e-4 and v5e-128 as a reduce-scatter) and the compiled collective's line."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from biomedlm_jax.planning import hlo

    devices = topology.compile_devices(s)
    mesh = Mesh(np.asarray(mesh_utils.create_device_mesh((len(devices),), devices)), ("fsdp",))

    def local_loss(w_shard, x):
        w = jax.lax.all_gather(w_shard.astype(jnp.bfloat16), "fsdp", axis=1, tiled=True)
        y = x.astype(jnp.bfloat16) @ w
        return jax.lax.psum(jnp.sum(y.astype(jnp.float32) ** 2), "fsdp")

    loss = jax.shard_map(local_loss, mesh=mesh, in_specs=(P(None, "fsdp"), P("fsdp")), out_specs=P())

    def step(w, x):
        return w - 0.1 * jax.grad(loss)(w, x)

    w_sharding, x_sharding = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P("fsdp"))
    lowered = jax.jit(step, in_shardings=(w_sharding, x_sharding), out_shardings=w_sharding).lower(
        jax.ShapeDtypeStruct((rows, cols), jnp.float32), jax.ShapeDtypeStruct((2 * len(devices), 128, rows), jnp.float32))
    text = lowered.compile().as_text()
    got = hlo.collective_bytes(text, len(devices))
    kinds = ("reduce-scatter", "all-reduce")
    line = next((ln.strip() for ln in text.splitlines()
                 if any(f" {k}(" in ln for k in kinds) or "calls=%all-reduce-scatter" in ln), "")
    return {"kind": "probe", "probe": "reduce_scatter", "topology": s.name, "devices": len(devices),
            "asked_for_reduce_scatter": "reduce_scatter" in lowered.as_text(),
            "gradient_bytes_bf16": 2 * rows * cols,
            "compiled_as": {k: got["count"][k] for k in kinds if got["count"][k]},
            "link_bytes": {k: got["link_bytes"][k] for k in kinds if got["link_bytes"][k]},
            "hlo": line[:400]}
