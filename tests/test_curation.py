"""What prepare_data leaves out and keeps together: the curation a careful team expects (issue 41).

Each test builds a small corpus made to tempt one fault: a split that parts an abstract from its full
text, a reader whose memory grows with the file, JATS text with citation debris, the same text under
two ids, a retracted or non-English record, and an object-store layer that depends on TensorFlow.
"""
import gzip
import json
import os
import re
import subprocess
import sys
import tracemalloc

from conftest import REPO

from biomedlm_jax.data import prepare, readers

GPT2 = str(REPO.parent / "shared" / "data" / "gpt2_tokenizer")


def _sentences(text: str) -> set[str]:
    return {s.strip() for s in re.split(r"(?<=\.)\s+|\n", text) if len(s.strip()) > 30}


def test_an_abstract_and_its_full_text_are_always_in_the_same_split(tmp_path):
    """Each of 60 articles comes twice: its PubMed abstract (keyed by PMID) and its PMC full text (keyed
    by PMCID) with the same abstract sentences. Split by record id, about half of them would leak."""
    abstracts, pmc = tmp_path / "abstracts.jsonl", tmp_path / "pmc"
    pmc.mkdir()
    with open(abstracts, "w") as f:
        for i in range(60):
            abstract = (f"We studied marker {i} in {100 + i} patients with condition {i % 7}. "
                        f"Marker {i} predicted outcome {i * 3} with an odds ratio of {1 + i / 50:.2f}.")
            f.write(json.dumps({"pmid": str(31000000 + i), "title": f"Marker {i} study", "abstract": abstract}) + "\n")
            (pmc / f"PMC{8000000 + i}.nxml").write_text(
                f'<article xml:lang="en"><front><article-meta>'
                f'<article-id pub-id-type="pmid">{31000000 + i}</article-id>'
                f'<article-id pub-id-type="pmc">{8000000 + i}</article-id>'
                f'<title-group><article-title>Marker {i} study</article-title></title-group>'
                f'<abstract><p>{abstract}</p></abstract></article-meta></front>'
                f'<body><sec><p>Full text paragraph number {i} with the methods of the marker {i} study in detail.</p>'
                f'</sec></body></article>')
    out = tmp_path / "out"
    m = prepare.prepare([str(abstracts), str(pmc)], GPT2, str(out), seq_len=32, eval_fraction=0.3,
                        rows_per_shard=1000, progress=False)
    docs = dict(readers.read_documents([str(abstracts), *sorted(str(p) for p in pmc.iterdir())]))
    split = {}
    for name in ("train", "validation"):
        for line in (out / f"{name}-docs.tsv").read_text().splitlines():
            split[line.split("\t")[0]] = name
    assert len(split) == 120 and 0 < m["splits"]["validation"]["documents"] < 120
    train = set().union(*(_sentences(docs[d]) for d, s in split.items() if s == "train"))
    for d, s in split.items():
        if s == "validation":
            assert not _sentences(docs[d]) & train, f"{d} shares a sentence with a train document"


