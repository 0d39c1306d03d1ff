"""The corpus-preparation benchmark behind `python -m biomedlm_jax.bench_prepare`: synthetic corpora
in each input format (`synthesize`), runs of `prepare_data` measured for wall time and the peak memory
of the whole process tree (`run_measured`)."""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from xml.sax.saxutils import escape

FORMATS = ("jsonl", "pubmed_xml", "jats", "pmc_tar")



def _records(source: str, scale: int):
    base = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
    for k in range(scale):
        for j, rec in enumerate(base):
            # each copy's title says which copy it is, so that prepare_data's exact de-duplication (by
            # text) keeps every copy, as it would distinct articles
            title = rec.get("title", "") if k == 0 else f"{rec.get('title', '')} (copy {k + 1})"
            yield k, j, {"pmid": f"{k + 1}{int(rec['pmid']):09d}", "title": title,
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
    elif fmt in ("jats", "pmc_tar"):
        tar, members = None, 0
        for k, j, rec, base in _records(source, scale):
            body = "".join(
                f"<sec><title>Section {s + 1}</title><p>{escape(base[(j + 7 * s + 1) % len(base)]['abstract'])}"
                f"<xref ref-type=\"bibr\" rid=\"r{s}\">{s}</xref></p></sec>" for s in range(6))
            article = (f'<?xml version="1.0"?>\n<article><front><article-meta>'
                       f'<article-id pub-id-type="pmc">{rec["pmid"]}</article-id>'
                       f'<title-group><article-title>{escape(rec["title"])}</article-title></title-group>'
                       f'<abstract><p>{escape(rec["abstract"])}</p></abstract></article-meta></front>'
                       f'<body>{body}<table-wrap><table><tr><td>1</td></tr></table></table-wrap>'
                       f'<fig><caption><p>A figure.</p></caption></fig></body>'
                       f'<back><ref-list><ref id="r0"><mixed-citation>A reference.</mixed-citation></ref></ref-list>'
                       f'</back></article>\n')
            if fmt == "jats":
                path = os.path.join(out, f"PMC{rec['pmid']}.nxml")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(article)
                files.append(path)
                continue
            if tar is None or members == 2000:  # PMC's bulk packages: thousands of articles per .tar.gz
                if tar is not None:
                    tar.close()
                files.append(os.path.join(out, f"oa_comm_xml.PMC{len(files):03d}xxxxxx.baseline.tar.gz"))
                tar, members = tarfile.open(files[-1], "w:gz"), 0
            data = article.encode("utf-8")
            info = tarfile.TarInfo(f"PMC{rec['pmid']}/PMC{rec['pmid']}.nxml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            members += 1
        if tar is not None:
            tar.close()
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
from biomedlm_jax.data import input_pipeline as ip
from biomedlm_jax.data.shards import load_prepared
rows = load_prepared(sys.argv[1], "train").rows
it = ip.BatchIterator(rows, int(sys.argv[2]), seed=0)
n = ip.num_rows(rows) // int(sys.argv[2])
t0 = time.perf_counter()
for _ in range(n):
    next(it)
print(n, time.perf_counter() - t0)
"""



def shard_write_peak(inputs: list[str], tokenizer: str, rows_per_shard: int, seq_len: int = 1024) -> dict:
    """Runs the preparation stages up to the layout in a temporary work folder, then writes the first
    training shard under `tracemalloc` (which sees numpy's buffers and the bytes read): the peak memory
    allocated while one shard is written, against the shard's size."""
    import tempfile
    import tracemalloc

    from biomedlm_jax.data import prepare
    from biomedlm_jax.data import prepare_stages as stages

    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        job = prepare.make_job(inputs, tokenizer, os.path.join(tmp, "out"), seq_len=seq_len,
                               rows_per_shard=rows_per_shard)
        for u in range(job.units):
            stages.tokenize_unit(job, u)
        winners = stages.resolve_all(e for u in range(job.units) for e in stages.record_events(job, u))
        lay = stages.layout(job, [stages.plan_unit(job, u, winners.get(u, [])) for u in range(job.units)])
        tracemalloc.start()
        t0 = time.perf_counter()
        meta = stages.write_shard(job, ("train", 0), lay)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    shard = meta["rows"] * job.row_len * job.dtype.itemsize
    return {"kind": "shard_write", "rows": meta["rows"], "shard_mb": round(shard / 1e6, 2),
            "peak_mb": round(peak / 1e6, 2), "peak_over_shard": round(peak / shard, 3),
            "read_batch_mb": stages.READ_BYTES / 1e6, "seconds": round(seconds, 2), "units": job.units}
