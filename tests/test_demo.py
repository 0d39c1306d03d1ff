"""`make demo` end to end (fewer steps): the shipped data, training, export and conversion all work."""
import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_demo_runs_from_the_repo_alone(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "biomedlm_jax.demo", "--steps=30", "--seq2seq_steps=10", f"--workdir={tmp_path / 'demo'}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env=dict(os.environ, XLA_FLAGS=""),  # one CPU device, as `make demo` runs on a user's machine
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("[tokenizer]", "[prepare]", "[pretrain]", "[seq2seq]", "[generate] Q:", "ROUGE-L", "[mcqa]",
                  "| pubmedqa | ori_pqal.json:test | 500 |", "[train]", "[eval]", "[export]", "[convert]", "== demo done"):
        assert stage in r.stdout
    assert "held-out loss" in r.stdout
    assert (tmp_path / "demo" / "pretrain" / "checkpoints" / "30").is_dir()
    assert (tmp_path / "demo" / "pretrain" / "metrics.jsonl").exists()
    assert (tmp_path / "demo" / "data" / "manifest.json").exists()
    # the exported model carries the domain tokenizer it was trained with
    assert (tmp_path / "demo" / "hf" / "vocab.json").read_text() == (tmp_path / "demo" / "tokenizer" / "vocab.json").read_text()
    assert (tmp_path / "demo" / "hf" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "orbax" / "checkpoints" / "0").is_dir()
    assert "(GPT2ForSequenceClassification, labels maybe/no/yes); 50 dev questions, max|dlogits| = 0.0e+00" in r.stdout
