"""`aot --fit`: the per-chip micro-batch and remat policy that fit a slice, at the global batch the config
asks for, chosen by the compiler-based step-time bound.

For each remat policy, from the least recomputation (none) to the most (full), a binary search over the
micro-batches that divide the global batch finds the largest that fits HBM; its gradient accumulation
keeps the global batch. Among those, the lowest step-time bound wins (more accumulation repeats
FSDP's weight all-gathers, more remat repeats FLOPs), and on a tie the one with less accumulation. A policy that fits the whole batch in one
micro-batch ends the search: nothing after it recomputes less or gathers fewer times.
"""
from __future__ import annotations

from typing import Callable

REMAT_ORDER = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")


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
            log(f"[fit] remat={remat} micro-batch {sizes[mid]} (grad_accum {global_batch // sizes[mid]}): {need} of "
                f"{row['hbm_capacity_bytes'] / 1e9:.2f} GB, {'fits' if row['fits'] else 'does not fit'}{step}")
            if row["fits"]:
                fit_row, lo = row, mid + 1
            else:
                hi = mid - 1
        if fit_row and (best is None or _rank(fit_row) < _rank(best)):
            best = fit_row
        if fit_row and fit_row["grad_accum"] == 1:
            break
    return {"best": best, "tried": tried}


def _rank(row: dict) -> tuple:
    """Lower is better: the bound, then (on a tie, e.g. both compute-bound) less accumulation."""
    return round(row["step_s_lower_bound"], 6), row["grad_accum"]


def overrides(row: dict) -> str:
    return f"--config.grad_accum_steps={row['grad_accum']} --config.model.remat_policy={row['remat']}"
