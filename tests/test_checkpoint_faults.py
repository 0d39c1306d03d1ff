"""Damaged checkpoints: a run falls back to the newest step that restores, keeps the bad one aside,
and finishes bit-identically; with nothing left it stops with an error instead of starting over.
(Two processes falling back together: test_train.py; each kind of damage: test_checkpoint_damage.py.)"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from test_train import corrupt, final_params, make_config

from biomedlm_jax.formats import checkpoint
from biomedlm_jax.training import trainer


def verify(workdir):
    return subprocess.run([sys.executable, "-m", "biomedlm_jax.checkpoint", "verify", f"--workdir={workdir}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_damaged_latest_step_falls_back_and_finishes_bit_identically(tmp_path, small_corpus, capfd):
    c = make_config(small_corpus, num_train_steps=6, checkpoint_every_steps=2, keep_checkpoints=3, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c, str(tmp_path / "full"), devices=jax.devices()[:1])
    run = tmp_path / "run"
    c4 = make_config(small_corpus, num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=3, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c4, str(run), devices=jax.devices()[:1])
    corrupt(run, 4)
    r = verify(run)
    assert r.returncode == 1 and "step 2: ok" in r.stdout and "step 4: bad (" in r.stdout and "DATA_LOSS" in r.stdout
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    capfd.readouterr()
    s = trainer.train_and_evaluate(c, str(run), devices=jax.devices()[:1])
    err = capfd.readouterr().err
    assert s["start_step"] == 2 and s["step"] == 6
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]  # one line, not a crash dump
    (line,) = [x for x in err.splitlines() if x.startswith("[checkpoint]")]
    assert line.startswith(f"[checkpoint] {run}: step 4 (") and "DATA_LOSS" in line and "moved to" in line
    assert line.endswith("resuming from step 2")
    (moved,) = os.listdir(run / checkpoint.QUARANTINE_DIR)  # kept, not deleted, and never "latest" again
    assert moved.startswith("4-") and "CRC-32C" in (run / checkpoint.QUARANTINE_DIR / moved / "REASON.txt").read_text()
    assert checkpoint.latest_step(str(run)) == 6
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "full"), final_params(run))
    assert verify(run).returncode == 0


@pytest.mark.slow
def test_readers_fall_back_but_an_explicit_bad_step_is_an_error(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=3, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    good = final_params(tmp_path)  # step 4
    corrupt(tmp_path, 4)
    with pytest.raises(Exception, match="DATA_LOSS"):
        checkpoint.load_model(str(tmp_path), step=4)
    assert checkpoint.latest_step(str(tmp_path)) == 4  # an explicit step moves nothing
    _, params = checkpoint.load_model(str(tmp_path))  # "latest": step 2, and step 4 is moved aside
    assert checkpoint.latest_step(str(tmp_path)) == 2
    with pytest.raises(AssertionError):
        jax.tree.map(np.testing.assert_array_equal, good, jax.device_get(params))
    from biomedlm_jax.workflows import convert

    convert.convert(f"orbax:{tmp_path}", f"hf:{tmp_path / 'hf'}")  # convert picks the same fallback
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_no_step_restores_stops_with_every_reason_and_never_starts_over(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=4, checkpoint_every_steps=2, keep_checkpoints=3, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    corrupt(tmp_path, 2)
    corrupt(tmp_path, 4)
    c.num_train_steps = 6
    with pytest.raises(checkpoint.NoGoodCheckpoint, match=r"no checkpoint restores \(step 4: .*DATA_LOSS.*; "
                                                          r"step 2: .*DATA_LOSS"):
        trainer.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / checkpoint.QUARANTINE_DIR)) == ["2", "4"]
    with pytest.raises(checkpoint.NoGoodCheckpoint, match="refusing to start from scratch"):
        trainer.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1])


@pytest.mark.slow
def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoints(tmp_path, small_corpus):
    """A tmpfs with room for one checkpoint: the second save fails with ENOSPC; the run stops at the next
    step with an error naming the step and the cause, and step 2 still restores."""
    fs = tmp_path / "small"
    fs.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60M", "tmpfs", str(fs)]).returncode:
        pytest.skip("needs root to mount a size-limited tmpfs")
    try:
        c = make_config(small_corpus, num_train_steps=12, checkpoint_every_steps=2, mesh_shape=(1, 1, 1))
        with pytest.raises(checkpoint.CheckpointSaveError,
                           match=r"saving step 4 to .* failed \(.*No space left on device.*\); the last complete "
                                 r"checkpoint is step 2\. Training stopped"):
            trainer.train_and_evaluate(c, str(fs / "run"), devices=jax.devices()[:1])
        from biomedlm_jax.training import metrics

        assert max(r["step"] for r in metrics.read_metrics(str(fs / "run"), "train")) <= 6  # did not train on
        assert checkpoint.latest_step(str(fs / "run")) == 2
        checkpoint.load_model(str(fs / "run"))  # the previous checkpoint is intact
    finally:
        subprocess.run(["umount", "--lazy", str(fs)])  # the failed save may still hold files open
