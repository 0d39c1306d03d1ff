"""PMC's Cloud Service as an input, against a fake S3 server laid out as NLM's README describes the bucket.

The code under test reads the bucket anonymously (no AWS credentials in its environment, only
AWS_ENDPOINT_URL), as it reads the real s3://pmc-oa-opendata.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from fakes3 import fake_s3, jats, public_bucket, put, put_article, put_inventory  # noqa: F401 - a fixture

from biomedlm_jax.core import errors
from biomedlm_jax.data import pmc_cloud, prepare, readers

GPT2 = str(REPO.parent / "shared" / "data" / "gpt2_tokenizer")
ROOT = "s3://pmc-oa-opendata/"


def sentence(i: int, what: str) -> str:
    return f"Finding {i} about {what} in cohort {i * 7} was replicated with odds ratio {1 + i / 10:.1f}."


def lay_out(s3):
    """Six article versions of five PMCIDs, one of each case the reader must decide."""
    public_bucket(s3)
    put_article(s3, "PMC100", 1, jats("PMC100", "900100", "Old title", sentence(1, "v1"), "Old body."))
    put_article(s3, "PMC100", 2, jats("PMC100", "900100", "New title", sentence(1, "v2"), "New body."))
    put_article(s3, "PMC99", 1, jats("PMC99", "", "Noncommercial", sentence(2, "nc"), "Body."), license_code="CC BY-NC")
    put_article(s3, "PMC101", 1, jats("PMC101", "900101", "Retracted", sentence(3, "r"), "Body."), retracted=True)
    put_article(s3, "PMC102", 1, jats("PMC102", "", "Deutsch", "Eine Studie.", "Text.", lang="de"))
    put_article(s3, "PMC103", 1, jats("PMC103", "", "Manuscript", sentence(4, "m"), "Body."), license_code="TDM",
                openaccess=False)
    put_article(s3, "PMC1000", 1, jats("PMC1000", "901000", "Kept", sentence(5, "k"), "A body paragraph."))
    return put_inventory(s3, "2026-12-01T01-00Z")


def test_the_bucket_is_read_from_its_inventory_latest_versions_and_chosen_licences(fake_s3, tmp_path):
    _, s3 = fake_s3
    assert lay_out(s3) == 7
    put_inventory(s3, "2026-11-30T01-00Z")  # an older inventory beside it is not the one read
    files, listed = readers.list_inputs([ROOT])
    # one entry per PMCID, its latest version, in PMCID order (PMC1000 after PMC103, not between)
    assert [f.rsplit("/", 1)[1] for f, _, _ in files] == [
        "PMC99.1.json", "PMC100.2.json", "PMC101.1.json", "PMC102.1.json", "PMC103.1.json", "PMC1000.1.json"]
    assert listed == {"older_version": 1, "withdrawn": 0} and all(v for _, _, v in files)  # ETags, from the inventory
    out = tmp_path / "out"
    m = prepare.prepare([ROOT], GPT2, str(out), seq_len=16, eval_fraction=0.0, rows_per_shard=64, progress=False)
    dropped = m["card"]["dropped"]
    assert (dropped["license"], dropped["retracted"], dropped["language"], dropped["older_version"]) == (2, 1, 1, 1)
    ids = [line.split("\t")[0] for line in (out / "train-docs.tsv").read_text().splitlines()]
    assert ids == ["PMC100", "PMC1000"]
    assert m["card"]["sources"]["pmc_cloud"]["train"]["documents"] == 2 and m["card"]["pmc_licenses"] == ["oa_comm"]
    # the text of version 2, not 1
    stats = readers.ReadStats()
    docs = dict(readers.read_documents([f for f, _, _ in files], stats))
    assert docs["PMC100"].startswith("New title\n" + sentence(1, "v2"))
    # a list of withdrawn articles (NLM's, for a mirror older than their removal) leaves them out
    (tmp_path / "withdrawn.csv").write_text("PMCID,Reason\nPMC1000,licence expired\n")
    m3 = prepare.prepare([ROOT], GPT2, str(tmp_path / "w"), seq_len=16, eval_fraction=0.0, rows_per_shard=64,
                         progress=False, pmc_withdrawn=str(tmp_path / "withdrawn.csv"))
    assert m3["card"]["dropped"]["withdrawn"] == 1 and m3["splits"]["train"]["documents"] == 1
    # non-commercial articles only when asked for
    m2 = prepare.prepare([ROOT], GPT2, str(tmp_path / "nc"), seq_len=16, eval_fraction=0.0, rows_per_shard=64,
                         progress=False, pmc_license="oa_comm,oa_noncomm")
    assert m2["card"]["dropped"]["license"] == 1 and m2["splits"]["train"]["documents"] == 3


def test_globs_of_metadata_objects_work_without_an_inventory(fake_s3):
    _, s3 = fake_s3
    lay_out(s3)
    files, listed = readers.list_inputs(["s3://pmc-oa-opendata/metadata/PMC10*.json"])
    assert [f.rsplit("/", 1)[1] for f, _, _ in files] == ["PMC100.2.json", "PMC101.1.json", "PMC102.1.json",
                                                          "PMC103.1.json", "PMC1000.1.json"]
    assert listed["older_version"] == 1
    # a glob over article prefixes names the same article once, through its own PMCn.v.json
    files, _ = readers.list_inputs(["s3://pmc-oa-opendata/PMC100.*/*"])
    assert [f for f, _, _ in files] == ["s3://pmc-oa-opendata/PMC100.2/PMC100.2.json"]
    assert pmc_cloud.xml_path(files[0][0]) == "s3://pmc-oa-opendata/PMC100.2/PMC100.2.xml"


def test_bad_objects_are_named_and_nothing_is_lost(fake_s3, tmp_path):
    _, s3 = fake_s3
    lay_out(s3)
    # a listing that names a missing object: the metadata is there, the XML is not
    meta = json.loads(s3.get_object(Bucket="pmc-oa-opendata", Key="metadata/PMC1000.1.json")["Body"].read())
    put(s3, "metadata/PMC2000.1.json", json.dumps(dict(meta, pmcid="PMC2000")).encode())
    with pytest.raises(errors.DataError, match=r"s3://pmc-oa-opendata/PMC2000.1/PMC2000.1.xml: listed but not found"):
        list(readers.read_documents([f"{ROOT}metadata/PMC2000.1.json"]))
    # an unreadable article: malformed XML names the object and line; a changed object fails its MD5
    put(s3, "PMC3000.1/PMC3000.1.xml", b"<article><front>\n<oops></article>")
    put(s3, "metadata/PMC3000.1.json", json.dumps(dict(meta, pmcid="PMC3000", xml_url="")).encode())
    with pytest.raises(errors.DataError, match=r"PMC3000.1/PMC3000.1.xml:2: malformed XML"):
        list(readers.read_documents([f"{ROOT}metadata/PMC3000.1.json"]))
    put(s3, "PMC1000.1/PMC1000.1.xml", jats("PMC1000", "901000", "Changed", "after the metadata", "x"))
    with pytest.raises(errors.DataError, match=r"PMC1000.1/PMC1000.1.xml: its MD5 differs"):
        list(readers.read_documents([f"{ROOT}metadata/PMC1000.1.json"]))
    # with --on_error=skip each is counted and the rest of the bucket is read
    stats = readers.ReadStats()
    files = [f for f, _, _ in readers.list_files([f"{ROOT}metadata/"])]
    docs = dict(readers.read_documents(files, stats, on_error="skip"))
    assert list(docs) == ["PMC100"] and stats.errors_skipped == 3
    # a bucket that refuses access: the CLI names the object and exits 2, and writes nothing
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="metadata/PMC5.1.json", Body=json.dumps(meta).encode())
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", "--input=s3://private/metadata/",
                        f"--tokenizer={GPT2}", f"--out={tmp_path / 'refused'}", "--seq_len=16"],
                       capture_output=True, text=True, cwd=REPO, env=os.environ.copy(), timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "s3://private/metadata/PMC5.1.json: access refused" in r.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.work").exists()


def test_a_unit_fetches_its_articles_concurrently_within_its_bound(fake_s3, monkeypatch):
    _, s3 = fake_s3
    public_bucket(s3)
    for i in range(40):
        put_article(s3, f"PMC{5000 + i}", 1, jats(f"PMC{5000 + i}", "", f"T{i}", sentence(i, "c"), "B."))
    files = [f for f, _, _ in readers.list_files([f"{ROOT}metadata/"])]
    import threading
    import time

    live, peak, lock = [0], [0], threading.Lock()
    plain = pmc_cloud._read

    def counted(path):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            time.sleep(0.05)  # a remote store's round trip, so that fetches overlap
            return plain(path)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(pmc_cloud, "_read", counted)
    stats = readers.ReadStats()
    got = [doc.id for _, _, doc in readers.read_unit(files, stats, concurrency=6)]
    assert got == [f"PMC{5000 + i}" for i in range(40)]  # in order, whatever order the fetches ended in
    assert 1 < peak[0] <= 6


@pytest.mark.slow
def test_two_beam_workers_equal_the_local_run(fake_s3, tmp_path):
    env, s3 = fake_s3
    lay_out(s3)
    args = [f"--input={ROOT}", f"--tokenizer={GPT2}", "--seq_len=16", "--eval_fraction=0.3", "--rows_per_shard=4"]
    outs = {}
    for name, extra in (("local", []), ("beam", ["--runner=DirectRunner", "--direct_num_workers=2"])):
        outs[name] = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.prepare_data", *args, f"--out={outs[name]}", *extra],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    names = sorted(os.listdir(outs["local"]))
    assert names == sorted(os.listdir(outs["beam"])) and any(n.endswith(".npy") for n in names)
    for n in names:
        if n == "manifest.json":
            a, b = (json.loads((outs[k] / n).read_text()) for k in ("local", "beam"))
            a.pop("seconds"), b.pop("seconds")
            assert a == b
        elif n.endswith((".npy", ".tsv")):
            assert (outs["local"] / n).read_bytes() == (outs["beam"] / n).read_bytes(), n
    assert np.load(outs["local"] / "train-00000.npy").shape[1] == 17


def test_a_newer_listing_fetches_and_tokenizes_only_what_changed(fake_s3, tmp_path, monkeypatch):
    _, s3 = fake_s3
    public_bucket(s3)
    for i in range(30):  # PMCIDs 4000..4058 in two blocks of 32 ids (unit_bytes 2 MB / 64 KB)
        put_article(s3, f"PMC{4000 + 2 * i}", 1, jats(f"PMC{4000 + 2 * i}", "", f"T{i}", sentence(i, "a"), "B."))
    put_inventory(s3, "2026-12-01T01-00Z")
    work, out = str(tmp_path / "cache"), str(tmp_path / "out")
    kw = dict(seq_len=16, eval_fraction=0.2, rows_per_shard=8, progress=False, unit_bytes=2 << 20, work=work,
              keep_work=True)
    m1 = prepare.prepare([ROOT], GPT2, out, **kw)
    assert m1["read_stats"]["reused"] == 0 and m1["splits"]["train"]["documents"] + \
        m1["splits"]["validation"]["documents"] == 30
    # the next day: one article revised (a version 2), one replaced in place (new XML and metadata), one added
    put_article(s3, "PMC4010", 2, jats("PMC4010", "", "Revised", sentence(100, "r"), "B."))
    put_article(s3, "PMC4020", 1, jats("PMC4020", "", "Corrected", sentence(101, "c"), "B."))
    put_article(s3, "PMC4061", 1, jats("PMC4061", "", "New", sentence(102, "n"), "B."))
    put_inventory(s3, "2026-12-02T01-00Z")
    fetched = []
    plain = pmc_cloud.fetch
    monkeypatch.setattr(pmc_cloud, "fetch", lambda path, licenses: fetched.append(path) or plain(path, licenses))
    m2 = prepare.prepare([ROOT], GPT2, out, overwrite=True, **kw)
    assert sorted(f.rsplit("/", 1)[1] for f in fetched) == ["PMC4010.2.json", "PMC4020.1.json", "PMC4061.1.json"]
    assert m2["read_stats"]["reused"] == 30 - 2 and m2["read_stats"]["older_version"] == 1
    # the same bytes as a run from nothing over the newer listing
    fresh = prepare.prepare([ROOT], GPT2, str(tmp_path / "fresh"), **dict(kw, work=None, keep_work=False))
    for name in sorted(os.listdir(out)):
        if name.endswith((".npy", ".tsv")):
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert fresh["splits"] == m2["splits"]
    # the superseded caches are gone: one per block
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path / "cache" / "units") if n.endswith(".npz")) == \
        ["pmc0000125", "pmc0000126"]
