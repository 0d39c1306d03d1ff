"""Test setup: 8 fake CPU devices (set before JAX is imported) and HF reference checkpoints."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_hf_model(tmp_dir, seed=0, perturb=True, **config_kwargs):
    """A random-init transformers GPT2LMHeadModel saved as safetensors in tmp_dir. Returns the torch model.

    `perturb` adds noise to LayerNorm and bias params (which HF initialises to 1/0) so the parity tests
    also check that those are mapped to the right place.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config_kwargs)).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ln" in name or name.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_dir), safe_serialization=True)
    return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """The first 300 shipped abstracts: enough rows for a few steps, quick to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "abstracts.jsonl"
    with open(REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(300)]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