def _pubmed_file(path, n: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('<?xml version="1.0"?>\n<PubmedArticleSet>\n')
        for i in range(n):
            f.write(f'<PubmedArticle><MedlineCitation><PMID Version="1">{i + 1}</PMID><Article>'
                    f'<ArticleTitle>Title {i}</ArticleTitle><Abstract><AbstractText>{"Abstract words. " * 40}'
                    f'</AbstractText></Abstract><AuthorList>{"<Author><LastName>Doe</LastName></Author>" * 10}'
                    f'</AuthorList></Article></MedlineCitation><PubmedData><ArticleIdList>'
                    f'<ArticleId IdType="pubmed">{i + 1}</ArticleId></ArticleIdList>'
                    f'<ReferenceList>{"<Reference><Citation>A cited paper.</Citation></Reference>" * 20}'
                    f'</ReferenceList></PubmedData></PubmedArticle>\n')
        f.write("</PubmedArticleSet>\n")


def test_reading_a_pubmed_file_takes_the_same_memory_at_any_size(tmp_path):
    peaks = {}
    for n in (1500, 6000):
        path = tmp_path / f"pubmed{n}.xml.gz"
        _pubmed_file(path, n)
        tracemalloc.start()
        count = sum(1 for _ in readers.read_pubmed_xml(str(path)))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n
    # 4x the records: the peak stays flat (it grew ~4x when each PubmedArticle stayed in the tree)
    assert peaks[6000] < 1.3 * peaks[1500], peaks


def test_jats_text_has_no_citation_debris_and_keeps_figure_labels_and_formulas(tmp_path):
    p = tmp_path / "a.nxml"
    p.write_text(
        '<article xml:lang="en"><front><article-meta><article-id pub-id-type="pmc">1</article-id>'
        '<title-group><article-title>T</article-title></title-group>'
        '<abstract abstract-type="graphical"><p>GRAPHICAL ABSTRACT</p></abstract>'
        '<abstract abstract-type="teaser"><p>TEASER</p></abstract>'
        '<abstract xml:lang="fr"><p>RESUME EN FRANCAIS</p></abstract>'
        '<abstract><p>The real abstract.</p></abstract></article-meta></front><body><sec>'
        '<p>Expression increased (<xref ref-type="bibr" rid="b1">1</xref>) as reported previously '
        '[<xref ref-type="bibr" rid="b2">2</xref>, <xref ref-type="bibr" rid="b3">3</xref>].</p>'
        '<p>As shown in <xref ref-type="fig" rid="f2"/>, the effect was significant '
        '(<xref ref-type="table" rid="t1">Table 1</xref>).</p>'
        '<p>Risk rose<sup><xref ref-type="bibr" rid="b1">1</xref>,<xref ref-type="bibr" rid="b2">2</xref></sup> '
        'with dose (Smith et al., <xref ref-type="bibr" rid="b4">2001</xref>; <xref ref-type="bibr" rid="b5">'
        'Jones 2003</xref>).</p>'
        '<p>The rate was <inline-formula><mml:math xmlns:mml="http://www.w3.org/1998/Math/MathML"><mml:mi>k</mml:mi>'
        '<mml:mo>=</mml:mo><mml:mn>2</mml:mn></mml:math></inline-formula> per day.</p>'
        '<fig id="f2"><label>Fig. 2</label><caption><p>CAPTION</p></caption></fig>'
        '<table-wrap id="t1"><label>Table 1</label></table-wrap></sec></body></article>')
    (_, text), = readers.read_documents([str(p)])
    lines = text.splitlines()
    assert lines[:2] == ["T", "The real abstract."]
    assert "Expression increased as reported previously." in lines
    assert "As shown in Fig. 2, the effect was significant (Table 1)." in lines
    assert "The rate was k=2 per day." in lines
    assert not re.search(r"\(\s*\)|\[\s*[,;]?\s*\]|\s[,;]\s*[,;.]|GRAPHICAL|TEASER|FRANCAIS|CAPTION", text), text
    assert any(line.startswith("Risk rose with dose") for line in lines), lines


def test_curation_drops_retracted_non_english_duplicate_and_abstract_less_records(tmp_path):
    pubmed = tmp_path / "pubmed26n0001.xml"
    pubmed.write_text(
        '<PubmedArticleSet>'
        '<PubmedArticle><MedlineCitation><PMID>1</PMID><Article><ArticleTitle>Kept</ArticleTitle>'
        '<Abstract><AbstractText>An English abstract.</AbstractText></Abstract><Language>ger</Language></Article>'
        '<OtherAbstract Language="ger"><AbstractText>Eine deutsche Zusammenfassung.</AbstractText></OtherAbstract>'
        '</MedlineCitation></PubmedArticle>'
        '<PubmedArticle><MedlineCitation><PMID>2</PMID><Article><ArticleTitle>Retracted</ArticleTitle>'
        '<Abstract><AbstractText>Fabricated.</AbstractText></Abstract><PublicationTypeList>'
        '<PublicationType UI="D016428">Journal Article</PublicationType>'
        '<PublicationType UI="D016441">Retracted Publication</PublicationType></PublicationTypeList>'
        '</Article></MedlineCitation></PubmedArticle>'
        '<PubmedArticle><MedlineCitation><PMID>3</PMID><Article><ArticleTitle>A title alone</ArticleTitle>'
        '</Article></MedlineCitation></PubmedArticle>'
        '</PubmedArticleSet>')
    jsonl = tmp_path / "copies.jsonl"
    jsonl.write_text(json.dumps({"id": "copy-a", "text": "Kept\nAn   english ABSTRACT."}) + "\n"
                     + json.dumps({"id": "other", "text": "Something else entirely, long enough to count."}) + "\n")
    jats = tmp_path / "de.nxml"
    jats.write_text('<article xml:lang="de"><front><article-meta><article-id pub-id-type="pmc">9</article-id>'
                    '<title-group><article-title>Titel</article-title></title-group></article-meta></front>'
                    '<body><p>Ein Text.</p></body></article>')
    out = tmp_path / "out"
    m = prepare.prepare([str(pubmed), str(jsonl), str(jats)], GPT2, str(out), seq_len=4, eval_fraction=0.0,
                        rows_per_shard=100, progress=False)
    ids = [line.split("\t")[0] for line in (out / "train-docs.tsv").read_text().splitlines()]
    assert ids == ["1", "other"]  # copy-a repeats 1's text (case and spacing aside): the first copy stays
    d = m["card"]["dropped"]
    assert (d["retracted"], d["no_abstract"], d["language"], d["duplicate_text"]) == (1, 1, 1, 1)
    assert m["card"]["sources"]["pubmed_xml"]["train"]["documents"] == 1
    text = dict(readers.read_documents([str(pubmed)]))["1"]
    assert "deutsche" not in text  # OtherAbstract is not read; PubMed's Language did not drop the record
    # the dedupe can be turned off
    m2 = prepare.prepare([str(pubmed), str(jsonl)], GPT2, str(tmp_path / "all"), seq_len=4, eval_fraction=0.0,
                         rows_per_shard=100, progress=False, dedupe_text=False)
    assert m2["splits"]["train"]["documents"] == 3 and m2["card"]["dropped"]["duplicate_text"] == 0


def test_object_stores_go_through_fsspec_with_tensorflow_installed_and_nothing_set():
    env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
    code = ("import importlib.util, os; assert importlib.util.find_spec('tensorflow');"
            "from biomedlm_jax.core import paths; from etils.epath import backend;"
            "print(os.environ['EPATH_USE_TF'], paths.Path('gs://b/x')._backend is backend.fsspec_backend,"
            " paths.Path('s3://b/x')._backend is backend.fsspec_backend)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["false", "True", "True"]


def test_near_duplicates_and_detected_languages_behind_their_flags(tmp_path):
    base = ("Heparin induced thrombocytopenia was observed in twelve of one hundred and twenty patients who "
            "received unfractionated heparin after cardiac surgery, and platelet counts recovered within a week "
            "of stopping the drug in all but one patient, who needed argatroban for deep vein thrombosis.")
    near = base.replace("twelve", "eleven")  # one word changed: Jaccard of 5-gram shingles ~0.85
    french = ("La thrombocytopénie induite par l'héparine a été observée chez douze des cent vingt patients qui "
              "ont reçu de l'héparine non fractionnée après une chirurgie cardiaque.")
    other = ("Pharmacokinetics of a novel acetyltransferase inhibitor were measured in forty healthy volunteers; "
             "plasma half-life was four hours and no serious adverse events were recorded during the trial.")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                             for i, t in (("a", base), ("b", near), ("c", french), ("d", other))))
    kw = dict(seq_len=4, eval_fraction=0.0, rows_per_shard=100, progress=False)
    plain = prepare.prepare([str(jsonl)], GPT2, str(tmp_path / "plain"), **kw)
    assert plain["splits"]["train"]["documents"] == 4  # off by default: neither filter runs
    m = prepare.prepare([str(jsonl)], GPT2, str(tmp_path / "curated"), near_dedupe=True, detect_language=True, **kw)
    ids = [line.split("\t")[0] for line in (tmp_path / "curated" / "train-docs.tsv").read_text().splitlines()]
    assert ids == ["a", "d"]
    assert m["card"]["dropped"]["duplicate_text"] == 1 and m["card"]["dropped"]["language"] == 1
    assert m["card"]["near_dedupe"] and m["card"]["detect_language"]
