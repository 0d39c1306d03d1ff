"""prepare_data as a cluster runs it: every path a gs:// URL (inputs, tokenizer, work folder, output),
Beam workers that share no disk with the launcher, PMC bulk packages, and resuming from the bucket.

Against the fake GCS server (tests/fakegcs.py), on the Beam DirectRunner with 2 worker processes that
start in another working directory with another TMPDIR than the launcher's."""
import json
import os
import subprocess
import sys
from xml.sax.saxutils import escape

import pytest
from conftest import REPO
from fakegcs import cat, get, ls, put_tree, run
from test_prepare_beam import ABSTRACTS, GPT2, citation, kill_midway, outputs, pubmed_file, split_corpus
from test_readers import pmc_package

from biomedlm_jax.data import prepare

# The launcher, with each Beam worker process started in WORKER_DIR (its cwd and TMPDIR), where it
# leaves a `started.<pid>` file to show it ran there.
LAUNCH = r"""
import os, runpy, sys
from apache_beam.runners.portability import local_job_service as ljs
wdir = os.environ["WORKER_DIR"]
init = ljs.SubprocessSdkWorker.__init__
def moved(self, command, *args, **kwargs):
    command = command.decode() if isinstance(command, bytes) else command
    wrapped = f"cd {wdir} && touch started.$$ && TMPDIR={wdir}/tmp exec {command}"
    init(self, wrapped.encode(), *args, **kwargs)
ljs.SubprocessSdkWorker.__init__ = moved
sys.argv = [sys.argv[0]] + sys.argv[1:]
runpy.run_module("biomedlm_jax.prepare_data", run_name="__main__", alter_sys=True)
"""


def comparable(folder) -> dict:
    out = outputs(folder)
    m = json.loads(out.pop("manifest.json"))
    m.pop("inputs")  # the paths given differ (local vs gs://); what they list is compared below
    return dict(out, manifest=m)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A PubMed baseline file + an update (revises and deletes), a PMC bulk package, JSONL."""
    d = tmp_path_factory.mktemp("cluster_in")
    lines = [json.loads(line) for line in ABSTRACTS.read_text().splitlines()[:240]]
    pubmed_file(d / "pubmed26n0001.xml.gz", [citation(r["pmid"], escape(r["title"]), escape(r["abstract"]))
                                            for r in lines[:120]])
    pubmed_file(d / "pubmed26n0002.xml.gz", [citation(lines[0]["pmid"], "A revised title.", "A revised abstract."),
                                            citation("90000001", "New in the update.", escape(lines[130]["abstract"]))],
                deleted=[lines[1]["pmid"]])
    (d / "pmc").mkdir()
    pmc_package(d / "pmc" / "oa_comm_xml.PMC000xxxxxx.baseline.2026.tar.gz",
                {f"PMC00{k}/article.nxml": 3000000 + k for k in range(6)}, extra={"PMC001/fig1.jpg": b"\xff\xd8"})
    jats = (REPO / "tests" / "fixtures" / "pmc_jats_sample.xml").read_text(encoding="utf-8")
    (d / "pmc" / "PMC7000001.nxml").write_text(jats, encoding="utf-8")  # one article as its own file
    with open(d / "abstracts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines[120:])
    return d


def test_gs_inputs_tokenizer_work_and_output_on_two_beam_workers_equal_the_local_run(corpus, tmp_path, fake_gcs):
    env = fake_gcs
    put_tree(env, corpus, "in")
    put_tree(env, GPT2, "tok")
    kw = dict(seq_len=64, eval_fraction=0.1, rows_per_shard=300, progress=False)
    local = [f"{corpus}/pubmed26n*.xml.gz", f"{corpus}/pmc", f"{corpus}/abstracts.jsonl"]
    want = prepare.prepare(local, GPT2, str(tmp_path / "local"), **kw)  # default units: everything in one
    assert want["read_stats"]["files"] == 5 and want["read_stats"]["deleted"] == 1
    assert want["read_stats"]["duplicates"] == 1 and len(want["splits"]["train"]["shards"]) > 3

    launcher, workers = tmp_path / "launcher", tmp_path / "workers"
    for d in (launcher, launcher / "tmp", workers, workers / "tmp"):
        d.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", LAUNCH, "--input=gs://bkt/in/pubmed26n*.xml.gz,gs://bkt/in/pmc/,gs://bkt/in/abstracts.jsonl",
         "--tokenizer=gs://bkt/tok", "--out=gs://bkt/out", "--seq_len=64", "--eval_fraction=0.1",
         "--rows_per_shard=300", "--work_unit_mb=0.001",  # one unit per file: 5 tasks for 2 workers
         "--runner=DirectRunner", "--direct_num_workers=2"],
        capture_output=True, text=True, cwd=launcher, timeout=600,
        env=dict(env, WORKER_DIR=str(workers), TMPDIR=str(launcher / "tmp"), PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "5 of 5 work units (5 input files) tokenized" in r.stderr
    assert len(list(workers.glob("started.*"))) == 2  # both workers ran in their own folder
    # nothing written in the launcher's folder (its TMPDIR holds only Beam's own staging) or the workers'
    assert [p.name for p in launcher.iterdir()] == ["tmp"] and not list((workers / "tmp").iterdir())

    names = ls(env, "out")
    assert "out/manifest.json" in names and not ls(env, "out.work")  # finished: the work folder is gone
    get(env, "out/", str(tmp_path / "from_gs"))
    got = comparable(tmp_path / "from_gs")
    assert got == comparable(tmp_path / "local")  # byte-identical shards, indexes, tokenizer; same manifest
    assert json.loads(cat(env, "out/manifest.json"))["inputs"][0] == "gs://bkt/in/pubmed26n*.xml.gz"


def test_cluster_runners_are_refused_with_local_paths_or_no_package(tmp_path):
    base = ["--input=gs://b/in/*.xml.gz", "--tokenizer=gs://b/tok", "--out=gs://b/out"]
    for args, message in [
        ([f"--input={ABSTRACTS}", *base[1:], "--runner=DataflowRunner"], "--input=.* is a local path"),
        ([*base[:2], f"--out={tmp_path}/o", "--runner=FlinkRunner"], "--out=.* is a local path"),
        ([base[0], f"--tokenizer={GPT2}", base[2], "--runner=DataflowRunner", "--setup_file=./setup.py"],
         "--tokenizer=.* is a local path"),
        ([*base, "--runner=DataflowRunner", "--project=p", "--region=r"], "pass --setup_file=./setup.py"),
    ]:
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", *args], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert r.returncode == 2, r.stderr[-2000:]
        assert __import__("re").search(message, r.stderr), (message, r.stderr[-2000:])
    assert not os.path.exists(f"{tmp_path}/o") and not os.path.exists(f"{tmp_path}/o.work")


@pytest.mark.slow
def test_a_killed_run_resumes_from_the_gs_work_folder(tmp_path, fake_gcs):
    env = fake_gcs
    src = tmp_path / "in"
    src.mkdir()
    files = split_corpus(src, 6)
    put_tree(env, src, "parts")
    put_tree(env, GPT2, "tok")
    args = ["--input=gs://bkt/parts/", "--tokenizer=gs://bkt/tok", "--out=gs://bkt/out", "--seq_len=128",
            "--rows_per_shard=1000", "--work_unit_mb=1"]  # one file (2.3 MB) per unit
    proc = subprocess.Popen([sys.executable, "-m", "biomedlm_jax.prepare_data", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)

    done = kill_midway(proc, lambda: len([n for n in ls(env, "out.work/units/") if n.endswith(".npz")]), poll=0.02)
    assert 2 <= done < len(files) and not ls(env, "out/")  # killed midway: no output that looks complete

    r = run(env, "biomedlm_jax.prepare_data", *args, cwd=tmp_path)
    assert (f"{len(files) - done} of {len(files)} work units ({len(files)} input files) tokenized, "
            f"{done} reused") in r.stderr
    get(env, "out/", str(tmp_path / "resumed"))
    whole = prepare.prepare([str(src)], GPT2, str(tmp_path / "whole"), seq_len=128, rows_per_shard=1000,
                            progress=False)
    assert whole["splits"]["train"]["rows"] > 0
    assert comparable(tmp_path / "resumed") == comparable(tmp_path / "whole") and not ls(env, "out.work")


# The CLI with every copy, move and upload of the path layer recorded: what the launcher moves itself.
RECORDED = r"""
import json, os, runpy, sys
from biomedlm_jax.core import paths
calls = []
for name in ("rename", "upload", "copytree", "_copy", "downloaded", "local_copy"):
    plain = getattr(paths, name)
    def spy(*a, _plain=plain, _name=name, **k):
        calls.append([_name, *map(str, a)])
        return _plain(*a, **k)
    setattr(paths, name, spy)
