"""Each kind of checkpoint damage is caught, reported in one line and leaves no traceback behind.

The kinds: bytes flipped inside an array's compressed data (which tensorstore itself does not notice:
only the digest saved in each step's meta catches it), a truncated data file, a deleted data file, a
damaged array metadata file and a damaged meta file. A reader of the newest step falls back past it;
`convert` and `evaluate_lm` asked for the damaged step (or with no good step left) exit 1 with one line.
"""
import gc
import glob
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from biomedlm_jax import convert as convert_cli
from biomedlm_jax import evaluate_lm as evaluate_lm_cli
from biomedlm_jax.core import errors
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, damage
from biomedlm_jax.models import gpt, gpt_config

NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "Task was destroyed")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A params-only workdir with steps 1 and 2 (different weights) and a tokenizer."""
    root = tmp_path_factory.mktemp("damage")
    cfg = gpt_config.get_config("tiny", vocab_size=300, n_positions=32, n_layer=2)
    for step in (1, 2):
        params = gpt.init_params(gpt.GPT(cfg), jax.random.PRNGKey(step))
        checkpoint.save_params(str(root / "run"), cfg, params, step=step)
    tok = tokenizer_lib.train_bpe(["a short biomedical text about the heart and the lungs"] * 20, vocab_size=300,
                                 show_progress=False)
    tokenizer_lib.save_tokenizer(tok, checkpoint.tokenizer_dir(str(root / "run")), model_max_length=32)
    return root / "run"


def data_files(workdir, step):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
    return sorted(files, key=os.path.getsize, reverse=True)


def flip_every(path, stride=4096):
    """Flip bytes all through a file (inside compressed chunks, not only in their CRC'd indexes)."""
    data = bytearray(open(path, "rb").read())
    for i in range(stride // 2, len(data), stride):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def damage_step(workdir, step, kind):
    big = data_files(workdir, step)[0]
    if kind == "flipped":
        flip_every(big)
    elif kind == "truncated":
        os.truncate(big, os.path.getsize(big) // 2)
    elif kind == "deleted":
        os.remove(big)
    elif kind == "array_metadata":
        flip_every(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"), stride=64)
    elif kind == "meta":
        path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
        open(path, "w").write(open(path).read()[:-40])
    else:
        raise ValueError(kind)


def copy_of(two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path / "run")
    return str(tmp_path / "run")


def noise(text):
    return [n for n in NOISE if n in text]


@pytest.fixture(autouse=True)
def unraisable(monkeypatch, caplog):
    """What Python would print as "Exception ignored in ..." (pytest turns it into a warning, so the
    test collects it itself) and asyncio's "Task was destroyed" log records: both must stay empty."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(f"{u.object!r}: {u.exc_value!r}"))
    yield seen
    gc.collect()
    seen += [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not seen, seen[:3]


@pytest.mark.parametrize("kind", ["flipped", "truncated", "deleted", "array_metadata", "meta"])
def test_a_reader_falls_back_past_each_kind_of_damage_in_one_line(two_steps, tmp_path, capfd, kind):
    run = copy_of(two_steps, tmp_path)
    _, want = checkpoint.load_model(run, step=1)
    damage_step(run, 2, kind)
    capfd.readouterr()
    _, params = checkpoint.load_model(run)
    gc.collect()  # abandoned reads would surface here, as their coroutines are collected
    out, err = capfd.readouterr()
    assert not noise(out + err), (out + err)[-3000:]
    lines = [x for x in (out + err).splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"[checkpoint] {run}: step 2 ("), lines
    assert "moved to" in lines[0] and lines[0].endswith("resuming from step 1")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(want), jax.device_get(params))
    (moved,) = os.listdir(os.path.join(run, checkpoint.QUARANTINE_DIR))
    reason = open(os.path.join(run, checkpoint.QUARANTINE_DIR, moved, "REASON.txt")).read()
    assert moved.startswith("2-") and "Traceback" in reason  # the whole error is kept beside the step


def test_flipped_bytes_name_the_array_and_verify_reports_them(two_steps, tmp_path, capfd):
    """Where the flips land decides who notices: zstd when one hits a frame or block header (the order
    of chunks in the file varies from run to run), the digest when they land in raw data. Either way
    the error names the step's state and the array."""
    run = copy_of(two_steps, tmp_path)
    damage_step(run, 2, "flipped")
    with pytest.raises(errors.CheckpointDamaged, match=r"checkpoints/2/state: .*params[./]h_\d[./]\S+"):
        checkpoint.load_model(run, step=2)
    assert checkpoint.latest_step(run) == 2  # an explicit step moves nothing
    text = verify_text(run)
    assert "step 1: ok" in text and "step 2: bad (" in text and "params" in text


def test_data_that_reads_back_but_differs_is_caught_by_its_digest(two_steps, tmp_path, capfd):
    """The case tensorstore cannot see (flipped bytes inside a raw zstd block) made certain: the
    array reads back fine, but not as it was saved."""
    run = copy_of(two_steps, tmp_path)
    path = os.path.join(run, "checkpoints", "2", "meta", "metadata")
    meta = json.load(open(path))
    meta["digest"]["params/h_1/attn/c_attn/kernel"] ^= 1 << 7
    json.dump(meta, open(path, "w"))
    with pytest.raises(errors.CheckpointDamaged,
                       match=r"checkpoints/2/state: params/h_1/attn/c_attn/kernel does not match the checksum"):
        checkpoint.load_model(run, step=2)
    text = verify_text(run)
    assert "step 1: ok" in text and "step 2: bad (" in text and "does not match the checksum" in text


def verify_text(run):
    out = []

    class Out:
        def write(self, s):
            out.append(s)

    assert not checkpoint.verify(run, out=Out())
    return "".join(out)


@pytest.mark.parametrize("kind", ["truncated", "meta"])
def test_convert_of_a_damaged_step_exits_1_with_one_line(two_steps, tmp_path, capfd, kind):
    run = copy_of(two_steps, tmp_path)
    damage_step(run, 2, kind)
    capfd.readouterr()
    assert convert_cli.main([f"--from=orbax:{run}", "--step=2", f"--to=hf:{tmp_path / 'hf'}"]) == 1
    gc.collect()
    out, err = capfd.readouterr()
    assert not noise(out + err), err[-3000:]
    (line,) = err.splitlines()
    assert line.startswith(f"convert: error: {run}/checkpoints/2/") and not (tmp_path / "hf").exists()


def test_evaluate_with_every_step_damaged_exits_1_with_one_line_and_verbose_shows_why(two_steps, tmp_path, capfd,
                                                                                      monkeypatch):
    monkeypatch.setenv(errors.VERBOSE_ENV, "0")  # restored after the test, which turns it on
    run = copy_of(two_steps, tmp_path)
    damage_step(run, 1, "deleted")
    damage_step(run, 2, "truncated")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "1", "text": "the heart and the lungs"}\n')
    capfd.readouterr()
    assert evaluate_lm_cli.main([f"--init_from=orbax:{run}", f"--input={docs}"]) == 1
    gc.collect()
    out, err = capfd.readouterr()
    assert not noise(out + err), err[-3000:]
    (line,) = err.splitlines()  # the steps were moved aside on the way: no separate fallback line
    assert line.startswith(f"evaluate_lm: error: {run}: no checkpoint restores (step 2: ") and "; step 1: " in line
    # --verbose: the underlying TensorStore error is printed as well (a fresh copy: the first run moved both aside)
    run = copy_of(two_steps, tmp_path / "again")
    damage_step(run, 2, "truncated")
    assert evaluate_lm_cli.main([f"--init_from=orbax:{run}", f"--input={docs}", "--verbose"]) == 0
    assert errors.verbose()
    err = capfd.readouterr().err
    assert "OUT_OF_RANGE" in err and "Traceback" in err and "resuming from step 1" in err


def test_digest_is_the_same_on_any_mesh_and_changes_with_any_element():
    x = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) / 7
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    tree = {"w": x, "i": np.int32(3), "h": x.astype(jax.numpy.bfloat16)}
    d = damage.state_digest(tree)
    assert damage.state_digest(dict(tree, w=sharded)) == d
    with jax.set_mesh(jax.make_mesh((8,), ("x",))):  # a caller's mesh: a trainer restoring a one-device base
        assert damage.state_digest(dict(tree, w=jax.device_put(x, jax.devices()[3]))) == d
    y = x.copy()
    y[17, 5] = np.nextafter(y[17, 5], np.float32(np.inf))  # one ulp of one element
    assert damage.state_digest(dict(tree, w=y))["w"] != d["w"]
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values in other places
    assert damage.state_digest(dict(tree, w=swapped))["w"] != d["w"]


def test_a_failure_of_our_own_is_not_taken_for_damage(two_steps, tmp_path, monkeypatch):
    """A bug while checking a step (here: the digest program fails) is raised as it is; no good step is
    moved aside for it."""
    run = copy_of(two_steps, tmp_path)

    def broken(leaves):
        raise ValueError("no devices")

    monkeypatch.setattr(damage, "_digests", broken)
    with pytest.raises(damage.DigestFailed, match="no devices"):
        checkpoint.load_model(run)
    assert checkpoint.latest_step(run) == 2 and not os.path.exists(os.path.join(run, checkpoint.QUARANTINE_DIR))
