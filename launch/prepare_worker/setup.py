"""A slim install of biomedlm_jax for corpus-preparation workers (Apache Beam: Dataflow, Flink, Spark).

    python -m biomedlm_jax.prepare_data ... --runner=DataflowRunner --setup_file=./launch/prepare_worker/setup.py

Preparation imports only `biomedlm_jax.core` and `biomedlm_jax.data` (tested: tests/test_prepare_worker.py),
whose needs are numpy, tokenizers, etils' path layer and fsspec's object stores. This package holds just
those modules, copied from the checkout around it when Beam builds its sdist, with just those
dependencies: no jax, TensorFlow or torch on the workers (docs/data.md has the measured sizes). The
launcher itself keeps the full install (`pip install -e .[beam]`); Beam is on the workers already.
The pins are the root setup.py's (a test keeps them equal).
"""
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.join(HERE, "..", "..", "biomedlm_jax")
MODULES = ("__init__.py", "core", "data")  # what preparation imports

PREPARE_REQUIRES = [
    "numpy==2.4.6",
    "tokenizers==0.23.3",
    "etils[epath]==1.15.0",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "s3fs==2026.9.0",
]

if os.path.isdir(CHECKOUT):  # building the sdist in a checkout: take the modules fresh from it
    target = os.path.join(HERE, "biomedlm_jax")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for name in MODULES:
        src = os.path.join(CHECKOUT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(target, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, os.path.join(target, name))

setup(
    name="biomedlm-jax-prepare",
    version="0.1.0",
    description="biomedlm_jax's corpus preparation alone, for Beam workers",
    packages=["biomedlm_jax", "biomedlm_jax.core", "biomedlm_jax.data"],
    install_requires=PREPARE_REQUIRES,
    python_requires=">=3.10",
)
