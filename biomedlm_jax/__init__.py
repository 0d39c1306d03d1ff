"""biomedlm-jax: BioMedLM reimplemented in JAX/Flax.

The top-level modules are the commands (`python -m biomedlm_jax.pretrain`, `finetune_mcqa`,
`finetune_seq2seq`, `generate`, `convert`, `prepare_data`, `tokenizer`, `checkpoint`, `evaluate_mcqa`,
`evaluate_lm`, `lm_eval`, `demo`, `bench`, `bench_inference`, `bench_prepare`, `configdoc`, `aot`): each parses
flags and calls the library. The library is in layers, each a folder that imports only from layers
below it (docs/architecture.md, enforced by tests/test_architecture.py):

    core -> models, data -> formats -> training, inference -> tasks -> evaluation, workflows -> benchmarks, planning
"""

import os as _os


def tpu_chips_here() -> bool:
    """Whether this host has TPU chips (Google's PCI vendor id, as jax's own hardware check reads it)."""
    import glob

    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == "0x1ae0":
                    return True
        except OSError:
            continue
    return bool(glob.glob("/dev/accel*"))


def _skip_the_tpu_runtime_without_tpus() -> None:
    """With libtpu installed (the [tpu] extra, which `aot` uses to compile for TPU slices) on a host
    without TPU chips, JAX would still start a TPU runtime at its first device query: warnings and a
    failed initialisation in every process. Here JAX then skips the TPU platform: it takes the others
    it finds as usual (CUDA on a GPU host, else the CPU). JAX_PLATFORMS, when set, decides instead;
    `aot` builds its compile-only TPU devices explicitly and does not need the runtime."""
    if "JAX_PLATFORMS" in _os.environ:
        return
    import glob
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or tpu_chips_here():
        return
    gpu = glob.glob("/dev/nvidia[0-9]*") and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    platforms = "cuda,cpu" if gpu else "cpu"
    _os.environ["JAX_PLATFORMS"] = platforms  # read by JAX at import, and by our subprocesses
    import sys

    if "jax" in sys.modules:  # imported before us: its config has read the environment already
        sys.modules["jax"].config.update("jax_platforms", platforms)


_skip_the_tpu_runtime_without_tpus()
