"""Tokenize a corpus once, offline, into packed row shards that pretraining memory-maps.

    python -m biomedlm_jax.prepare_data --input='pubmed/baseline/*.xml.gz,pmc/**/*.nxml' \
        --tokenizer=DIR --out=DIR [--seq_len=1024 --eval_fraction=0.005 --rows_per_shard=65536 --on_error=skip]
    python -m biomedlm_jax.prepare_data --input='gs://B/pubmed/*.xml.gz,gs://B/pmc/oa_comm/' --tokenizer=gs://B/tok \
        --out=gs://B/data --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \
        --setup_file=./setup.py        # every path may be a URL; on a cluster every path must be
    python -m biomedlm_jax.prepare_data audit --corpus=DIR --pubmedqa=ori_pqal.json [--bioasq=training.json] [--out=F]

Output directory:

    manifest.json            format, seq_len/row_len, token dtype, tokenizer sha256, inputs, read counts,
                             per split: rows, tokens, documents, dropped tail, shard files (rows, sha256,
                             header size), fingerprint
    train-00000.npy ...      (rows, seq_len + 1) uint16 (uint32 for vocabularies > 65,536), memory-mappable
    validation-00000.npy ...
    train-docs.tsv           doc_id <TAB> row where the document starts (the side index: ids never enter
    validation-docs.tsv      the token stream); used by `audit` for contamination checks
    tokenizer/               the tokenizer the rows were made with

Documents are streamed (any size of corpus), de-duplicated by id, split into train/validation by a hash
of the id (the same split as the TFDS builder and the trainer's in-memory path), tokenized in parallel
batches, each followed by <|endoftext|>, and packed. The output is built in `OUT.work/out` (beside OUT,
on the same store) and moved to OUT at the end, manifest last, so an interrupted run leaves nothing
that looks complete, and a rerun of the same command resumes from the tokenized units in `OUT.work`.
An existing output is never overwritten without --overwrite. Input files are grouped into work units
(--work_unit_mb): one task and one cache each. docs/data.md has the details and the measurements.

Why .npy and not TFRecord: pretraining resumes by seeking to a row position (see input_pipeline), which
needs random access. TFRecord files can only be read sequentially, and reading them needs TensorFlow,
which the GPU images do not have. ArrayRecord would add another native dependency. Memory-mapped .npy
shards give random access with numpy alone.
"""
from __future__ import annotations

import argparse
import sys

