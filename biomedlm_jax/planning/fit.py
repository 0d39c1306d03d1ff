"""`aot --fit`: the per-chip micro-batch and remat policy that fit a slice, at the global batch the config
asks for, chosen by the compiler-based step-time estimate (the TPU compiler's own per-op cycle
estimates and the link time: report.estimate), or the floor where there is no estimate.

For each remat policy, from the least recomputation (none) to the most (full), a binary search over the
micro-batches that divide the global batch finds the largest that fits HBM; its gradient accumulation
keeps the global batch. Among those, the lowest step time wins (more accumulation repeats
FSDP's weight all-gathers, more remat repeats FLOPs). Step times within `TIE` (2%) of each other are a
tie, since they are estimates: then less accumulation wins, then less recomputation. (Rounded
to 1 us, as before issue 43, compute-bound rows 0.1% apart were not ties, and v4-128 got 2 x 8.) A
policy that fits the whole batch in one micro-batch ends the search: nothing after it recomputes less
or gathers fewer times.
"""
from __future__ import annotations

from typing import Callable

REMAT_ORDER = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
TIE = 0.02  # bounds closer than this (relative) are a tie


def micro_batches(global_batch: int, batch_ways: int) -> list[int]:
    """Micro-batch sizes (sequences, all chips together) that split over the batch shards and divide the
    global batch, smallest first."""
    return [m for m in range(batch_ways, global_batch + 1, batch_ways) if global_batch % m == 0]


def search(global_batch: int, batch_ways: int, compile_row: Callable[[str, int], dict],
           log: Callable[[str], None] = print) -> dict:
    """compile_row(remat, grad_accum) -> a train report row. Returns {"best": row or None, "tried": [...]}."""
    sizes = micro_batches(global_batch, batch_ways)
    if not sizes:
        raise ValueError(f"global batch {global_batch} does not split over {batch_ways} batch shards")
    tried, best = [], None
    for remat in REMAT_ORDER:
        lo, hi, fit_row = 0, len(sizes) - 1, None
        while lo <= hi:  # the largest micro-batch that fits (memory grows with it)
            mid = (lo + hi) // 2
            row = compile_row(remat, global_batch // sizes[mid])
            tried.append(row)
            need = f"{row['peak_bytes'] / 1e9:.2f} GB" if row.get("peak_bytes") else "more"
            step = f"; step >= {row['step_s_lower_bound'] * 1e3:,.1f} ms" if row.get("step_s_lower_bound") else ""
            step += f", ~{row['step_s_estimate'] * 1e3:,.1f} ms estimated" if row.get("step_s_estimate") else ""
            log(f"[fit] remat={remat} micro-batch {sizes[mid]} (grad_accum {global_batch // sizes[mid]}): {need} of "
                f"{row['hbm_capacity_bytes'] / 1e9:.2f} GB, {'fits' if row['fits'] else 'does not fit'}{step}")
            if row["fits"]:
                fit_row, lo = row, mid + 1
            else:
                hi = mid - 1
        if fit_row and (best is None or better(fit_row, best)):
            best = fit_row
        if fit_row and fit_row["grad_accum"] == 1:
            break
    return {"best": best, "tried": tried}


def step_time(row: dict) -> float:
    """What --fit ranks by: the compiler-cycle estimate (report.estimate) when the row has one, else the
    floor."""
    return row.get("step_s_estimate") or row["step_s_lower_bound"]


def better(a: dict, b: dict, tie: float = TIE) -> bool:
    """Whether row a beats row b: a step time (`step_time`) lower by more than `tie` (relative); within
    it, less accumulation; then less recomputation (the policies in REMAT_ORDER)."""
    ta, tb = step_time(a), step_time(b)
    if abs(ta - tb) > tie * max(ta, tb):
        return ta < tb
    return (a["grad_accum"], REMAT_ORDER.index(a["remat"])) < (b["grad_accum"], REMAT_ORDER.index(b["remat"]))


def overrides(row: dict) -> str:
    return f"--config.grad_accum_steps={row['grad_accum']} --config.model.remat_policy={row['remat']}"
