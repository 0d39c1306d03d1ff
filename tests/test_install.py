"""The pinned dependency set installs and imports together in one process, at the pinned versions."""
import importlib
import importlib.metadata as md
import re

from conftest import REPO

# distribution name -> module to import
MODULES = {
    "jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax", "orbax-checkpoint": "orbax.checkpoint",
    "chex": "chex", "ml-collections": "ml_collections", "tokenizers": "tokenizers", "tensorflow-cpu": "tensorflow",
    "tensorflow-datasets": "tensorflow_datasets",
    "importlib_resources": "importlib_resources", "safetensors": "safetensors", "tensorboardX": "tensorboardX",
    "tqdm": "tqdm", "numpy": "numpy", "ml_dtypes": "ml_dtypes", "protobuf": "google.protobuf",
    "tensorstore": "tensorstore", "pytest": "pytest", "pytest-xdist": "xdist", "torch": "torch", "transformers": "transformers",
    "lm-eval": "lm_eval", "datasets": "datasets", "accelerate": "accelerate", "gcsfs": "gcsfs",
    "gcp-storage-emulator": "gcp_storage_emulator", "peft": "peft", "qwix": "qwix", "gguf": "gguf",
    "llama-cpp-python": "llama_cpp", "apache-beam": "apache_beam", "pyarrow": "pyarrow", "s3fs": "s3fs",
    "fsspec": "fsspec",
}


def pinned_requirements():
    text = (REPO / "setup.py").read_text()
    jax_version = re.search(r'JAX_VERSION = "([^"]+)"', text).group(1)
    pins = dict(re.findall(r'"([A-Za-z0-9_.\-]+)==([^"]+)"', text))
    pins.update(dict.fromkeys(re.findall(r'f"([a-z]+)=={JAX_VERSION}"', text), jax_version))
    return pins


def test_every_pinned_package_imports_in_one_process_at_its_pinned_version():
    pins = pinned_requirements()
    assert set(MODULES) <= set(pins), f"setup.py lost a pin: {set(MODULES) - set(pins)}"
    for dist, module in MODULES.items():
        importlib.import_module(module)
        assert md.version(dist).split("+")[0] == pins[dist], f"{dist} {md.version(dist)} != pinned {pins[dist]}"