from biomedlm_jax.core import errors
from biomedlm_jax.data import pmc_cloud, readers
from biomedlm_jax.data.prepare import audit, prepare


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit"]:
        p = argparse.ArgumentParser(prog="python -m biomedlm_jax.prepare_data audit",
                                    description="Which evaluation items' abstracts are in a prepared corpus")
        p.add_argument("--corpus", required=True, help="a directory written by prepare_data")
        p.add_argument("--pubmedqa", action="append", default=[], help="PubMedQA JSON keyed by PMID (repeatable)")
        p.add_argument("--bioasq", action="append", default=[], help="BioASQ JSON (repeatable)")
        p.add_argument("--out", default="contamination.json", help="JSON report with the overlapping ids")
        args = p.parse_args(argv[1:])
        if not args.pubmedqa and not args.bioasq:
            p.error("give at least one --pubmedqa or --bioasq file")
        report = audit(args.corpus, args.pubmedqa, args.bioasq, args.out)
        print(f"corpus {args.corpus}: {report['corpus_documents']:,} documents")
        for key, r in report.items():
            if isinstance(r, dict):
                print(f"  {key}: {r['overlapping']} of {r['items']} items overlap the corpus")
        print(f"wrote {args.out}")
        return 0

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.prepare_data", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True,
                   help="comma-separated files/globs/dirs, local or URLs (gs://..., s3://...): PubMed XML, PMC JATS, "
                        "PMC's Cloud Service (s3://pmc-oa-opendata/, read from its inventory; or globs of its "
                        "metadata/PMC*.json), PMC bulk packages (.tar.gz), PubTator, JSONL")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--eval_fraction", type=float, default=0.005, help="share of documents (by id hash) held out")
    p.add_argument("--rows_per_shard", type=int, default=65536)
    p.add_argument("--format", default="auto", choices=("auto",) + readers.FORMATS)
    p.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--work_unit_mb", type=float, default=64,
                   help="input files are grouped into work units of up to this many MB (one larger file is a unit "
                        "of its own): a unit is one task and one cache, so many small files cost few tasks")
    p.add_argument("--pmc_license", default=",".join(pmc_cloud.DEFAULT_LICENSES),
                   help="PMC Cloud Service licence subsets to keep, comma-separated: oa_comm (CC0, CC BY, CC BY-SA, "
                        "CC BY-ND: commercial use allowed; the default), oa_noncomm, phe_timebound, or all")
    p.add_argument("--pmc_withdrawn", default=None,
                   help="a file (or URL) naming PMCIDs to leave out, e.g. NLM's list of PHE articles whose licence "
                        "expired: for mirrors or inventories older than NLM's removal of them")
    p.add_argument("--no_dedupe_text", dest="dedupe_text", action="store_false",
                   help="keep documents whose normalized text an earlier document already has")
    p.add_argument("--near_dedupe", action="store_true",
                   help="also drop near-duplicates (MinHash over word 5-grams, 16 bands of 8; needs the [curation] extra)")
    p.add_argument("--detect_language", action="store_true",
                   help="also drop documents a language detector (lingua) finds not English, for records whose "
                        "language fields are missing or wrong (needs the [curation] extra)")
    p.add_argument("--fetch_concurrency", type=int, default=readers.FETCH_CONCURRENCY,
                   help="PMC Cloud Service objects fetched at once per work unit")
    p.add_argument("--work_dir", default=None,
                   help="the work folder (tokenized units, for resuming); default OUT.work, beside OUT")
    p.add_argument("--keep_work", action="store_true",
                   help="keep the tokenized units after success: a later run with the same --work_dir over a newer "
                        "PMC listing fetches and tokenizes only the articles added or revised")
    p.add_argument("--runner", default=None,
                   help="run on Apache Beam with this runner (DirectRunner, DataflowRunner, FlinkRunner, ...); "
                        "every other Beam pipeline option (--direct_num_workers=N, --project, ...) is passed through. "
                        "Without --runner: one local process. Needs pip install -e .[beam]")
    args, beam_args = p.parse_known_args(argv)
    if beam_args and args.runner is None:
        p.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need --runner)")
    try:
        m = prepare(args.input.split(","), args.tokenizer, args.out, seq_len=args.seq_len,
                    eval_fraction=args.eval_fraction, rows_per_shard=args.rows_per_shard, on_error=args.on_error,
                    fmt=args.format, overwrite=args.overwrite, unit_bytes=int(args.work_unit_mb * 2**20),
                    beam_args=None if args.runner is None else [f"--runner={args.runner}", *beam_args],
                    pmc_license=args.pmc_license, dedupe_text=args.dedupe_text,
                    fetch_concurrency=args.fetch_concurrency, work=args.work_dir, keep_work=args.keep_work,
                    near_dedupe=args.near_dedupe, detect_language=args.detect_language,
                    pmc_withdrawn=args.pmc_withdrawn)
    except (errors.DataError, FileExistsError, FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = m["read_stats"]
    print(f"[prepare] {s['documents']:,} documents from {s['files']} files ({s['duplicates']} replaced by a later record, "
          f"{s['deleted']} deleted, {s['empty']} empty, {s['errors_skipped']} skipped, {s['non_utf8_lines']} non-UTF-8 lines) in {m['seconds']}s")
    for split, info in m["splits"].items():
        print(f"[prepare] {split}: {info['documents']:,} documents -> {info['rows']:,} rows of {m['row_len']} tokens "
              f"in {len(info['shards'])} shards ({info['dropped_tokens']} tail tokens dropped)")
    print(f"[prepare] wrote {args.out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
