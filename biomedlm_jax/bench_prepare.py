"""Corpus-preparation benchmark: throughput per worker, scaling over workers, peak memory.

    python -m biomedlm_jax.bench_prepare --tokenizer=DIR --source=abstracts.jsonl --scale=10 \
        [--formats=jsonl,pubmed_xml,jats,pmc_tar] [--workers=1,2] [--work_unit_mb=64] [--out=bench_prepare.jsonl]
    python -m biomedlm_jax.bench_prepare shard-memory --input=... --tokenizer=DIR [--rows_per_shard=65536]
    python -m biomedlm_jax.bench_prepare remote-read --corpus=PREPARED_DIR [--latency_ms=20] [--reader_path=CHECKOUT]
    python -m biomedlm_jax.bench_prepare pmc-fetch --tokenizer=DIR --source=abstracts.jsonl [--articles=400] \
        [--latency_ms=20,50] [--concurrency=1,32]      (benchmarks/pmc_fetch.py; needs moto, the [test] extra)
    python -m biomedlm_jax.bench_prepare curation-cost --tokenizer=DIR --source=abstracts.jsonl [--scale=2]

From `--source` (JSONL with pmid/title/abstract, e.g. the shipped data/pubmed_abstracts/abstracts.jsonl)
it writes a synthetic corpus `--scale` times larger in each format (each copy with its own ids):
- `jsonl`: 8 files;
- `pubmed_xml`: gzipped baseline files of 2,000 citations, abstracts in labelled sections;
- `jats`: one PMC-style full-text article per file (title, abstract, a body of six sections built from
  other abstracts, plus references, a table and a figure that the reader skips), as PMC's per-article
  service ships them;
- `pmc_tar`: the same articles in bulk packages of 2,000 (`.tar.gz`), as PMC's bulk service ships them.

Then it runs `python -m biomedlm_jax.prepare_data` on it as a user would: locally (one process) and on
Beam's DirectRunner with each `--workers` count, and reports per run the input MB/s, tokens/s, wall
time and the peak resident memory of the whole process tree (launcher plus workers, sampled every
50 ms). Last it iterates one epoch of the prepared corpus with the trainer's `BatchIterator` in a fresh
process and reports that reader's peak memory. Rows are printed and appended to `--out` as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from biomedlm_jax.benchmarks.prepare import FORMATS, READ_EPOCH, run_measured, synthesize


def remote_read(argv) -> int:
    from biomedlm_jax.benchmarks import remote_read as rr

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare remote-read", description=rr.__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a prepare_data output folder (local), uploaded to the fake server")
    p.add_argument("--latency_ms", type=float, default=20, help="added to every request the fake server answers")
    p.add_argument("--batch", type=int, default=32, help="global batch (rows), split over --hosts")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--reader_path", default=None, help="another checkout whose reader to measure")
    p.add_argument("--out", default="bench_prepare.jsonl")
    args = p.parse_args(argv)
    row = rr.run(args.corpus, args.latency_ms, args.batch, args.batches, args.hosts, args.reader_path)
    print(json.dumps(row), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def shard_memory(argv) -> int:
    from biomedlm_jax.benchmarks.prepare import shard_write_peak

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare shard-memory",
                                description="peak memory allocated while one shard is written, against its size")
    p.add_argument("--input", required=True, help="comma-separated inputs, as prepare_data takes them")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--rows_per_shard", type=int, default=65536)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--out", default="bench_prepare.jsonl")
    args = p.parse_args(argv)
    row = shard_write_peak(args.input.split(","), args.tokenizer, args.rows_per_shard, args.seq_len)
    print(json.dumps(row), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def pmc_fetch(argv) -> int:
    from biomedlm_jax.benchmarks import pmc_fetch as pf

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare pmc-fetch", description=pf.__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", required=True, help="JSONL with pmid, title, abstract (the synthetic articles' text)")
    p.add_argument("--articles", type=int, default=400)
    p.add_argument("--latency_ms", default="20,50", help="added to every read the fake server answers")
    p.add_argument("--concurrency", default="1,32", help="--fetch_concurrency values to run")
    p.add_argument("--servers", default="minimal,moto",
                   help="fake S3 servers: minimal (benchmarks/pmc_fetch.py, thousands of requests/s) and/or moto")
    p.add_argument("--out", default="bench_prepare.jsonl")
    args = p.parse_args(argv)
    rows = pf.run(args.tokenizer, args.source, args.articles, [float(x) for x in args.latency_ms.split(",")],
                  [int(x) for x in args.concurrency.split(",")], tuple(args.servers.split(",")))
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


def curation_cost(argv) -> int:
    """Seconds and documents per second of prepare_data with each optional filter, against none."""
    import time

    from biomedlm_jax.benchmarks.prepare import synthesize
    from biomedlm_jax.data import prepare

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare curation-cost",
                                description="the cost of --near_dedupe and --detect_language (the [curation] extra)")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", required=True, help="JSONL with pmid, title, abstract")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--formats", default="jsonl,jats")
    p.add_argument("--out", default="bench_prepare.jsonl")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        for fmt in args.formats.split(","):
            folder = os.path.join(tmp, fmt)
            synthesize(args.source, folder, fmt, args.scale)
            for name, flags in (("none", {}), ("near_dedupe", {"near_dedupe": True}),
                                ("detect_language", {"detect_language": True})):
                t0 = time.perf_counter()
                m = prepare.prepare([folder], args.tokenizer, os.path.join(tmp, f"out-{fmt}-{name}"), seq_len=1024,
                                    progress=False, **flags)
                wall = time.perf_counter() - t0
                docs = m["read_stats"]["documents"] + m["read_stats"]["duplicate_text"] + m["read_stats"]["language"]
                rows.append({"kind": "curation_cost", "format": fmt, "filter": name, "documents": docs,
                             "seconds": round(wall, 2), "docs_per_s": round(docs / wall, 1),
                             "dropped": {k: m["card"]["dropped"][k] for k in ("duplicate_text", "language")}})
                print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["curation-cost"]:
        return curation_cost(argv[1:])
    if argv[:1] == ["remote-read"]:
        return remote_read(argv[1:])
    if argv[:1] == ["pmc-fetch"]:
        return pmc_fetch(argv[1:])
    if argv[:1] == ["shard-memory"]:
        return shard_memory(argv[1:])
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", required=True, help="JSONL with pmid, title, abstract")
    p.add_argument("--scale", type=int, default=10, help="copies of the source in the synthetic corpus")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--workers", default="1,2", help="DirectRunner worker counts to run (0: the local run only)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32, help="global batch of the reader epoch")
    p.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
    p.add_argument("--work_unit_mb", type=float, default=None, help="passed to prepare_data (its default if not given)")
    p.add_argument("--out", default="bench_prepare.jsonl")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = args.workdir or tmp
        for fmt in args.formats.split(","):
            files = synthesize(args.source, os.path.join(root, fmt, "input"), fmt, args.scale)
            in_bytes = sum(os.path.getsize(f) for f in files)
            runs = [("local", [])] + [(f"beam-{w}", ["--runner=DirectRunner", f"--direct_num_workers={w}"])
                                      for w in workers]
            for engine, extra in runs:
                out = os.path.join(root, fmt, engine)
                cmd = [sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={os.path.join(root, fmt, 'input')}",
                       f"--tokenizer={args.tokenizer}", f"--out={out}", f"--seq_len={args.seq_len}", "--overwrite",
                       *([f"--work_unit_mb={args.work_unit_mb}"] if args.work_unit_mb is not None else []), *extra]
                wall, peak, r = run_measured(cmd)
                if r.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
                m = json.load(open(os.path.join(out, "manifest.json")))
                tokens = sum(s["tokens"] + s["dropped_tokens"] for s in m["splits"].values())
                rows.append({"kind": "prepare", "format": fmt, "engine": engine, "files": len(files),
                             "work_unit_mb": args.work_unit_mb,
                             "documents": m["read_stats"]["documents"], "input_mb": round(in_bytes / 1e6, 2),
                             "tokens": tokens, "seconds": round(wall, 2), "input_mb_per_s": round(in_bytes / 1e6 / wall, 3),
                             "tokens_per_s": round(tokens / wall), "peak_rss_mb": round(peak / 2**20)})
                print(json.dumps(rows[-1]), flush=True)
            prepared = os.path.join(root, fmt, "local")
            wall, peak, r = run_measured([sys.executable, "-c", READ_EPOCH, prepared, str(args.batch)])
            if r.returncode:
                raise SystemExit(f"reading {prepared} failed:\n{r.stderr[-3000:]}")
            batches, seconds = r.stdout.split()
            corpus_mb = sum(os.path.getsize(os.path.join(prepared, f)) for f in os.listdir(prepared)
                            if f.endswith(".npy")) / 1e6
            rows.append({"kind": "prepare_reader", "format": fmt, "batches": int(batches), "batch": args.batch,
                         "corpus_mb": round(corpus_mb, 1), "epoch_seconds": round(float(seconds), 2),
                         "peak_rss_mb": round(peak / 2**20)})
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
