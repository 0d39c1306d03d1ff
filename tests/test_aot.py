"""The TPU compile check (`python -m biomedlm_jax.aot`): Cloud TPU names, collectives read from HLO, the
--fit search, and real TPU programs compiled with libtpu's compile-only devices for small slices."""
import json
import subprocess
import sys

import pytest
from conftest import REPO

from biomedlm_jax.planning import fit, hlo, topology


@pytest.mark.parametrize("name,chips,shape,gen", [
    ("v4-8", 4, (2, 2, 1), "v4"), ("v4-128", 64, (4, 4, 4), "v4"), ("v5p-128", 64, (4, 4, 4), "v5p"),
    ("v5e-1", 1, (1, 1), "v5e"), ("v5e-256", 256, (16, 16), "v5e"), ("v5litepod-16", 16, (4, 4), "v5e"),
    ("v6e-256", 256, (16, 16), "v6e"),
])
def test_cloud_tpu_names_count_cores_or_chips_as_cloud_tpu_does(name, chips, shape, gen):
    s = topology.parse(name)
    assert (s.chips, s.shape, s.chip.generation, s.devices) == (chips, shape, gen, chips)
    assert topology.parse(name, slices=2).devices == 2 * chips
    assert s.device == s.chip  # one JAX device per chip


@pytest.mark.parametrize("name,chips,shape,wrap", [
    ("tpu7x-2", 1, (1, 1, 1), (False,) * 3), ("tpu7x-8", 4, (2, 2, 1), (False,) * 3),
    ("tpu7x-128", 64, (4, 4, 4), (True,) * 3), ("tpu7x-512", 256, (4, 8, 8), (True,) * 3),
])
def test_tpu7x_counts_tensorcores_and_each_is_a_device_with_half_a_chip(name, chips, shape, wrap):
    """Ironwood (TPU7x): tpu7x-N counts TensorCores like v5p-N, but JAX sees each TensorCore as a device
    (libtpu's tpu7x:2x2x1 is 8 devices), so a device has half the chip's HBM and FLOP/s (Google's
    TPU7x page: 192 GiB, 2,307 TFLOP/s bf16 per chip)."""
    s = topology.parse(name)
    assert (s.chips, s.shape, s.devices, s.wrap, s.libtpu_topology) == (
        chips, shape, 2 * chips, wrap, "tpu7x:" + "x".join(map(str, shape)))
    assert s.chip.peak_bf16_flops == 2307e12 and s.chip.hbm_bytes == 192 * 2**30
    assert s.device.hbm_bytes == 96 * 2**30 and s.device.peak_bf16_flops == 2307e12 / 2
    with pytest.raises(ValueError, match="TensorCores"):
        topology.parse("tpu7x-3")


@pytest.mark.parametrize("bad", ["v5e-3", "v4-9", "v4-4096000", "tpu-8", "v5p"])
def test_a_bad_topology_names_the_flag_and_the_choices(bad):
    with pytest.raises(ValueError, match=r"--topology="):
        topology.parse(bad)


HLO = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %p = (s32[], bf16[8,16]{1,0}) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%p), index=1
  %ag-start = (bf16[2,16]{1,0}, bf16[8,16]{1,0}) all-gather-start(bf16[2,16]{1,0} %x), dimensions={0}
  %ag-done = bf16[8,16]{1,0} all-gather-done((bf16[2,16]{1,0}, bf16[8,16]{1,0}) %ag-start)
  %rs = bf16[2,16]{1,0} reduce-scatter(bf16[8,16]{1,0} %ag-done), dimensions={0}, to_apply=%add
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(%i, %ag-done)
}

%cond (p: (s32[], bf16[8,16])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%all-reduce-scatter.3 (input.1: f32[64,16]) -> f32[16,16] {
  %input.1 = f32[64,16]{1,0} parameter(0)
  %all-reduce.9 = f32[64,16]{1,0} all-reduce(%input.1), to_apply=%add
  ROOT %ds = f32[16,16]{1,0} dynamic-slice(%all-reduce.9, %c, %p), dynamic_slice_sizes={16,16}
}

%start (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.7 = bf16[64,64]{1,0} all-gather(%p0), dimensions={0}
  ROOT %cc = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) custom-call(%all-gather.7), custom_call_target="AsyncCollectiveStart"
}

