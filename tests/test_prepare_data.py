"""Offline data preparation (sharded packed rows + manifest + doc index) and the contamination audit."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from biomedlm_jax.core import errors
from biomedlm_jax.data import packing, prepare, readers, shards
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.training import trainer

FIXTURES = REPO / "tests" / "fixtures"
ABSTRACTS = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"
GPT2 = str(REPO / "data" / "gpt2_tokenizer")
PUBMEDQA = REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal.json"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "corpus"
    inputs = [str(ABSTRACTS), str(FIXTURES / "pubmed_baseline_sample.xml"), str(FIXTURES / "pmc_jats_sample.xml")]
    manifest = prepare.prepare(inputs, GPT2, str(out), seq_len=64, eval_fraction=0.1, rows_per_shard=500,
                                    progress=False)
    return out, manifest, inputs


def latest_documents(files):
    """PubMed's semantics and the curation, written the obvious way: the last record of an id wins, at
    its position; a deletion removes the id; empty documents and those curation drops are left out; a
    text already seen (case and spacing aside) is left out. Returns the Docs kept, in order."""
    last = {}
    for f in files:
        for doc in readers.read_records(f, readers.ReadStats()):
            last.pop(doc.id, None)
            last[doc.id] = doc  # re-inserted: the id now sits at its latest record's position
    out, seen = [], set()
    for doc in last.values():
        if doc.text is None or doc.drop or not doc.text.strip():
            continue
        norm = " ".join(doc.text.casefold().split())
        if norm not in seen:
            seen.add(norm)
            out.append(doc)
    return out


def test_rows_equal_in_memory_packing_and_manifest_counts(prepared):
    out, m, inputs = prepared
    tok = tokenizer_lib.load_tokenizer(GPT2)
    docs = latest_documents(inputs)
    assert m["read_stats"]["documents"] == len(docs) == 1692 + 1 + 1
    # the fixture's PMID 10000001 comes twice: the revised (later) record replaces it, and has no
    # abstract, so neither is packed; nor is 10000003 (a title alone)
    assert m["read_stats"]["duplicates"] == 1 and m["read_stats"]["no_abstract"] == 2
    assert "10000001" not in {d.id for d in docs} and "10000002" in {d.id for d in docs}
    assert m["card"]["dropped"]["no_abstract"] == 2 and m["card"]["dropped"]["empty"] == 1
    assert sum(c["documents"] for cells in m["card"]["sources"].values() for c in cells.values()) == len(docs)
    for split, want_val in (("train", False), ("validation", True)):
        # the split is by article: the PMID where a record names one (the JATS fixture names 20000001)
        want = packing.pack_documents([(d.id, d.text) for d in docs if packing.in_eval_split(d.key, 0.1) == want_val],
                                      tok, 65)
        got = shards.load_prepared(str(out), split)
        assert len(got.rows) == m["splits"][split]["rows"] == len(want.rows)
        np.testing.assert_array_equal(got.rows[np.arange(len(got.rows))], want.rows)
        assert got.info["documents"] == want.num_documents and got.info["dropped_tokens"] == want.dropped_tokens
    assert len(m["splits"]["train"]["shards"]) > 1 and m["dtype"] == "uint16" and m["row_len"] == 65
    assert m["tokenizer"]["sha256"] == shards.tokenizer_sha256(tok)
    # the side index maps every document id to its first row; ids never enter the token stream
    index = [line.split("\t") for line in (out / "train-docs.tsv").read_text().splitlines()]
    assert "PMC7000001" in {i for i, _ in index} | {i for i, _ in
                                                    (l.split("\t") for l in (out / "validation-docs.tsv").read_text().splitlines())}
    rows = [int(r) for _, r in index]
    assert rows == sorted(rows) and rows[0] == 0
    assert not [p for p in os.listdir(out.parent) if ".tmp-" in p]


def test_sharded_rows_index_like_one_array(prepared):
    out, m, _ = prepared
    rows = shards.load_prepared(str(out), "train").rows
    full = np.concatenate([np.load(out / s["file"]) for s in m["splits"]["train"]["shards"]])
    idx = np.random.default_rng(0).integers(0, len(rows), (3, 7))
    np.testing.assert_array_equal(rows[idx], full[idx])
    with pytest.raises(IndexError):
        rows[np.array([len(rows)])]


def test_existing_output_is_kept_and_failed_runs_leave_nothing(prepared, tmp_path):
    out, _, _ = prepared
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={ABSTRACTS}",
                        f"--tokenizer={GPT2}", f"--out={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (out / "manifest.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pmid": "1", "text": "fine"}\n{oops\n', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={bad}", f"--tokenizer={GPT2}",
                        f"--out={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bad.jsonl:2: not valid JSON" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no output, no temp dir
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={bad}", f"--tokenizer={GPT2}",
                        f"--out={tmp_path / 'o'}", "--on_error=skip", "--seq_len=1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["read_stats"]["errors_skipped"] == 1

    # too little text for one training row: an error that says why, and no empty dataset left behind
    with pytest.raises(errors.DataError, match=r"no training row of 1025 tokens \(1 documents read, \d+ training tokens"):
        prepare.prepare([str(bad)], GPT2, str(tmp_path / "small"), on_error="skip", eval_fraction=0.0,
                             progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("small")]


def test_audit_finds_pubmedqa_and_bioasq_items_in_the_corpus(tmp_path):
    if PUBMEDQA.exists():
        pqa_keys = list(json.loads(PUBMEDQA.read_text()))[:3]
        pqa_file = PUBMEDQA
    else:  # same format, hand-written
        pqa_keys = ["21645374", "16418930", "9488747"]
        pqa_file = tmp_path / "pqa.json"
        pqa_file.write_text(json.dumps({k: {"QUESTION": "?"} for k in pqa_keys}))
    corpus_docs = tmp_path / "corpus.jsonl"
    with open(corpus_docs, "w") as f:
        for pmid in pqa_keys[:2] + ["10000001", "555"]:
            f.write(json.dumps({"pmid": pmid, "text": f"Abstract {pmid} about sepsis. " * 20}) + "\n")
    bioasq = tmp_path / "bioasq.json"
    bioasq.write_text(json.dumps({"questions": [
        {"id": "q1", "body": "Is X a gene?", "type": "yesno", "exact_answer": "yes",
         "documents": ["http://www.ncbi.nlm.nih.gov/pubmed/555", "http://www.ncbi.nlm.nih.gov/pubmed/999"],
         "snippets": [{"document": "http://www.ncbi.nlm.nih.gov/pubmed/999", "text": "..."}]},
        {"id": "q2", "body": "Is Y?", "type": "yesno", "exact_answer": "no",
         "documents": ["https://pubmed.ncbi.nlm.nih.gov/777"], "snippets": []},
    ]}))
    prepare.prepare([str(corpus_docs)], GPT2, str(tmp_path / "c"), seq_len=16, eval_fraction=0.5, progress=False)
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", "audit", f"--corpus={tmp_path / 'c'}",
                        f"--pubmedqa={pqa_file}", f"--bioasq={bioasq}", f"--out={tmp_path / 'a.json'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    pqa = report[f"pubmedqa:{pqa_file.name}"]
    assert pqa["overlapping"] == 2 and sorted(pqa["ids"]) == sorted(pqa_keys[:2])
    assert report["bioasq:bioasq.json"]["ids"] == ["q1"] and report["bioasq:bioasq.json"]["pmids"] == {"q1": ["555"]}
    assert "2 of" in r.stdout and "1 of 2 items" in r.stdout


@pytest.mark.slow
def test_pretraining_reads_a_prepared_corpus(prepared, tmp_path):
    out, _, _ = prepared
    from test_train import make_config

    c = make_config(str(ABSTRACTS), num_train_steps=3, checkpoint_every_steps=3, seq_len=64)
    c.data.prepared_dir = str(out)
    s = trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert s["train_rows"] == shards.load_prepared(str(out), "train").info["rows"] and s["step"] == 3
    c.seq_len = 32
    with pytest.raises(errors.DataError, match="fit seq_len=64, but the config has seq_len=32"):
        trainer.train_and_evaluate(c, str(tmp_path / "run2"))


def test_work_units_group_consecutive_files_and_workers_read_only_their_units_lines(tmp_path):
    from biomedlm_jax.data import prepare_stages as stages

    files = [(f"gs://b/in/{k:03d}.nxml", n, f"gen{k}") for k, n in enumerate([10, 20, 30, 200, 5, 5, 90])]
    units = stages.group_units(files, unit_bytes=60)
    assert units == [0, 0, 0, 1, 2, 2, 3]  # in order; a file larger than a unit is one on its own
    assert stages.group_units(files, unit_bytes=0) == list(range(7))
    listing = stages.write_listing(str(tmp_path), files, units)
    job = stages.Job(inputs=("gs://b/in/",), listing=listing, units=4, files=7, tokenizer="t", tokenizer_sha256="x",
                     work=str(tmp_path))
    assert [stages.unit_files(job, u) for u in range(4)] == [tuple(files[:3]), (files[3],), tuple(files[4:6]),
                                                              (files[6],)]
    # the name carries the list's digest: another list is another file, never read by this job's workers
    other = stages.write_listing(str(tmp_path), files[:2], [0, 0])
    assert other != listing and stages.unit_files(job, 0) == tuple(files[:3])
    # a changed file (another version) is another cache key; the same files give the same key
    again = stages.write_listing(str(tmp_path), files, units)
    assert again == listing
    changed = list(files)
    changed[1] = (files[1][0], files[1][1], "gen-new")
    job2 = stages.Job(**{**job.__dict__, "listing": stages.write_listing(str(tmp_path), changed, units)})
    assert stages.cache_path(job2, 0) != stages.cache_path(job, 0)
    assert stages.cache_path(job2, 2) == stages.cache_path(job, 2)
