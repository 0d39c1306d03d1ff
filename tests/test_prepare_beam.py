"""prepare_data at corpus scale: the Apache Beam pipeline gives the local run's output byte for byte,
PubMed's update semantics, resuming after a kill, damaged gzip input."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from biomedlm_jax.core import errors
from biomedlm_jax.data import packing, prepare, readers, shards
from biomedlm_jax.data import tokenizer as tokenizer_lib

FIXTURES = REPO / "tests" / "fixtures"
ABSTRACTS = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"
GPT2 = str(REPO / "data" / "gpt2_tokenizer")


def citation(pmid: str, title: str, abstract: str = "") -> str:
    body = f"<Abstract><AbstractText>{abstract}</AbstractText></Abstract>" if abstract else ""
    return (f"<PubmedArticle><MedlineCitation Status=\"MEDLINE\"><PMID Version=\"1\">{pmid}</PMID>"
            f"<Article><ArticleTitle>{title}</ArticleTitle>{body}</Article></MedlineCitation></PubmedArticle>")


def pubmed_file(path, articles, deleted=()):
    xml = "<?xml version=\"1.0\"?>\n<PubmedArticleSet>\n" + "\n".join(articles)
    if deleted:
        xml += "\n<DeleteCitation>" + "".join(f"<PMID Version=\"1\">{p}</PMID>" for p in deleted) + "</DeleteCitation>"
    xml += "\n</PubmedArticleSet>\n"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(xml)
    return str(path)


def outputs(folder) -> dict:
    """Every file of a prepared corpus (manifest without its timing), as bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            if name == "manifest.json":
                m = json.loads(data)
                m.pop("seconds")
                m["inputs"] = [os.path.basename(p) for p in m["inputs"]]
                data = json.dumps(m, sort_keys=True).encode()
            out[os.path.relpath(path, folder)] = data
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The shipped abstracts and XML samples, plus a PubMed update file that revises and deletes."""
    d = tmp_path_factory.mktemp("corpus")
    first = [json.loads(line) for line in ABSTRACTS.read_text().splitlines()[:3]]
    update = pubmed_file(d / "pubmed26n9999.xml.gz", [
        citation(first[0]["pmid"], "A corrected title.", "The corrected abstract of this record, revised."),
        citation("90000001", "A new article in the update.", "Its abstract."),
    ], deleted=[first[1]["pmid"], "12345678901"])
    return [str(ABSTRACTS), str(FIXTURES / "pubmed_baseline_sample.xml"), str(FIXTURES / "pmc_jats_sample.xml"),
            update], first


def test_beam_pipeline_equals_the_local_run_on_1_and_2_workers(corpus, tmp_path):
    inputs, _ = corpus
    kw = dict(seq_len=64, eval_fraction=0.1, rows_per_shard=700, progress=False)
    local = prepare.prepare(inputs, GPT2, str(tmp_path / "local"), **kw)
    assert len(local["splits"]["train"]["shards"]) > 5  # documents cross shard boundaries
    prepare.prepare(inputs, GPT2, str(tmp_path / "beam1"), beam_args=["--runner=DirectRunner"], **kw)
    # The CLI, as a user runs it: two worker processes
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={','.join(inputs)}",
                        f"--tokenizer={GPT2}", f"--out={tmp_path / 'beam2'}", "--seq_len=64", "--eval_fraction=0.1",
                        "--rows_per_shard=700", "--runner=DirectRunner", "--direct_num_workers=2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = outputs(tmp_path / "local")
    assert outputs(tmp_path / "beam1") == want
    assert outputs(tmp_path / "beam2") == want
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".work")]  # finished runs leave no work folder
    # and the trainer reads it as before
    rows = shards.load_prepared(str(tmp_path / "beam2"), "train").rows
    assert len(rows) == local["splits"]["train"]["rows"]


def test_pubmed_updates_replace_and_delete(corpus, tmp_path):
    _, first = corpus
    d = tmp_path / "in"
    d.mkdir()
    # files are taken in name order, as NLM numbers them: baseline first, then updates
    pubmed_file(d / "pubmed26n0001.xml.gz", [citation("1", "One.", "First abstract."),
                                            citation("2", "Two.", "Second abstract, first version."),
                                            citation("3", "Three.", "Third abstract."),
                                            citation("4", "Four.", "Fourth abstract.")])
    pubmed_file(d / "pubmed26n1400.xml.gz", [citation("2", "Two, revised.", "Second abstract, second version."),
                                            citation("5", "Five.", "Fifth abstract.")], deleted=["3", "777"])
    m = prepare.prepare([str(d)], GPT2, str(tmp_path / "out"), seq_len=4, eval_fraction=0.0, progress=False)
    s = m["read_stats"]
    assert (s["documents"], s["duplicates"], s["deleted"], s["files"]) == (4, 1, 1, 2)
    index = [line.split("\t")[0] for line in (tmp_path / "out" / "train-docs.tsv").read_text().splitlines()]
    assert index == ["1", "4", "2", "5"]  # a replaced record moves to its latest position; 3 is gone
    want = [("1", "One.\nFirst abstract."), ("4", "Four.\nFourth abstract."),
            ("2", "Two, revised.\nSecond abstract, second version."), ("5", "Five.\nFifth abstract.")]
    packed = packing.pack_documents(want, tokenizer_lib.load_tokenizer(GPT2), 5)
    np.testing.assert_array_equal(shards.load_prepared(str(tmp_path / "out"), "train").rows[np.arange(len(packed.rows))],
                                  packed.rows)


def split_corpus(folder, parts: int) -> list[str]:
    """The shipped abstracts copied into `parts` files, each with its own ids (a corpus 'parts' times larger)."""
    lines = ABSTRACTS.read_text().splitlines()
    files = []
    for k in range(parts):
        path = folder / f"part-{k:02d}.jsonl"
        with open(path, "w") as f:
            for line in lines:
                rec = json.loads(line)
                f.write(json.dumps({"pmid": f"{k}-{rec['pmid']}", "title": rec.get("title", ""),
                                    "abstract": rec.get("abstract", "")}) + "\n")
        files.append(str(path))
    return files


def kill_midway(proc, finished, at_least: int = 2, poll: float = 0.005) -> int:
    """SIGKILLs `proc` as soon as `finished()` (units done) reaches `at_least`; returns the final count."""
    deadline = time.time() + 120
    while time.time() < deadline and finished() < at_least:
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return finished()


@pytest.mark.slow
def test_a_killed_run_resumes_without_redoing_finished_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    files = split_corpus(src, 8)
    cmd = [sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={src}", f"--tokenizer={GPT2}",
           "--seq_len=128", "--rows_per_shard=1000", "--work_unit_mb=1"]  # one file (2.3 MB) per work unit
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + [f"--out={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cache = tmp_path / "out.work" / "units"

    # finished units: the .npz is written after the unit's tokens
    finished = kill_midway(proc, lambda: len([f for f in os.listdir(cache) if f.endswith(".npz")])
                           if cache.exists() else 0)
    assert 2 <= finished < len(files) and not out.exists()  # killed midway: no output that looks complete

    r = subprocess.run(cmd + [f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"{len(files) - finished} of {len(files)} work units ({len(files)} input files) tokenized, "
            f"{finished} reused") in r.stderr
    r = subprocess.run(cmd + [f"--out={tmp_path / 'whole'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert outputs(out) == outputs(tmp_path / "whole") and not (tmp_path / "out.work").exists()


def test_a_truncated_gzip_is_named_or_skipped_and_counted(tmp_path):
    whole = pubmed_file(tmp_path / "whole.xml.gz", [citation(str(i), f"Title {i}.", "An abstract. " * 50)
                                                    for i in range(1, 200)])
    data = open(whole, "rb").read()
    bad = tmp_path / "pubmed26n0002.xml.gz"
    bad.write_bytes(data[: len(data) // 2])
    good = pubmed_file(tmp_path / "pubmed26n0001.xml.gz", [citation("5000", "Kept.", "Kept abstract. " * 40)])
    with pytest.raises(errors.DataError, match=r"pubmed26n0002\.xml\.gz: truncated or corrupt gzip"):
        prepare.prepare([good, str(bad)], GPT2, str(tmp_path / "o"), seq_len=16, eval_fraction=0.0,
                             progress=False)
    assert not (tmp_path / "o").exists()
    m = prepare.prepare([good, str(bad)], GPT2, str(tmp_path / "o"), seq_len=16, eval_fraction=0.0,
                             on_error="skip", progress=False)
    s = m["read_stats"]
    assert s["errors_skipped"] == 1 and 1 < s["documents"] < 200  # the records before the cut are kept
    # readers name it too, also for line-based formats
    jl = tmp_path / "x.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        f.write("".join(json.dumps({"id": str(i), "text": "words " * 100}) + "\n" for i in range(500)))
    jl.write_bytes(jl.read_bytes()[:-200])
    with pytest.raises(errors.DataError, match=r"x\.jsonl\.gz:\d+: truncated or corrupt gzip"):
        list(readers.read_documents([str(jl)]))
