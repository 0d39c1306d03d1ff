"""Cloud TPU slices by the names Cloud TPU gives them, their chips' published figures, and compile-only
devices for them from libtpu (no TPU needed).

Names: `v4-N` and `v5p-N` count TensorCores (two per chip, one "megacore" JAX device per chip), so
v4-128 is 64 chips; `v5e-N` (also `v5litepod-N`) and `v6e-N` count chips, so v5e-256 is 256 chips.
`tpu7x-N` (Ironwood) counts TensorCores too, and each is a JAX device: tpu7x-128 is 64 chips, 128
devices, and every per-device figure (HBM, FLOP/s) is half the chip's.
The physical layouts follow Cloud TPU's tables (the same as MaxText's accelerator_to_spec_map and
xpk): v4/v5p slices are 3-D tori of 2x2x1 ... 16x16x16 chips, v5e/v6e slices 2-D grids up to 16x16.

Wrap-around links (`Slice.wrap`) as Cloud TPU builds the slices, following MaxText's
accelerator_to_spec_map (github.com/AI-Hypercomputer/maxtext, MaxText/accelerator_to_spec_map.py): a
v4/v5p slice whose every dimension is 4 or more (64 chips and up: 4x4x4, 4x4x8, ...) is a torus in all
three dimensions (Cloud TPU's v5p page: "All 4x4x4 and larger slices (one cube) have full 3D torus"
connectivity), smaller ones wrap nowhere; a v5e/v6e slice wraps each dimension that spans a whole
pod edge of 16 chips (8x16: the 16 only; 16x16: both). libtpu compiles what it is told: without wrap
it plans each FSDP all-gather as an all-reduce of a zero-padded buffer over open lines, about twice
the link traffic (issue 43).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures from Google's published system-architecture pages (`source`)."""

    generation: str  # as in topology names: v4, v5e, v5p, v6e
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, all links together, one direction
    source: str
    devices_per_chip: int = 1  # JAX devices per chip: 2 on TPU7x (a device per TensorCore), else 1

    def per_device(self) -> "Chip":
        """The figures of one JAX device: the chip's divided among its devices (TPU7x: halves)."""
        n = self.devices_per_chip
        if n == 1:
            return self
        return dataclasses.replace(self, peak_bf16_flops=self.peak_bf16_flops / n, hbm_bytes=self.hbm_bytes // n,
                                   hbm_bandwidth=self.hbm_bandwidth / n, ici_bandwidth=self.ici_bandwidth / n,
                                   devices_per_chip=1)


GiB = 1 << 30
CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s, ICI 2,400 Gbps
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 2400e9 / 8, "https://cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 1,600 Gbps
    "v5e": Chip("v5e", 197e12, 16 * 10**9, 819e9, 1600e9 / 8, "https://cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps
    "v5p": Chip("v5p", 459e12, 95 * 10**9, 2765e9, 4800e9 / 8, "https://cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s, ICI 3,584 Gbps
    "v6e": Chip("v6e", 918e12, 32 * 10**9, 1640e9, 3584e9 / 8, "https://cloud.google.com/tpu/docs/v6e"),
    # TPU7x (Ironwood). https://docs.cloud.google.com/tpu/docs/tpu7x: two TensorCores per chip, 2,307
    # TFLOP/s bf16, 192 GiB HBM per chip. Bandwidths from Google's announcement ("Ironwood: the first
    # Google TPU for the age of inference", blog.google, April 2025): HBM 7.37 TB/s, ICI 1.2 TB/s
    # bidirectional (600 GB/s each way). JAX sees each TensorCore as a device (libtpu's "tpu7x:2x2x1"
    # is 8 devices of kind TPU7x; there is no megacore config), so each device has half of each.
    "tpu7x": Chip("tpu7x", 2307e12, 192 * GiB, 7.37e12, 1.2e12 / 2, "https://docs.cloud.google.com/tpu/docs/tpu7x",
                  devices_per_chip=2),
}

# chips -> the slice's physical shape, as Cloud TPU lays it out
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_TORUS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             192: (4, 4, 12), 256: (4, 8, 8), 512: (8, 8, 8), 768: (8, 8, 12), 1024: (8, 8, 16),
             2048: (8, 16, 16), 4096: (16, 16, 16)}
