"""The TFDS builder builds PubMed abstracts from baseline XML in manual_dir (a tiny fixture here)."""
import gzip
import pathlib
import shutil

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def test_builds_train_and_validation_from_manual_dir(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from biomedlm_jax.data import packing, tfds_pubmed

    manual = tmp_path / "manual"
    manual.mkdir()
    with open(FIXTURES / "pubmed_baseline_sample.xml", "rb") as f, gzip.open(manual / "pubmed24n0001.xml.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    (manual / "README.txt").write_text("not a baseline file")
    # TFDS refuses an empty split, and 0.5% of three PMIDs is none: hold out half for the fixture
    config = tfds_pubmed.PubmedConfig(name="half", eval_fraction=0.5)
    assert [packing.in_eval_split(p, 0.5) for p in ("10000001", "10000002")].count(True) == 1
    builder = tfds_pubmed.PubmedAbstracts(data_dir=str(tmp_path / "data"), config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    got = {}
    for split in ("train", "validation"):
        for ex in tfds.as_numpy(builder.as_dataset(split=split)):
            got[ex["pmid"].decode()] = (split, ex["text"].decode())
    # the PMIDs with an abstract (the duplicate, the empty record and 10000003, a title alone, are dropped)
    assert sorted(got) == ["10000001", "10000002"]
    for pmid, (split, _) in got.items():
        assert (split == "validation") == packing.in_eval_split(pmid, 0.5)
    assert got["10000002"][1].startswith("Pharmacokinetics of an acetyltransferase inhibitor.\nPlasma half-life")


def test_missing_manual_files_explain_the_download(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from biomedlm_jax.data import tfds_pubmed

    (tmp_path / "empty").mkdir()
    builder = tfds_pubmed.PubmedAbstracts(data_dir=str(tmp_path / "data"))
    with pytest.raises(Exception, match="ftp.ncbi.nlm.nih.gov/pubmed/baseline"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "empty")))
