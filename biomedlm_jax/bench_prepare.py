"""Corpus-preparation benchmark: throughput per worker, scaling over workers, peak memory.

    python -m biomedlm_jax.bench_prepare --tokenizer=DIR --source=abstracts.jsonl --scale=10 \
        [--formats=jsonl,pubmed_xml,jats] [--workers=1,2] [--out=bench_prepare.jsonl]

From `--source` (JSONL with pmid/title/abstract, e.g. the shipped data/pubmed_abstracts/abstracts.jsonl)
it writes a synthetic corpus `--scale` times larger in each format (each copy with its own ids):
- `jsonl`: 8 files;
- `pubmed_xml`: gzipped baseline files of 2,000 citations, abstracts in labelled sections;
- `jats`: one PMC-style full-text article per file (title, abstract, a body of six sections built from
  other abstracts, plus references, a table and a figure that the reader skips), as PMC ships them.

Then it runs `python -m biomedlm_jax.prepare_data` on it as a user would: locally (one process) and on
Beam's DirectRunner with each `--workers` count, and reports per run the input MB/s, tokens/s, wall
time and the peak resident memory of the whole process tree (launcher plus workers, sampled every
50 ms). Last it iterates one epoch of the prepared corpus with the trainer's `BatchIterator` in a fresh
process and reports that reader's peak memory. Rows are printed and appended to `--out` as JSON lines.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from xml.sax.saxutils import escape

FORMATS = ("jsonl", "pubmed_xml", "jats")


def _records(source: str, scale: int):
    base = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    for k in range(scale):
        for j, rec in enumerate(base):
            yield k, j, {"pmid": f"{k + 1}{int(rec['pmid']):09d}", "title": rec.get("title", ""),
                         "abstract": rec.get("abstract", "")}, base


def synthesize(source: str, out: str, fmt: str, scale: int) -> list[str]:
    """Writes the synthetic corpus for `fmt` under `out`; returns its files."""
    os.makedirs(out, exist_ok=True)
    files: list[str] = []
    if fmt == "jsonl":
        handles = [open(os.path.join(out, f"part-{i}.jsonl"), "w", encoding="utf-8") for i in range(8)]
        for n, (_, _, rec, _) in enumerate(_records(source, scale)):
            handles[n % 8].write(json.dumps(rec) + "\n")
        for h in handles:
            h.close()
            files.append(h.name)
    elif fmt == "pubmed_xml":
        batch: list[str] = []

        def flush():
            path = os.path.join(out, f"pubmed26n{len(files) + 1:04d}.xml.gz")
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write('<?xml version="1.0"?>\n<PubmedArticleSet>\n' + "\n".join(batch) + "\n</PubmedArticleSet>\n")
            files.append(path)
            batch.clear()

        for _, _, rec, _ in _records(source, scale):
            sentences = rec["abstract"].split(". ")
            half = max(len(sentences) // 2, 1)
            sections = (("BACKGROUND", ". ".join(sentences[:half])), ("RESULTS", ". ".join(sentences[half:])))
            abstract = "".join(f'<AbstractText Label="{lab}">{escape(t)}</AbstractText>' for lab, t in sections if t)
            batch.append(f'<PubmedArticle><MedlineCitation Status="MEDLINE"><PMID Version="1">{rec["pmid"]}</PMID>'
                         f'<Article><ArticleTitle>{escape(rec["title"])}</ArticleTitle><Abstract>{abstract}</Abstract>'
                         f'</Article></MedlineCitation></PubmedArticle>')
            if len(batch) == 2000:
                flush()
        if batch:
            flush()
    elif fmt == "jats":
        for k, j, rec, base in _records(source, scale):
            body = "".join(
                f"<sec><title>Section {s + 1}</title><p>{escape(base[(j + 7 * s + 1) % len(base)]['abstract'])}"
                f"<xref ref-type=\"bibr\" rid=\"r{s}\">{s}</xref></p></sec>" for s in range(6))
            path = os.path.join(out, f"PMC{rec['pmid']}.nxml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(f'<?xml version="1.0"?>\n<article><front><article-meta>'
                        f'<article-id pub-id-type="pmc">{rec["pmid"]}</article-id>'
                        f'<title-group><article-title>{escape(rec["title"])}</article-title></title-group>'
                        f'<abstract><p>{escape(rec["abstract"])}</p></abstract></article-meta></front>'
                        f'<body>{body}<table-wrap><table><tr><td>1</td></tr></table></table-wrap>'
                        f'<fig><caption><p>A figure.</p></caption></fig></body>'
                        f'<back><ref-list><ref id="r0"><mixed-citation>A reference.</mixed-citation></ref></ref-list>'
                        f'</back></article>\n')
            files.append(path)
    else:
        raise ValueError(f"format {fmt!r}: choose from {FORMATS}")
    return files


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def run_measured(cmd: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak tree RSS in bytes, the finished process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.join()
    return wall, peak[0], subprocess.CompletedProcess(cmd, proc.returncode, out, err)


READ_EPOCH = """
import sys, time
from biomedlm_jax import input_pipeline as ip
rows = ip.load_prepared(sys.argv[1], "train").rows
it = ip.BatchIterator(rows, int(sys.argv[2]), seed=0)
n = ip.num_rows(rows) // int(sys.argv[2])
t0 = time.perf_counter()
for _ in range(n):
    next(it)
print(n, time.perf_counter() - t0)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.bench_prepare", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", required=True, help="JSONL with pmid, title, abstract")
    p.add_argument("--scale", type=int, default=10, help="copies of the source in the synthetic corpus")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--workers", default="1,2", help="DirectRunner worker counts to run (0: the local run only)")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32, help="global batch of the reader epoch")
    p.add_argument("--workdir", default=None, help="where the corpora go (default: a temporary folder)")
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
                       *extra]
                wall, peak, r = run_measured(cmd)
                if r.returncode:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
                m = json.load(open(os.path.join(out, "manifest.json")))
                tokens = sum(s["tokens"] + s["dropped_tokens"] for s in m["splits"].values())
                rows.append({"kind": "prepare", "format": fmt, "engine": engine, "files": len(files),
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
