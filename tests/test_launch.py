"""Launchers: --dry_run prints the exact commands (defaults and a representative call); shellcheck is clean;
a process that cannot reach its coordinator fails with a clear message."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO

LAUNCH = REPO / "launch"


def dry(script, *args):
    r = subprocess.run([str(LAUNCH / script), "--dry_run", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


def test_tpu_pod_default_is_biomedlm_on_v4_128():
    lines = dry("tpu_pod.sh")
    # first the compile check for the slice, on this host, with the job's config
    assert lines[0] == ".venv/bin/python -m biomedlm_jax.aot --topology=v4-128 --config=configs/pretrain.py:biomedlm-2.7b"
    assert lines[1].startswith("gcloud compute tpus tpu-vm describe biomedlm --zone=us-central2-b")
    assert "create biomedlm --zone=us-central2-b --accelerator-type=v4-128" in lines[2]
    assert any("--worker=all" in l and ".[tpu]" in l for l in lines)
    assert lines[-1] == ("gcloud compute tpus tpu-vm ssh biomedlm --zone=us-central2-b --worker=all "
                         "'--command=cd ~/biomedlm-jax && .venv/bin/python -m biomedlm_jax.pretrain "
                         "--config=configs/pretrain.py:biomedlm-2.7b --workdir=/mnt/gcs/runs/biomedlm-2.7b'")


def test_tpu_pod_custom_call():
    lines = dry("tpu_pod.sh", "--name=pqa", "--zone=europe-west4-a", "--accelerator_type=v5p-32", "--project=my-proj",
                "biomedlm_jax.finetune_mcqa", "--config=configs/mcqa.py:pubmedqa", "--workdir=/mnt/gcs/pqa",
                "--config.global_batch_size=64")
    assert lines[0] == (".venv/bin/python -m biomedlm_jax.aot --topology=v5p-32 --config=configs/mcqa.py:pubmedqa "
                        "--config.global_batch_size=64")
    assert "create pqa --zone=europe-west4-a --project=my-proj --accelerator-type=v5p-32" in lines[2]
    assert lines[-1].endswith("biomedlm_jax.finetune_mcqa --config=configs/mcqa.py:pubmedqa --workdir=/mnt/gcs/pqa "
                              "--config.global_batch_size=64'")
    skipped = dry("tpu_pod.sh", "--skip_aot_check")
    assert skipped[0].startswith("gcloud compute tpus tpu-vm describe") and not any("aot" in l for l in skipped)


def test_tpu_pod_stops_before_the_pod_when_the_job_does_not_fit(tmp_path):
    """Not a dry run: the check runs here and fails (a stand-in for a config too big for the slice), so
    gcloud (a stub that records its calls) is never called."""
    stub = tmp_path / "bin"
    stub.mkdir()
    calls = tmp_path / "gcloud_calls"
    (stub / "gcloud").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (stub / "gcloud").chmod(0o755)
    python = stub / "python"
    python.write_text("#!/bin/sh\necho \"aot $*\" >&2\nexit 1\n")
    python.chmod(0o755)
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", PYTHON=str(python))
    r = subprocess.run([str(LAUNCH / "tpu_pod.sh"), "--accelerator_type=v5e-16"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 1 and "does not fit v5e-16" in r.stderr and "--topology=v5e-16" in r.stderr
    assert not calls.exists()


def test_gpu_slurm_default_is_two_8_gpu_nodes_and_quotes_arguments():
    assert dry("gpu_slurm.sh")[-1] == ("sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/gpu_slurm.sbatch "
                                       "biomedlm_jax.pretrain --config=configs/pretrain.py:biomedlm-2.7b "
                                       "--workdir=runs/biomedlm-2.7b")
    line = dry("gpu_slurm.sh", "--nodes=4", "--partition=a100", "biomedlm_jax.generate", "--prompt=it's")[-1]
    assert line == ("sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=a100 launch/gpu_slurm.sbatch "
                    "biomedlm_jax.generate '--prompt=it'\\''s'")
    sbatch = (LAUNCH / "gpu_slurm.sbatch").read_text()
    assert "srun --kill-on-bad-exit=1" in sbatch and ".[cuda12]" in sbatch and "GPU_XLA_FLAGS" in sbatch


def test_local_default_and_custom():
    lines = dry("local.sh", "--extra=none")
    assert lines[-1] == ".venv/bin/python -m biomedlm_jax.pretrain --config=configs/pretrain.py:biomedlm-2.7b --workdir=runs/biomedlm-2.7b"
    lines = dry("local.sh", "--extra=cuda12", "biomedlm_jax.pretrain", "--config=configs/pretrain.py:tiny", "--workdir=/tmp/x")
    assert any(l.startswith("export XLA_FLAGS=") and "latency_hiding_scheduler" in l for l in lines)
    assert ".venv/bin/pip install -q -e '.[cuda12]'" in lines


def test_gpu_bench_is_one_matrix_command_with_a_time_budget(tmp_path):
    """The lent GPU has ~15 minutes in all: the launcher is one process (`bench matrix`) with a budget,
    JAX not preallocating (the torch peer shares the device), and the part names kept as filters."""
    lines = dry("gpu_bench.sh", f"--out={tmp_path}")
    cmds = [l for l in lines if " -m biomedlm_jax.bench " in l]
    assert cmds == [f"python3 -m biomedlm_jax.bench matrix --out={tmp_path} --scale=gpu --budget_s=450 "
                    f"2> {tmp_path}/bench.log"]
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in lines
    assert any(l.startswith("export XLA_FLAGS=") and "latency_hiding_scheduler" in l for l in lines)
    assert [l for l in dry("gpu_bench.sh", "generate", "--budget_s=300") if " matrix " in l][0].endswith(
        "--budget_s=300 --only=generate 2> bench_out/bench.log")
    r = subprocess.run([str(LAUNCH / "gpu_bench.sh"), "--dry_run", "--bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


@pytest.mark.slow
def test_gpu_bench_runs_the_matrix_at_small_scale(tmp_path):
    """The same script the GPU runs, at --scale=small on CPU: rows land in OUT/bench.jsonl, stderr in
    OUT/bench.log; with no time left every row is written as skipped instead of run."""
    env = dict(os.environ, PY=sys.executable)
    r = subprocess.run([str(LAUNCH / "gpu_bench.sh"), f"--out={tmp_path}", "--scale=small", "train"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr + (tmp_path / "bench.log").read_text()
    rows = [json.loads(l) for l in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(row["name"], row["impl"]) for row in rows] == [
        ("train-tiny-b2", "ours"), ("train-tiny-b2", "hf-torch"), ("train-tiny-b2-scan", "ours")]
    assert all(row["matrix"] == "small" and row["tokens_per_s"] > 0 and "jax" in row for row in rows)
    assert (tmp_path / "bench.log").exists()
    out2 = tmp_path / "none"
    r = subprocess.run([str(LAUNCH / "gpu_bench.sh"), f"--out={out2}", "--scale=small", "--budget_s=1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (out2 / "bench.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["skipped"].startswith("budget") and row["tokens_per_s"] is None for row in rows)


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    r = subprocess.run([shellcheck, "-x", *map(str, sorted(LAUNCH.glob("*.sh"))), str(LAUNCH / "gpu_slurm.sbatch")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unreachable_coordinator_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    code = ("from biomedlm_jax.training import distributed\n"
            f"distributed.initialize('127.0.0.1:{port}', 2, 1, timeout_s=3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"could not join 127.0.0.1:{port} within 3s" in r.stderr
