"""TFDS builder for PubMed abstracts from the NLM baseline XML files you download yourself.

    import tensorflow_datasets as tfds
    from biomedlm_jax.data import tfds_pubmed  # registers "pubmed_abstracts"
    builder = tfds_pubmed.PubmedAbstracts(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir="~/pubmed/baseline"))
    ds = builder.as_dataset(split="train")   # {"pmid": str, "text": title + "\n" + abstract}

Splits: `validation` holds the PMIDs whose CRC32 hash falls in the first 0.5% (`PubmedConfig.eval_fraction`), and
`train` holds the rest. This is the same split rule as `prepare_data` and the trainer's in-memory path.
PMIDs are de-duplicated: the first occurrence in file order is kept. Articles with neither a title nor an
abstract are dropped. Only this module imports TensorFlow/TFDS; the trainer does not need it.
"""
from __future__ import annotations

import dataclasses
import glob
import os

import tensorflow_datasets as tfds

from biomedlm_jax.data import packing, readers

EVAL_FRACTION = 0.005

_INSTRUCTIONS = """\
Download the PubMed baseline (XML, gzip) from NLM into one folder and pass it as manual_dir:

    wget -r -np -nd -A 'pubmed*.xml.gz' -P ~/pubmed/baseline https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/

(about 1,200 files, ~40 GB compressed; see https://www.nlm.nih.gov/databases/download/pubmed_medline.html
and NLM's terms and conditions). Plain `.xml` files work too; other files in the folder are ignored.
"""


@dataclasses.dataclass
class PubmedConfig(tfds.core.BuilderConfig):
    eval_fraction: float = EVAL_FRACTION  # share of PMIDs (by hash) in the validation split


class PubmedAbstracts(tfds.core.GeneratorBasedBuilder):
    """PubMed titles + abstracts, keyed by PMID."""

    BUILDER_CONFIGS = [PubmedConfig(name="default", description="0.5% of PMIDs held out")]
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Title + abstract per PMID; train/validation by PMID hash."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"pmid": tfds.features.Text(), "text": tfds.features.Text()}),
            supervised_keys=None,
            homepage="https://pubmed.ncbi.nlm.nih.gov/download/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual = os.fspath(dl_manager.manual_dir)
        files = sorted(glob.glob(os.path.join(manual, "*.xml.gz")) + glob.glob(os.path.join(manual, "*.xml")))
        if not files:
            raise FileNotFoundError(f"{manual}: no PubMed *.xml.gz / *.xml files.\n{_INSTRUCTIONS}")
        return {"train": self._generate_examples(files, "train"),
                "validation": self._generate_examples(files, "validation")}

    def _generate_examples(self, files, split):
        held_out = split == "validation"
        for pmid, text in readers.read_documents(files, fmt="pubmed_xml"):
            if packing.in_eval_split(pmid, self.builder_config.eval_fraction) == held_out:
                yield pmid, {"pmid": pmid, "text": text}
