"""Layer 1, data: raw documents to training rows. `readers` (PubMed XML, PubTator, JSONL; `records`: what
readers yield; `jats`: PMC full text; `pmc_cloud`: PMC's Cloud Service bucket; `curation`: near-duplicates
and language detection),
`tokenizer` (byte-level BPE: load, save, train, compare), `packing` (documents to rows, the held-out
split), `shards` (prepared shards and their manifest), `input_pipeline` (`BatchIterator`, tf.data),
`prepare_units` / `prepare_stages` / `prepare` / `prepare_beam` (corpus preparation, local or on Beam), `tfds_pubmed`.

Imports: core. No JAX model code; only `tfds_pubmed` and the tf.data wrapper touch TensorFlow.
"""
