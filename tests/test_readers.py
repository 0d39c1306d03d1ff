"""Corpus readers: PubMed XML, PubTator, JSONL, JATS; errors name file and line; stats are counted."""
import gzip
import pathlib
import shutil

import pytest
from conftest import REPO

from biomedlm_jax.core import errors
from biomedlm_jax.data import readers

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHARED = REPO.parent / "shared" / "data" / "pubmed_abstracts"


def test_pubmed_xml_labelled_sections_nested_markup_dedupe_and_empty(tmp_path):
    gz = tmp_path / "pubmed24n0001.xml.gz"
    with open(FIXTURES / "pubmed_baseline_sample.xml", "rb") as f, gzip.open(gz, "wb") as g:
        shutil.copyfileobj(f, g)
    for path in (FIXTURES / "pubmed_baseline_sample.xml", gz):
        stats = readers.ReadStats()
        docs = dict(readers.read_documents([str(path)], stats))
        # 10000003 is a citation without an abstract: left out, as The Pile's PubMed Abstracts does
        assert list(docs) == ["10000001", "10000002"]
        assert docs["10000001"] == (
            "Thrombocytopenia after heparin exposure: a prospective cohort.\n"
            "BACKGROUND: Heparin-induced thrombocytopenia (HIT) is rare. METHODS: We followed 120 patients; "
            "platelet counts < 150 × 109/L were flagged. CONCLUSIONS: HIT occurred in 2.5% (β = 0.8)."
        )
        # (the revised 10000001 has no abstract either, so it is counted there, not as a duplicate)
        assert (stats.documents, stats.no_abstract, stats.duplicates, stats.empty) == (2, 2, 0, 1)


def test_malformed_xml_names_file_and_line_or_is_skipped(tmp_path):
    bad = tmp_path / "broken.xml"
    text = (FIXTURES / "pubmed_baseline_sample.xml").read_text(encoding="utf-8")
    bad.write_text(text.replace("<PMID Version=\"1\">10000002</PMID>", "<PMID>10000002</PMD>"), encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"broken.xml:20: malformed XML"):
        list(readers.read_documents([str(bad)]))
    stats = readers.ReadStats()
    docs = list(readers.read_documents([str(bad)], stats, on_error="skip"))
    assert [d for d, _ in docs] == ["10000001"] and stats.errors_skipped == 1


def test_jats_full_text_skips_references_tables_figures():
    (doc_id, text), = readers.read_documents([str(FIXTURES / "pmc_jats_sample.xml")])
    assert doc_id == "PMC7000001"
    assert text.splitlines()[:3] == ["BRCA1 variants in a small cohort", "We sequenced BRCA1 in 40 families.", "Introduction"]
    assert "Germline BRCA1 mutations raise breast cancer risk ." in text
    assert "Eleven pathogenic variants were found (Table 1)." in text
    assert "SKIPPED" not in text


def test_pubtator_and_bad_lines(tmp_path):
    p = tmp_path / "x.PubTator.txt"
    p.write_text("111|t|A title\n111|a|An abstract.\n111\t0\t1\tA\tDisease\tD1\n\n222|t|Only title\n\n", encoding="utf-8")
    stats = readers.ReadStats()
    assert list(readers.read_documents([str(p)], stats)) == [("111", "A title\nAn abstract.")]
    assert stats.no_abstract == 1  # 222 has a title only
    p.write_text("111|t|A title\nthis line is garbage\n", encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"x.PubTator.txt:2: not a PubTator line"):
        list(readers.read_documents([str(p)]))


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"pmid": "1", "text": "caf\xe9 au lait spots"}\n{"pmid": "2", "text": "plain"}\n')
    stats = readers.ReadStats()
    docs = dict(readers.read_documents([str(p)], stats))
    assert docs == {"1": "caf\ufffd au lait spots", "2": "plain"} and stats.non_utf8_lines == 1


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_shared_pubtator_corpus_matches_source_counts():
    files = readers.expand_files(f"{SHARED}/ncbi_disease/*corpus.txt,{SHARED}/bc5cdr/*.PubTator.txt")
    assert len(files) == 6
    stats = readers.ReadStats()
    docs = list(readers.read_documents(files, stats))
    # SOURCE.md: 793 NCBI Disease docs (PMID 8528200 twice) + 1,500 BC5CDR docs -> 2,292 unique
    assert stats.documents == 2292 and stats.duplicates == 1
    jsonl = dict(readers.read_documents([str(SHARED / "abstracts.jsonl")]))
    assert dict(docs) == jsonl