sys.argv = [sys.argv[0]] + sys.argv[1:]
try:
    runpy.run_module("biomedlm_jax.prepare_data", run_name="__main__", alter_sys=True)
finally:
    open(os.environ["CALLS"], "w").write(json.dumps(calls))
"""


def test_shards_are_written_straight_to_the_bucket_and_the_manifest_commits_them(corpus, tmp_path, fake_gcs):
    env = dict(fake_gcs, CALLS=str(tmp_path / "calls.json"))
    env.pop("EPATH_USE_TF")  # nothing set: the package itself puts every process on fsspec
    put_tree(env, corpus, "in")
    put_tree(env, GPT2, "tok")
    r = subprocess.run([sys.executable, "-c", RECORDED, "--input=gs://bkt/in/", "--tokenizer=gs://bkt/tok",
                        "--out=gs://bkt/out", "--seq_len=64", "--rows_per_shard=50", "--runner=DirectRunner",
                        "--direct_num_workers=2"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    calls = json.loads((tmp_path / "calls.json").read_text())
    # the launcher moved no shard: what it copied is the tokenizer (read to hash it, saved beside the shards)
    assert calls and not [c for c in calls if c[0] == "rename"], calls
    assert all("gs://bkt/tok" in c[1] or c[-1] == "gs://bkt/out/tokenizer" for c in calls), calls
    names = ls(env, "out/")
    shards = [n for n in names if n.endswith(".npy")]
    assert len(shards) > 2 and "out/manifest.json" in names and not ls(env, "out.work")
    manifest = json.loads(cat(env, "out/manifest.json"))
    assert sorted(s["file"] for split in manifest["splits"].values() for s in split["shards"]) == \
        sorted(n.split("/", 1)[1] for n in shards)
