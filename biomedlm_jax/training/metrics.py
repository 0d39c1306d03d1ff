"""Training metrics: model FLOPs / MFU, and a writer for metrics.jsonl + TensorBoard (process 0 only).

MFU formula (PaLM appendix B / nanoGPT), per token of a training step (forward + backward):

    flops_per_token = 6 * N + 12 * n_layer * d_model * seq_len

N counts the matmul weights a token passes through: per layer c_attn (3 d^2), attn c_proj (d^2),
mlp c_fc and c_proj (2 d d_ff), plus the tied output head (vocab * d). Position embeddings, biases and
LayerNorms are left out. The second term is the attention score/value matmuls. Remat recomputation is
*not* counted (it is hardware FLOPs, not model FLOPs), so MFU stays comparable across remat policies.
MFU = tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import jax

from biomedlm_jax.core import paths
from biomedlm_jax.models.gpt_config import GPTConfig

# Dense bf16 peak FLOP/s per device (vendor datasheets). Matched as substrings of device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


# Memory bandwidth per device in bytes/s (vendor datasheets), for the decoding roofline. Matched in order
# as substrings of device_kind, so the PCIe H100 (2.0 TB/s) is found before the SXM one.
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "A100": 2.0e12,
    "L4": 300e9,
    "TPU v6": 1.64e12,
    "TPU v5p": 2.77e12,
    "TPU v5 lite": 819e9,
    "TPU v5e": 819e9,
    "TPU v4": 1.2e12,
}


def _device_value(table: dict, device=None) -> Optional[float]:
    """The first entry of `table` whose key is a substring of the device's kind, or None (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((value for key, value in table.items() if key.lower() in kind), None)


def peak_bandwidth_per_device(device=None) -> Optional[float]:
    """Memory bandwidth of `device` in bytes/s from the table, or None when unknown (e.g. CPU)."""
    return _device_value(PEAK_BANDWIDTH, device)


def matmul_params(cfg: GPTConfig) -> int:
    d, f = cfg.d_model, cfg.ffn_dim
    return cfg.n_layer * (4 * d * d + 2 * d * f) + cfg.vocab_size * d


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training (fwd + bwd) model FLOPs per token; see the module docstring."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.d_model * seq_len


def peak_flops_per_device(device=None) -> Optional[float]:
    """Peak bf16 FLOP/s of `device` from the table, or None when unknown (e.g. CPU)."""
    return _device_value(PEAK_FLOPS, device)


def mfu(tokens_per_s: float, cfg: GPTConfig, seq_len: int, n_devices: int, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (n_devices * peak)


class MetricsWriter:
    """Appends one JSON object per call to `workdir/metrics.jsonl` and writes TensorBoard scalars to
    `workdir/tensorboard/`. Only process 0 writes; other processes get a no-op writer.

    On an object-store workdir (gs://...), which cannot append, metrics.jsonl is rewritten whole at
    each write, and the TensorBoard events are written to a local folder and uploaded at each write.
    """

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._path = paths.join(workdir, "metrics.jsonl")
        self._remote = paths.is_remote(workdir)
        self._tb = self._tb_local = None
        self._tb_dir = paths.join(workdir, "tensorboard")
        if not self.enabled:
            return
        paths.makedirs(workdir)
        if tensorboard:
            from tensorboardX import (
                SummaryWriter,  # lazy: TensorBoard is only needed for logging
            )

            if self._remote:
                import tempfile

                self._tb_local = tempfile.mkdtemp(prefix="biomedlm_jax-tb-")
            self._tb = SummaryWriter(self._tb_local or self._tb_dir)

    def write(self, step: int, scalars: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        # JSON has no NaN: a metric that is not a finite number (e.g. all steps in a window skipped) is null.
        clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in scalars.items()}
        paths.append_lines(self._path, [json.dumps({"step": int(step), "split": split, **clean})])
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(f"{split}/{k}", v, int(step))
            if self._tb_local:
                self._tb.flush()
                paths.copytree(self._tb_local, self._tb_dir)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            if self._tb_local:
                import shutil

                paths.copytree(self._tb_local, self._tb_dir)
                shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb = None


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
    """Rows of `workdir/metrics.jsonl` (optionally one split), for notebooks and tests."""
    rows = []
    for line in paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines():
        if line.strip():
            row = json.loads(line)
            if split is None or row.get("split") == split:
                rows.append(row)
    return rows


def host_cpu() -> Optional[str]:
    """The host CPU's model name, its core count and the vector extensions that decide CPU results
    (XLA:CPU and torch pick kernels by them), e.g. "Intel(R) Xeon(R) Processor, 2 cores, avx512f avx512_bf16"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{fields.get('model name', '?')}, {os.cpu_count()} cores, {' '.join(wanted) or 'no avx2'}"