%done (p0: bf16[16,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.8 = bf16[64,64]{1,0} all-gather(%p0), dimensions={0}
  ROOT %cc = bf16[64,64]{1,0} custom-call(%p0, %p1, %all-gather.8), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main (a: f32[1024]) -> f32[] {
  %s = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%x), kind=kCustom, calls=%start
  %d = bf16[64,64]{1,0} fusion(%s), kind=kCustom, calls=%done
  %a = f32[1024]{0} parameter(0)
  %fusion.6 = f32[16,16]{1,0:T(8,128)S(1)} fusion(%gte), kind=kCustom, calls=%all-reduce-scatter.3
  %ar = f32[1024]{0} all-reduce(f32[1024]{0} %a), to_apply=%add
  %w = (s32[], bf16[8,16]{1,0}) while((s32[], bf16[8,16]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"32"}}
  %cp-start = (f32[4]{0}, f32[4]{0}) collective-permute-start(f32[4]{0} %b), source_target_pairs={{0,1}}
  %cp-done = f32[4]{0} collective-permute-done((f32[4]{0}, f32[4]{0}) %cp-start)
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_in_a_loop_count_once_per_iteration_and_async_pairs_once():
    """Also the TPU compiler's reduce-scatter (a fusion calling all-reduce-scatter.N) and its async
    start/done fusions, each counted once."""
    got = hlo.collective_bytes(HLO)
    assert got["bytes"] == {"all-gather": 32 * 8 * 16 * 2 + 64 * 64 * 2, "reduce-scatter": 32 * 8 * 16 * 2 + 64 * 16 * 4,
                            "all-reduce": 4096, "all-to-all": 0, "collective-permute": 16}
    assert got["count"]["all-gather"] == 33 and got["count"]["collective-permute"] == 1
    assert got["unknown_trip_counts"] == 0
    assert hlo.loop_carried_bytes(HLO) == {"s32": 4, "bf16": 256}


@pytest.mark.parametrize("name,wrap", [
    ("v4-8", (False,) * 3), ("v4-64", (False,) * 3), ("v4-128", (True,) * 3), ("v4-384", (True,) * 3),
    ("v5p-128", (True,) * 3), ("v5e-64", (False,) * 3), ("v5e-128", (False, True, False)),
    ("v5e-256", (True, True, False)), ("v6e-256", (True, True, False)), ("v6e-8", (False,) * 3),
])
def test_slices_wrap_around_as_cloud_tpu_builds_them(name, wrap):
    """MaxText's accelerator_to_spec_map: v4/v5p tori from 4x4x4 up; v5e/v6e wrap a 16-chip edge.
    Without wrap libtpu planned FSDP all-gathers as all-reduces of padded buffers (issue 43)."""
    assert topology.parse(name).wrap == wrap


# The TPU compiler's async all-gather: start, continuation and done fusions each hold the same
# collective (same channel_id); its reduce-scatter inside loops is named all-reduce-scatter.N.clone.M;
# windowed-einsum loops are unrolled by two (counter += 2, limit 4: 2 trips, not 4).
HLO_CHAINS = """HloModule m, entry_computation_layout={()->f32[]}

%ag_start (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.1 = bf16[64,64]{1,0} all-gather(%p0), channel_id=5, dimensions={0}
  ROOT %cc = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%ag_cont (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.2 = bf16[64,64]{1,0} all-gather(%p0), channel_id=5, dimensions={0}
  ROOT %cc = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) custom-call(%all-gather.2), custom_call_target="AsyncCollectiveContinuation"
}

%ag_done (p0: bf16[16,64], p1: bf16[64,64]) -> bf16[64,64] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.3 = bf16[64,64]{1,0} all-gather(%p0), channel_id=5, dimensions={0}
  ROOT %cc = bf16[64,64]{1,0} custom-call(%p0, %p1, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%all-reduce-scatter.4.clone.1 (input.1: f32[64,16]) -> f32[16,16] {
  %input.1 = f32[64,16]{1,0} parameter(0)
  %all-reduce.9 = f32[64,16]{1,0} all-reduce(%input.1), channel_id=7, to_apply=%add
  ROOT %ds = f32[16,16]{1,0} dynamic-slice(%all-reduce.9, %c, %p), dynamic_slice_sizes={16,16}
}

%body (p: (s32[], bf16[16,64], f32[64,16])) -> (s32[], bf16[16,64], f32[64,16]) {
  %p = (s32[], bf16[16,64]{1,0}, f32[64,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[16,64]{1,0} get-tuple-element(%p), index=1
  %g = f32[64,16]{1,0} get-tuple-element(%p), index=2
  %s = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%x), kind=kCustom, calls=%ag_start
  %c = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%s), kind=kCustom, calls=%ag_cont
  %d = bf16[64,64]{1,0} fusion(%c), kind=kCustom, calls=%ag_done
  %rs = f32[16,16]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.4.clone.1
  %two = s32[] constant(2)
  %ic = s32[] copy(s32[] %i)
  %sum = s32[] add(s32[] %ic, s32[] %two)
  %next = s32[] copy(s32[] %sum)
  ROOT %t = (s32[], bf16[16,64]{1,0}, f32[64,16]{1,0}) tuple(%next, %x, %g)
}

%cond (p: (s32[], bf16[16,64], f32[64,16])) -> pred[] {
  %p = (s32[], bf16[16,64]{1,0}, f32[64,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(4)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %limit), direction=LT
}

ENTRY %main (x: bf16[16,64], g: f32[64,16]) -> f32[] {
  %x = bf16[16,64]{1,0} parameter(0)
  %g = f32[64,16]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,64]{1,0}, f32[64,16]{1,0}) tuple(%zero, %x, %g)
  %w = (s32[], bf16[16,64]{1,0}, f32[64,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_each_collective_counts_once_and_each_loop_by_its_trips():
    """One all-gather in start/continuation/done fusions (same channel) counts once per iteration, the
    `.clone` reduce-scatter counts, and the loop runs 2 times (init 0, step 2, limit 4; the body's
    root holds a copy of the sum, as the chunked loss's scan does: counted once before). The parser
    before issue 43 counted the all-gather twice per trip, the reduce-scatter never, and 4 trips."""
    got = hlo.collective_bytes(HLO_CHAINS)
    assert got["count"]["all-gather"] == 2 and got["bytes"]["all-gather"] == 2 * 64 * 64 * 2
    assert got["count"]["reduce-scatter"] == 2 and got["bytes"]["reduce-scatter"] == 2 * 64 * 16 * 4
    assert got["count"]["all-reduce"] == 0 and got["unknown_trip_counts"] == 0


@pytest.mark.parametrize("init,step,limit,direction,trips", [
    (0, 1, 32, "LT", 32), (0, 2, 4, "LT", 2), (1, 2, 8, "LT", 4), (0, 3, 10, "LT", 4), (0, 1, 7, "LE", 8),
    (5, -1, 0, "GT", 5), (0, 2, 8, "NE", 4), (8, 1, 4, "LT", 0),
])
def test_trip_counts_come_from_the_induction_variable(init, step, limit, direction, trips):
    text = f"""HloModule m

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {{
  %p = (s32[], f32[4]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{{0}} get-tuple-element(%p), index=1
  %ar = f32[4]{{0}} all-reduce(%x), channel_id=1, to_apply=%add
  %k = s32[] constant({abs(step)})
  %next = s32[] {"add" if step > 0 else "subtract"}(%i, %k)
  ROOT %t = (s32[], f32[4]{{0}}) tuple(%next, %ar)
}}

%cond (p: (s32[], f32[4])) -> pred[] {{
  %p = (s32[], f32[4]{{0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant({limit})
  ROOT %c = pred[] compare(%i, %limit), direction={direction}
}}

ENTRY %main (x: f32[4]) -> f32[4] {{
  %x = f32[4]{{0}} parameter(0)
  %start = s32[] constant({init})
  %init = (s32[], f32[4]{{0}}) tuple(%start, %x)
  %w = (s32[], f32[4]{{0}}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4]{{0}} get-tuple-element(%w), index=1
}}
"""
    got = hlo.collective_bytes(text)
    assert got["count"]["all-reduce"] == trips and got["unknown_trip_counts"] == 0


def test_fit_takes_the_largest_micro_batch_that_fits_and_stops_at_one_micro_batch():
    # memory grows with the micro-batch; `none` fits 16 of 64 sequences, `dots_saveable` all 64
    limit = {"none": 16, "dots_saveable": 64, "dots_with_no_batch_dims_saveable": 64, "full": 64}
    calls = []

    def compile_row(remat, accum):
        calls.append((remat, accum))
        micro = 64 // accum
        return {"remat": remat, "grad_accum": accum, "fits": micro <= limit[remat], "peak_bytes": micro * 1e9,
                "hbm_capacity_bytes": 16e9, "step_s_lower_bound": 1.0 + 0.1 * accum + (remat != "none") * 0.2}

    out = fit.search(64, 4, compile_row, log=lambda m: None)
    assert fit.micro_batches(64, 4) == [4, 8, 16, 32, 64]
    assert out["best"]["remat"] == "dots_saveable" and out["best"]["grad_accum"] == 1  # 1.3 s beats none's 1.4 s
    assert not any(r == "full" for r, _ in calls)  # the search ends at the first policy that needs no accumulation
    assert fit.overrides(out["best"]) == "--config.grad_accum_steps=1 --config.model.remat_policy=dots_saveable"


def test_fit_treats_bounds_within_two_percent_as_a_tie_and_takes_less_accumulation():
    """A compute-bound bound 0.1% lower at 8x the accumulation no longer wins (v4-128 got 2 x 8 that way,
    issue 43); a bound lower by more than the tolerance still does."""
    def row(remat, accum, bound):
        return {"remat": remat, "grad_accum": accum, "step_s_lower_bound": bound}

    assert fit.better(row("dots_saveable", 1, 0.987), row("none", 8, 0.986))
    assert not fit.better(row("none", 8, 0.986), row("dots_saveable", 1, 0.987))
    assert fit.better(row("none", 2, 0.90), row("dots_saveable", 1, 1.00))  # 10% faster: worth accumulating
    assert fit.better(row("none", 1, 1.0), row("dots_saveable", 1, 1.0))  # a full tie: less recomputation


# Distinct collectives share channel ids outside async chains (the TPU compiler numbers a windowed
# einsum's collective-permutes all channel 1); only an async chain's copies of one collective (start,
# `async_collective_fusion.N` continuations) are the same collective. Groups in three notations. TPU7x
# offloads collectives to SparseCore computations, called by call-start.
HLO_CHANNELS = """HloModule m, entry_computation_layout={()->f32[]}

%ag_start (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.1 = bf16[64,64]{1,0} all-gather(%p0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %cc = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.7 (p0: bf16[16,64]) -> (bf16[16,64], bf16[64,64]) {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.2 = bf16[64,64]{1,0} all-gather(%p0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %dot.1 = f32[64,64]{1,0} dot(%p0, %p0), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %t = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) tuple(%p0, %all-gather.2)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %cp.1 = f32[8,128]{1,0} collective-permute(%x), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %cp.2 = f32[8,128]{1,0} collective-permute(%cp.1), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %cp.3 = f32[8,128]{1,0} collective-permute(%cp.2), channel_id=1, source_target_pairs={{0,1},{1,0}}
  %ar = f32[8,128]{1,0} all-reduce(%cp.3), channel_id=2, replica_groups=mesh['axis_0'=4,'axis_1'=16] {'axis_1'}, to_apply=%add
  %f = f32[8,128]{1,0} fusion(%ar), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"1000"}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %f)
}

%fused (q: f32[8,128]) -> f32[8,128] {
  %q = f32[8,128]{1,0} parameter(0)
  ROOT %n = f32[8,128]{1,0} negate(%q), backend_config={"estimated_cycles":"999999"}
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%sc_rs (p0: bf16[64,64], t: token[]) -> bf16[16,64] {
  %p0 = bf16[64,64]{1,0} parameter(0)
  ROOT %reduce-scatter.4 = bf16[16,64]{1,0} reduce-scatter(%p0), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}, execution_thread="sparsecore"

ENTRY %main (x: bf16[16,64], y: f32[8,128]) -> f32[] {
  %x = bf16[16,64]{1,0} parameter(0)
  %s = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%x), kind=kCustom, calls=%ag_start
  %rs-start = ((bf16[64,64]{1,0}, token[]), bf16[16,64]{1,0}) call-start(%x, %tok), async_execution_thread="sparsecore", to_apply=%sc_rs
  %rs-done = bf16[16,64]{1,0} call-done(%rs-start)
  %c = (bf16[16,64]{1,0}, bf16[64,64]{1,0}) fusion(%s), kind=kCustom, calls=%async_collective_fusion.7
  %w = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %a2a = bf16[16,64]{1,0} all-to-all(%x), channel_id=9, replica_groups=[2,4]<=[8], dimensions={0}
  %e = f32[8,128]{1,0} add(%y, %y), backend_config={"estimated_cycles":"20"}
  %sc = f32[8,128]{1,0} copy(%y), backend_config={"estimated_cycles":"9223372036854775807"}
  ROOT %r = f32[] constant(0)
}
"""


def test_collectives_sharing_a_channel_count_apart_unless_one_async_chain_holds_them():
    """The three permutes (channel 1, 3 trips) count 9 times; the all-gather in its start and
    continuation fusions (also channel 1) once. The parser of the first issue-43 fix counted one
    collective per channel id over the whole program: no permute here (the all-gather had taken
    channel 1), 12 of 176 in a v5e-128 step."""
    got = hlo.collective_bytes(HLO_CHANNELS, devices=8)
    assert got["count"]["collective-permute"] == 9 and got["count"]["all-gather"] == 1
    # TPU7x runs collectives on its SparseCores: a call-start of a computation that ends
    # `}, execution_thread="sparsecore"` (the parser took everything after it for one computation);
    # the reduce-scatter's operand has no printed shape (it was counted at its 1/4-size output)
    assert got["count"]["reduce-scatter"] == 1 and got["bytes"]["reduce-scatter"] == 64 * 64 * 2  # its input, by name
    assert got["bytes"]["collective-permute"] == 9 * 8 * 128 * 4
    assert got["count"]["all-reduce"] == 3 and got["count"]["all-to-all"] == 1


def test_link_bytes_follow_each_collectives_group():
    """Bytes sent per device: an all-gather of 4 sends 3/4 of its output; an all-reduce over a mesh
    axis of 16 (the TPU compiler's notation) twice 15/16 of its buffer; an all-to-all in groups of 4
    (iota notation) 3/4; a collective-permute its whole buffer."""
    got = hlo.collective_bytes(HLO_CHANNELS, devices=8)["link_bytes"]
    assert got["all-gather"] == 64 * 64 * 2 * 3 // 4
    assert got["all-reduce"] == int(3 * 8 * 128 * 4 * 2 * 15 / 16)
    assert got["all-to-all"] == 16 * 64 * 2 * 3 // 4
    assert got["collective-permute"] == 9 * 8 * 128 * 4
    assert hlo.group_size("replica_groups={}, to_apply=%add", 256) == 256
    assert hlo.link_factor("all-reduce", 1) == 0.0


def test_estimated_cycles_sum_the_compilers_per_op_estimates_loops_by_their_trips():
    """A fusion's estimate stands for what it calls (the op inside is not counted again); loop bodies
    count per trip; the compiler's "no estimate" (2^63 - 1, TPU7x's SparseCore offloads) is left out,
    not summed (it made a tpu7x-128 step read 8.6e14 ms)."""
    got = hlo.estimated_cycles(HLO_CHANNELS)
    assert got["cycles"] == 3 * 1000 + 20 and got["ops"] == 2 and got["unknown_ops"] == 1


def test_the_fsdp_minimum_is_two_weight_gathers_and_one_gradient_scatter_per_micro_batch():
    from types import SimpleNamespace

    from biomedlm_jax.planning import report

    def program(data, fsdp, params=1000, trainable=1000):
        return SimpleNamespace(mesh=SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": 1}), params=params,
                               trainable=trainable)

    assert report.fsdp_min_link_bytes(program(1, 4), 2) == 2 * (3 * 2 * 1000) * 3 / 4
    assert report.fsdp_min_link_bytes(program(1, 1), 2) == 0  # no FSDP: no floor of this form
    # LoRA: the frozen weights are gathered too, only the adapters' gradients reduced
    assert report.fsdp_min_link_bytes(program(1, 4, trainable=10), 1) == (4 * 1000 + 2 * 10) * 3 / 4
    # data parallel beside FSDP: each gradient shard is all-reduced over the data axis once per step
    assert report.fsdp_min_link_bytes(program(2, 4), 1) == 3 * 2 * 1000 * 3 / 4 + 2 * (2 * 1000 / 4) / 2


def test_fit_ranks_by_the_compiler_estimate_when_rows_have_one():
    """Two rows with the same floor: the estimate (compiler cycles and link time) decides."""
    a = {"remat": "none", "grad_accum": 2, "step_s_lower_bound": 1.0, "step_s_estimate": 1.5}
    b = {"remat": "full", "grad_accum": 1, "step_s_lower_bound": 1.0, "step_s_estimate": 2.0}
    assert fit.better(a, b) and not fit.better(b, a)
    assert fit.step_time({"step_s_lower_bound": 1.0}) == 1.0


# --- real TPU programs, compiled with libtpu's compile-only devices (no TPU here) ---------------------


def tiny(path="configs/pretrain.py", variant="tiny", **over):
    from biomedlm_jax.training import configlib

    c = configlib.load_config_file(str(REPO / path), variant)
    with c.unlocked():
        for k, v in over.items():
            node, *rest = k.split(".")
            if rest:
                c[node][rest[0]] = v
            else:
                c[k] = v
    return c


@pytest.fixture(scope="module")
def v5e_4():
    s = topology.parse("v5e-4")
    return s, topology.compile_devices(s)


@pytest.mark.slow
def test_fsdp_gathers_and_scatters_one_chip_moves_nothing_and_memory_grows_with_the_batch(v5e_4):
    from biomedlm_jax.planning import check

    s, devices = v5e_4
    fsdp = check.train(tiny(mesh_shape=(1, -1, 1), global_batch_size=8), s, devices=devices)
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and fsdp["fits"]
    assert fsdp["collective_bytes"]["all-gather"] > 0 and fsdp["collective_bytes"]["reduce-scatter"] > 0
    params_bytes = 4 * fsdp["params"]
    assert fsdp["argument_bytes"] < params_bytes  # params and moments are split over the 4 chips
    big = check.train(tiny(mesh_shape=(1, -1, 1), global_batch_size=64, logits_hbm_fraction=0.0), s, devices=devices)
    assert big["temp_bytes"] > 2 * fsdp["temp_bytes"] and big["peak_bytes"] > fsdp["peak_bytes"]
    # by default its logits (0.8 GB, over 5% of the chip) go 64 positions at a time: less memory, the
    # head recomputed in the backward pass, the chunk loop counted by its 2 trips (its counter passes
    # through a copy: once read as unknown, the FLOPs ratio read 0.84)
    chunked = check.train(tiny(mesh_shape=(1, -1, 1), global_batch_size=64), s, devices=devices)
    assert chunked["loss_chunk"] == 64 and chunked["unknown_trip_counts"] == 0
    assert chunked["temp_bytes"] < big["temp_bytes"] and big["flops_ratio"] < chunked["flops_ratio"] < 1.5
    one = topology.parse("v5e-1")
    single = check.train(tiny(global_batch_size=8), one)
    assert single["chips"] == 1 and single["collective_bytes_total"] == 0
    # the compiled FLOPs are the model's and a little more (no remat in the tiny config); without loops
    # they are XLA's own count's dots and convolutions (XLA adds elementwise FLOPs)
    for row in (fsdp, big, single):
        assert 1.0 <= row["flops_ratio"] < 1.3, row["flops_ratio"]
        assert 0.9 < row["xla_flops_per_chip"] / row["cost_analysis_flops_per_chip"] <= 1.0
        assert row["step_s_lower_bound"] > 0 and 0 < row["mfu_ceiling"] <= 1
    for key in ("peak_bytes", "argument_bytes", "temp_bytes", "hbm_capacity_bytes", "xla_flops_per_chip",
                "model_flops_per_chip", "flops_ratio", "collective_bytes", "hbm_bytes_min_per_chip", "compute_s",
                "ici_s", "step_s_lower_bound", "mfu_ceiling", "chip_hours_per_1b_tokens", "compile_s", "estimate",
                "link_bytes", "link_ratio", "step_s_estimate", "mfu_estimate", "loss_chunk", "devices"):
        assert key in fsdp, key  # the CLI's JSON line is this row
    json.dumps(fsdp)
    assert big["tokens_per_step"] == 64 * 128 and single["micro_batch_per_chip"] == 8


@pytest.mark.slow
def test_on_a_v4_torus_fsdp_weights_move_by_all_gather(monkeypatch):
    """v4-128 compiled as Cloud TPU builds it (a 4x4x4 torus): the FSDP weight gathers are all-gathers,
    about two bf16 weight passes per step here. Without the wrap-around links libtpu planned every one
    as an all-reduce of a zero-padded buffer (the 123 GB of all-reduce docs/tpu.md once showed)."""
    from biomedlm_jax.planning import check

    s = topology.parse("v4-128")
    c = tiny(mesh_shape=(1, -1, 1), global_batch_size=s.chips * 4, grad_accum_steps=2, **{
        "model.dtype": "bfloat16", "model.d_model": 256, "model.n_head": 4})
    torus = check.train(c, s)
    bf16_params = 2 * torus["params"]
    moved = {k: v / bf16_params for k, v in torus["collective_bytes"].items()}
    assert moved["all-gather"] >= 2.0 and moved["all-reduce"] <= 2.1, moved  # all-reduce: the gradients
    monkeypatch.setattr(topology.Slice, "wrap", property(lambda self: (False, False, False)))
    open_lines = check.train(c, s)
    assert open_lines["collective_bytes"]["all-gather"] == 0
    assert open_lines["collective_bytes"]["all-reduce"] > torus["collective_bytes"]["all-reduce"] + 0.9 * torus["collective_bytes"]["all-gather"]


@pytest.mark.slow
def test_a_tpu7x_slice_compiles_with_a_device_per_tensorcore():
    """tpu7x-8 (Ironwood, 4 chips) compiles as 8 devices of 96 GiB each, with the compiler-cycle
    estimate beside the floor."""
    from biomedlm_jax.planning import check

    s = topology.parse("tpu7x-8")
    row = check.train(tiny(mesh_shape=(1, -1, 1), global_batch_size=16), s)
    assert (row["chips"], row["devices"], row["mesh"]["fsdp"], row["chip"]) == (4, 8, 8, "tpu7x")
    assert row["hbm_capacity_bytes"] == 96 * 2**30 and row["fits"]
    assert row["step_s_estimate"] >= row["compute_s"] > 0 and 0 < row["mfu_estimate"] <= row["mfu_ceiling"]
    assert topology.compile_devices(s)[0].device_kind == "TPU7x"


@pytest.mark.slow
def test_the_reduce_scatter_probe_says_what_the_compiler_made_of_one():
    """`aot --probe=reduce_scatter`: a shard_map gradient asks for a reduce-scatter by name. libtpu
    0.0.42.1 keeps it on v5e-4 and compiles it as an all-reduce of the whole gradient (and a slice) on
    v5e-16, as on v4-128, v5p-128, v5e-256 and v6e-256 (docs/tpu.md). Should a libtpu upgrade change
    that, this fails and the docs' account of the gradients needs redoing."""
    from biomedlm_jax.planning import check

    kept = check.reduce_scatter_probe(topology.parse("v5e-4"), rows=256, cols=1024)
    refused = check.reduce_scatter_probe(topology.parse("v5e-16"), rows=256, cols=1024)
    assert kept["asked_for_reduce_scatter"] and refused["asked_for_reduce_scatter"]
    assert kept["compiled_as"] == {"reduce-scatter": 1} and "reduce-scatter(" in kept["hlo"]
    assert refused["compiled_as"] == {"all-reduce": 1} and "all-reduce(" in refused["hlo"]
    # the all-reduce sends 2 (n-1)/n of the gradient, twice what the reduce-scatter would
    assert refused["link_bytes"]["all-reduce"] == int(2 * refused["gradient_bytes_bf16"] * 15 / 16)
    assert refused["gradient_bytes_bf16"] == 256 * 1024 * 2


@pytest.mark.slow
def test_a_scanned_model_counts_every_layer_and_full_remat_recomputes(v5e_4):
    from biomedlm_jax.planning import check

    s, devices = v5e_4
    model = {"model.n_layer": 4, "model.d_model": 256, "model.n_head": 4, "model.vocab_size": 512,
             "model.scan_layers": True}  # the blocks' FLOPs dominate (not the head's, as in tiny's vocabulary)
    plain = check.train(tiny(**model), s, devices=devices)
    remat = check.train(tiny(**model, **{"model.remat_policy": "full"}), s, devices=devices)
    # XLA's cost analysis counts the scanned layers' loop body once; the report counts it 4 times
    assert plain["cost_analysis_flops_per_chip"] < 0.5 * plain["xla_flops_per_chip"]
    assert 0.95 < plain["flops_ratio"] < 1.1
    assert remat["flops_ratio"] > plain["flops_ratio"] + 0.15  # the forward pass again in the backward


@pytest.mark.slow
def test_mcqa_lora_and_seq2seq_configs_compile_with_their_tasks(v5e_4):
    from biomedlm_jax.planning import check

    s, devices = v5e_4
    lora = check.train(tiny("configs/mcqa.py", "medqa-tiny-lora"), s, options=4, devices=devices)
    assert lora["task"] == "mcqa" and lora["lora_rank"] > 0 and lora["trainable_params"] < lora["params"]
    assert lora["tokens_per_step"] == 4 * 128 * 8  # 4 options per question
    s2s = check.train(tiny("configs/seq2seq.py", "tiny"), s, devices=devices)
    assert s2s["task"] == "seq2seq" and s2s["fits"]


@pytest.mark.slow
def test_fit_keeps_the_global_batch_and_prints_overrides(v5e_4):
    from biomedlm_jax.planning import check

    s, _ = v5e_4
    out = check.fit(tiny(global_batch_size=8), s, log=lambda m: None)
    assert out["best"]["grad_accum"] == 1 and out["best"]["remat"] == "none" and len(out["tried"]) == 2
    assert out["overrides"] == "--config.grad_accum_steps=1 --config.model.remat_policy=none"


def test_the_decode_loop_reads_int8_weights_on_tpu():
    """XLA:CPU hoists the int8 kernels' dequantization out of the decode loop (docs/inference.md); the
    TPU compiler does not: the loop carries the kernels and the head as int8, and no float copy."""
    from biomedlm_jax.planning import check

    s = topology.parse("v5e-1")
    config = tiny(**{"model.dtype": "bfloat16", "model.d_model": 256, "model.n_head": 4})
    bf16 = check.decode(config, s, slots=4, max_len=128, max_new_tokens=32)
    int8 = check.decode(config, s, slots=4, max_len=128, max_new_tokens=32, quantize="int8")
    L, d = 2, 256
    kernels = L * (4 * d * d + 2 * d * 4 * d)
    vocab = 50257
    assert bf16["kv_cache_bytes"] == int8["kv_cache_bytes"] == 2 * L * 4 * bf16["cache_len"] * d * 2
    assert bf16["loop_int8_bytes"] == 0
    assert int8["loop_int8_bytes"] >= kernels + vocab * d  # kernels and the tied head, as int8
    assert int8["loop_float_bytes"] < bf16["loop_float_bytes"] - kernels  # no float copy of the kernels
    assert int8["hbm_bytes_min_per_chip"] < bf16["hbm_bytes_min_per_chip"]  # what a step must read


@pytest.mark.slow
def test_cli_prints_json_and_a_table_and_exits_1_when_the_run_does_not_fit():
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.aot", f"--config={REPO}/configs/pretrain.py:tiny",
                        "--topology=v5litepod-1", "--config.global_batch_size=4096",
                        "--config.logits_hbm_fraction=0"],  # whole logits: 210 GB, refused (chunked it fits)
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stderr[-3000:]
    row = json.loads(r.stdout.splitlines()[0])  # the TPU compiler refuses it and says how much it needs
    assert row["fits"] is False and row["peak_bytes"] > row["hbm_capacity_bytes"] == 16e9
    assert row["topology"] == "v5e-1" and "DOES NOT FIT" in r.stdout and "RESOURCE_EXHAUSTED" in row["compiler_error"]
    assert "Traceback" not in r.stderr
    assert "WARNING" not in r.stderr and "E0000" not in r.stderr, r.stderr[-2000:]  # libtpu stays quiet