def test_format_detection_and_unknown_files(tmp_path):
    assert readers.detect_format(str(FIXTURES / "pubmed_baseline_sample.xml")) == "pubmed_xml"
    assert readers.detect_format(str(FIXTURES / "pmc_jats_sample.xml")) == "jats"
    odd = tmp_path / "data.bin"
    odd.write_bytes(b"\x00\x01garbage")
    with pytest.raises(errors.DataError, match="data.bin: cannot tell the format"):
        list(readers.read_documents([str(odd)]))


def pmc_package(path, articles: dict, extra: dict = None) -> str:
    """A PMC bulk package: a .tar.gz of JATS files ({member name: PMC number}), plus other members."""
    import io
    import random
    import tarfile

    jats = (FIXTURES / "pmc_jats_sample.xml").read_text(encoding="utf-8")
    rnd = random.Random(0)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in list((extra or {}).items()) + [
                (n, jats.replace("7000001", str(pmc)).replace("<body>", "<body><p>" + " ".join(
                    rnd.choice(["heparin", "platelet", "cohort", "assay", "renal", "dose"]) for _ in range(400))
                    + "</p>")) for n, pmc in articles.items()]:
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_pmc_bulk_packages_are_read_member_by_member_and_damage_is_named(tmp_path):
    """PMC's .tar.gz packages of JATS files: every article a record keyed by its PMCID, read as a stream
    (other members passed over); a malformed member and a truncated archive are named archive:member,
    or skipped and counted."""
    tgz = pmc_package(tmp_path / "oa_comm_xml.PMC001xxxxxx.baseline.tar.gz",
                      {"PMC001/a.nxml": 1000001, "PMC002/b.xml": 1000002, "PMC003/c.nxml": 1000003},
                      extra={"PMC001/a.pdf": b"%PDF-1.4", "README": "not an article"})
    assert readers.detect_format(tgz) == "pmc_tar"
    stats = readers.ReadStats()
    docs = dict(readers.read_documents([tgz], stats))
    assert list(docs) == ["PMC1000001", "PMC1000002", "PMC1000003"]
    assert all(d.count("heparin") > 20 for d in docs.values())
    # the same articles as a folder of .nxml files give the same texts
    single = tmp_path / "single.nxml"
    jats = (FIXTURES / "pmc_jats_sample.xml").read_text(encoding="utf-8")
    single.write_text(jats, encoding="utf-8")
    assert dict(readers.read_documents([str(single)]))["PMC7000001"].split("\n")[0] == docs["PMC1000001"].split("\n")[0]

    broken = pmc_package(tmp_path / "broken.tar.gz", {"PMC001/a.nxml": 1000001, "PMC003/c.nxml": 1000003},
                         extra={"PMC002/b.nxml": "<article><front>cut"})
    with pytest.raises(errors.DataError, match=r"broken\.tar\.gz:PMC002/b\.nxml:1: malformed XML"):
        list(readers.read_documents([broken]))
    stats = readers.ReadStats()
    assert list(dict(readers.read_documents([broken], stats, on_error="skip"))) == ["PMC1000001", "PMC1000003"]
    assert stats.errors_skipped == 1

    data = open(tgz, "rb").read()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[:-300])  # inside the last article
    with pytest.raises(errors.DataError, match=r"cut\.tar\.gz:PMC003/c\.nxml: truncated or corrupt archive"):
        list(readers.read_documents([str(cut)]))
    stats = readers.ReadStats()
    assert list(dict(readers.read_documents([str(cut)], stats, on_error="skip"))) == ["PMC1000001", "PMC1000002"]
    assert stats.errors_skipped == 1
