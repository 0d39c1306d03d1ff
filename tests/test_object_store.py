"""Workdirs and prepared data on an object store: prepare, train, resume, verify and convert with
`gs://` paths, against a local fake GCS server (gcp-storage-emulator, in memory).

What this exercises: every file a run writes or reads goes through `etils.epath` (here its fsspec /
gcsfs backend, pointed at the emulator by STORAGE_EMULATOR_HOST) and orbax's array data through
tensorstore's own GCS driver (pointed at it by TENSORSTORE_GCS_HTTP_URL). What it does not: real GCS
(authentication, eventual listing, retries) and TensorFlow's gfile backend, which epath picks for gs://
when TensorFlow is installed and which has no emulator endpoint setting; the entry points are run with
epath's fsspec backend for that reason.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from fakegcs import SERVED, cat, get, ls, run


def safetensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_gs_workdir_trains_resumes_and_converts(tmp_path, small_corpus, fake_gcs):
    env = fake_gcs
    run(env, "biomedlm_jax.prepare_data", f"--input={small_corpus}", f"--tokenizer={REPO}/data/gpt2_tokenizer",
        "--out=gs://bkt/data", "--seq_len=32", "--eval_fraction=0.1", "--rows_per_shard=64")
    listing = ls(env, "data/")
    assert "data/manifest.json" in listing and any(p.endswith(".npy") for p in listing)

    flags = [f"--config={REPO}/configs/pretrain.py:tiny", "--config.data.prepared_dir=gs://bkt/data",
             "--config.seq_len=32", "--config.global_batch_size=8", "--config.eval_every_steps=2",
             "--config.eval_batches=2", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
             "--config.progress_bar=False", "--config.mesh_shape=[1,1,1]"]
    one_device = dict(env, XLA_FLAGS="")
    # interrupted run (4 steps) resumed to 6, in the bucket; and an uninterrupted local run to 6
    run(one_device, "biomedlm_jax.pretrain", *flags, "--workdir=gs://bkt/run", "--config.num_train_steps=4")
    r = run(one_device, "biomedlm_jax.pretrain", *flags, "--workdir=gs://bkt/run", "--config.num_train_steps=6")
    assert "resumed from step 4" in r.stdout + r.stderr
    run(one_device, "biomedlm_jax.pretrain", *flags, f"--workdir={tmp_path / 'local'}", "--config.num_train_steps=6")

    names = {p.split("/")[1] for p in ls(env, "run/")}
    assert {"checkpoints", "metrics.jsonl", "tokenizer", "tensorboard"} <= names
    rows = [json.loads(line) for line in cat(env, "run/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # the resumed rows appended
    assert {p.split("/")[2] for p in ls(env, "run/checkpoints/")} == {"2", "4", "6"}

    v = run(env, "biomedlm_jax.checkpoint", "verify", "--workdir=gs://bkt/run")
    assert "step 6: ok" in v.stdout

    # convert out of the bucket (to local, and to the bucket), and the local run's export
    run(env, "biomedlm_jax.convert", "--from=orbax:gs://bkt/run", f"--to=hf:{tmp_path / 'hf_gs'}")
    run(env, "biomedlm_jax.convert", "--from=orbax:gs://bkt/run", "--to=hf:gs://bkt/hf")
    run(env, "biomedlm_jax.convert", f"--from=orbax:{tmp_path / 'local'}", f"--to=hf:{tmp_path / 'hf_local'}")
    a, b = safetensors(tmp_path / "hf_gs"), safetensors(tmp_path / "hf_local")
    assert a.keys() == b.keys()
    for k in a:  # bit-identical: resuming from the bucket changed nothing
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    hf_names = {p.split("/", 1)[1] for p in ls(env, "hf/")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= hf_names
    get(env, "hf/", str(tmp_path / "hf_back"))
    c = safetensors(tmp_path / "hf_back")
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    # and back in from the bucket: hf:gs:// -> orbax:gs://
    run(env, "biomedlm_jax.convert", "--from=hf:gs://bkt/hf", "--to=orbax:gs://bkt/orbax")
    run(env, "biomedlm_jax.convert", "--from=orbax:gs://bkt/orbax", f"--to=hf:{tmp_path / 'hf_rt'}")
    d = safetensors(tmp_path / "hf_rt")
    for k in a:
        np.testing.assert_array_equal(a[k], d[k], err_msg=k)


READ_BATCHES = r"""
import json, sys
import numpy as np
from biomedlm_jax.data import input_pipeline as ip, shards as shards_lib
remote_dir, local_dir, cache_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
local = shards_lib.load_prepared(local_dir, "train").rows
out = {"rows": len(local), "row_bytes": local.row_len * local.dtype.itemsize, "processes": []}
for p in range(2):  # two hosts, each with half of every micro-batch
    rows = shards_lib.load_prepared(remote_dir, "train", cache_bytes).rows  # opens no shard
    it, ref = (ip.BatchIterator(r, 8, seed=0, local_rows=(4 * p, 4 * p + 4)) for r in (rows, local))
    same, seen, cached = True, set(), 0
    for _ in range(6):
        idx = it.peek_indices().reshape(-1)  # this host's rows of the next batch
        seen |= set(int(i) for i in idx)
        a, b = next(it), next(ref)
        same &= all(np.array_equal(a[k], b[k]) for k in b)
        cached = max(cached, rows.cached_bytes)
    out["processes"].append({"same": bool(same), "bytes_read": rows.bytes_read, "rows_seen": len(seen),
                             "max_cached": cached, "requests": rows.requests})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_prepared_corpus_on_gs_is_read_by_rows_within_a_memory_bound(tmp_path, small_corpus, fake_gcs):
    """Each of two hosts reads only its own rows of each batch from gs:// (concurrent byte ranges of
    exactly those rows), never whole shards, with one cache under the bound; the batches are
    bit-identical to reading a local copy."""
    env = fake_gcs
    run(env, "biomedlm_jax.prepare_data", f"--input={small_corpus}", f"--tokenizer={REPO}/data/gpt2_tokenizer",
        "--out=gs://bkt/data", "--seq_len=32", "--eval_fraction=0.1", "--rows_per_shard=64")
    get(env, "data/", str(tmp_path / "local"))
    bound = 10 * 33 * 2  # ten rows of 33 uint16 tokens
    SERVED.clear()
    r = subprocess.run([sys.executable, "-c", READ_BATCHES, "gs://bkt/data", str(tmp_path / "local"), str(bound)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    served = sum(v for k, v in SERVED.items() if k.endswith(".npy"))  # what crossed the wire, headers included
    on_disk = sum(f.stat().st_size for f in (tmp_path / "local").glob("train-*.npy"))
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for proc in out["processes"]:
        assert proc["same"], proc
        assert proc["bytes_read"] == proc["rows_seen"] * out["row_bytes"]  # its own rows, each once
        assert proc["max_cached"] <= bound
    assert sum(p["bytes_read"] for p in out["processes"]) < out["rows"] * out["row_bytes"] / 2  # 6 batches
    assert served < on_disk / 4, (served, on_disk)  # no whole shards downloaded
    # only the rows asked for crossed the wire: no header reads (shapes from the manifest), no read-ahead
    # block; at most one more batch per host, which the iterator's read-ahead thread was fetching
    needed = sum(p["bytes_read"] for p in out["processes"])
    assert needed <= served <= needed + 2 * 4 * out["row_bytes"], (served, out)
