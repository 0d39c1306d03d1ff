"""Test setup: 8 fake CPU devices in the test process (set before JAX is imported; subprocesses get one
unless they ask for more), one compilation cache for the run, and HF reference checkpoints."""
import atexit
import os
import shutil
import tempfile

# The CPU platform only, as a user's process without TPU chips gets it (biomedlm_jax/__init__.py): with
# libtpu installed (the test extra, for tests/test_aot.py) JAX would otherwise try to start a TPU runtime.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# XLA:CPU aborts the process when the fake devices' threads do not all reach a collective within 40 s
# (its rendezvous "termination timeout"). On a 2-core host running two test processes and their
# subprocesses, a thread can be kept off the CPU that long: the tests (and the CLI subprocesses, which
# inherit XLA_FLAGS) give the stragglers 10 minutes, and XLA logs a warning after 20 s so a slow arrival
# still shows in the output. A real deadlock then fails at the test's own timeout instead.
for _flag in ("--xla_cpu_collective_call_terminate_timeout_seconds=600",
              "--xla_cpu_collective_call_warn_stuck_timeout_seconds=20"):
    if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests compile the same small programs: the trainer's step on the tiny config, and every CLI run
# in a subprocess (which inherits these variables). JAX's persistent cache, keyed by the program and
# the compile options, lets a later compile load the executable instead; trace counts (chex) and
# results are unchanged. A fresh folder per run, removed at exit; set JAX_COMPILATION_CACHE_DIR to keep one.
# Under pytest-xdist (make test TEST_WORKERS=N) the controller sets it before starting the workers, so they share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="biomedlm_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# This process has its 8 fake devices from here on. The commands the tests start in subprocesses get one
# CPU device, as a user's run of them has: compiling every CLI run for an 8-device mesh cost the suite
# minutes. A test that wants several devices in a subprocess says so in that subprocess's XLA_FLAGS
# (multi_device_env below; the two-process tests give each process 4).
jax.devices()  # the backend starts now, with the device count above
MULTI_DEVICE_XLA_FLAGS = os.environ["XLA_FLAGS"]
os.environ["XLA_FLAGS"] = " ".join(f for f in MULTI_DEVICE_XLA_FLAGS.split()
                                   if not f.startswith("--xla_force_host_platform_device_count"))


def multi_device_env(**extra) -> dict:
    """The environment for a subprocess that should see the 8 fake devices this process has."""
    return dict(os.environ, XLA_FLAGS=MULTI_DEVICE_XLA_FLAGS, **extra)

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


def gpt2_hf_files(folder) -> str:
    """GPT-2's tokenizer as HF names its files (vocab.json + merges.txt) in `folder`, from the shipped
    OpenAI release (encoder.json + vocab.bpe); what GPT2TokenizerFast.from_pretrained(folder) reads."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        (folder / dst).write_bytes((REPO / "data" / "gpt2_tokenizer" / src).read_bytes())
    return str(folder)


SEQCLS_EXTRA = ["<|CONTEXT|>", "<|QUESTION1|>", "<|QUESTION2|>", "<|ANSWER|>"]


def biomedlm_hf_tokenizer(path, head):
    """transformers' tokenizer from `path` with the tokens BioMedLM's fine-tuning script for `head` adds,
    in its order (run_multiple_choice.py: [PAD] [CLS] [SEP]; run_seqcls_gpt.py: [PAD] + four plain tokens)."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(str(path))  # what AutoTokenizer gives for BioMedLM's tokenizer
    assert tok.pad_token_id is None
    if head == "choice":
        tok.add_special_tokens({"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    else:
        tok.add_special_tokens({"pad_token": "[PAD]"})
        tok.add_tokens(SEQCLS_EXTRA)
    return tok


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def sharded_init(model, ids, mesh, rules=None):
    """Params created directly in sharded memory, the trainer's way (train_state.param_shardings, then
    a jitted init with those out_shardings); the key is PRNGKey(0)."""
    import flax.linen as nn
    import jax

    from biomedlm_jax.models import sharding
    from biomedlm_jax.training import state

    rules = rules or sharding.DEFAULT_RULES
    _, shardings = state.param_shardings(model, mesh, rules, (ids,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = jax.jit(lambda k: nn.unbox(model.init(k, ids)["params"]), out_shardings=shardings)
        return init(jax.random.PRNGKey(0)), shardings


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


def textgen_files(folder, train, val):
    """BioMedLM's textgen layout in `folder`: {train,val}.source / .target, one question / answer a line,
    from seq2seq examples (e.g. seq2seq.read_medquad's). Returns the folder."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", train), ("val", val)):
        (folder / f"{split}.source").write_text("".join(e.question + "\n" for e in part), encoding="utf-8")
        (folder / f"{split}.target").write_text("".join(e.answer + "\n" for e in part), encoding="utf-8")
    return folder


from fakegcs import fake_gcs  # noqa: E402,F401 - the fake GCS server fixture, for every test module
# On SIGTERM (.ci/run's time bound), print the tests that were running, then end (tests/suite_guard.py).
from suite_guard import *  # noqa: E402,F401,F403