# libtpu's names for the generations in topology strings
_LIBTPU_NAME = {"v4": "v4", "v5p": "v5", "v5e": "v5e", "v6e": "v6e", "tpu7x": "tpu7x"}
# TPU7x slices: v5p's 3-D shapes, and one chip (tpu7x-2, 1x1x1, the tpu7x-standard-1t machine type)
_TPU7X = {1: (1, 1, 1), **_TORUS_3D}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as the user typed it, normalised (v5litepod-16 -> v5e-16)
    chip: Chip
    chips: int
    shape: tuple  # physical chips per dimension
    slices: int = 1

    @property
    def devices_per_slice(self) -> int:
        """JAX devices in one slice: one per chip (v4 and v5p run as megacore), two on TPU7x."""
        return self.chips * self.chip.devices_per_chip

    @property
    def devices(self) -> int:
        """JAX devices in all slices."""
        return self.devices_per_slice * self.slices

    @property
    def device(self) -> Chip:
        """One JAX device's figures (a chip's, or half a TPU7x chip's): what each program runs on."""
        return self.chip.per_device()

    @property
    def wrap(self) -> tuple:
        """Which of the (up to three) physical dimensions have wrap-around links (see the module doc)."""
        dims = tuple(self.shape) + (1,) * (3 - len(self.shape))
        if self.chip.generation in ("v4", "v5p", "tpu7x"):  # TPU7x: v5p's cubes (its page likens the two)
            return (all(d >= 4 for d in dims),) * 3
        return tuple(d == 16 for d in dims[:2]) + (False,)

    @property
    def accelerator_type(self) -> str:
        """Cloud TPU's name for one slice (v5e is v5litepod there)."""
        return self.name.replace("v5e-", "v5litepod-")

    @property
    def libtpu_topology(self) -> str:
        return f"{_LIBTPU_NAME[self.chip.generation]}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        links = "torus" if all(self.wrap[: len(self.shape)]) else "partly wrapped" if any(self.wrap) else "no wrap"
        s = f"{self.name} ({self.chips} {self.chip.generation} chips, {'x'.join(map(str, self.shape))}, {links})"
        return s if self.slices == 1 else f"{self.slices} x {s}"


def parse(name: str, slices: int = 1) -> Slice:
    """A Cloud TPU accelerator type such as v5e-256, v5litepod-16, v4-128, v5p-128, v6e-256 or tpu7x-128."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e|tpu7x)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"--topology={name!r}: expected a Cloud TPU type such as v5e-256, v5litepod-16, v4-128, "
                         "v5p-128, v6e-256 or tpu7x-128")
    gen, n = ("v5e" if m.group(1) == "v5litepod" else m.group(1)), int(m.group(2))
    if slices < 1:
        raise ValueError(f"--slices={slices} must be >= 1")
    if gen in ("v4", "v5p", "tpu7x"):
        shapes = _TPU7X if gen == "tpu7x" else _TORUS_3D
        if n % 2 or n // 2 not in shapes:
            raise ValueError(f"--topology={name}: {gen}-N counts TensorCores (2 per chip); N is one of "
                             f"{', '.join(str(2 * c) for c in shapes)}")
        chips, shape = n // 2, shapes[n // 2]
    else:
        if n not in _GRID_2D:
            raise ValueError(f"--topology={name}: {gen}-N counts chips; N is one of {', '.join(map(str, _GRID_2D))}")
        chips, shape = n, _GRID_2D[n]
    return Slice(f"{gen}-{n}", CHIPS[gen], chips, shape, slices)


def compile_devices(s: Slice) -> list:
    """libtpu's compile-only devices for the slice(s): enough to lower and compile a real TPU program
    on a host with no TPU (`pip install 'biomedlm-jax[tpu]'` gives libtpu)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise SystemExit("compiling for a TPU needs libtpu: pip install -e '.[tpu]' (or jax[tpu])") from e
    from jax.experimental import topologies

    import biomedlm_jax

    if not biomedlm_jax.tpu_chips_here():
        # libtpu asks the GCE metadata server for the host's TPU type and workers; off a TPU VM it gets
        # none and logs several warning lines. These say what it would have learnt (the compile-only
        # topology comes from the arguments below, not from them).
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", s.accelerator_type)
        # libtpu lets one process at a time own the chips (/tmp/libtpu_lockfile); compile-only devices
        # own nothing, so several checks may run side by side.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    host_bounds = (1, 1, 1) if s.chips == 1 else (2, 2, 1)
    desc = topologies.get_topology_desc(topology_name=s.libtpu_topology, platform="tpu",
                                        chip_config_name="megacore" if s.chip.generation in ("v4", "v5p") else "default",
                                        chips_per_host_bounds=host_bounds, num_slices=s.slices, wrap=s.wrap)
    devices = list(desc.devices)
    if len(devices) != s.devices:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {s.describe()}, expected {s.devices}")
    return devices


def mesh_for(s: Slice, mesh_shape, devices: list):
    """The run's (data, fsdp, tensor) mesh over the slice's devices, laid out on the physical torus. With
    several slices the slices multiply the data axis (data parallelism over the data-centre network)."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from biomedlm_jax.models import sharding

    per_slice = sharding.resolve_mesh_shape(tuple(mesh_shape), s.devices_per_slice)
    if s.slices == 1:
        grid = mesh_utils.create_device_mesh(per_slice, devices)
    else:
        dcn = (s.slices,) + (1,) * (len(per_slice) - 1)
        grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices)
    assert math.prod(grid.shape) == len(devices), (grid.shape, len(devices))
    return Mesh(np.asarray(grid), tuple(sharding.MESH_AXES))
