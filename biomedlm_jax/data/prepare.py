"""Corpus preparation behind `python -m biomedlm_jax.prepare_data`: the job description
(`make_job`), the local run of its stages (`run_local`, `prepare`) and the contamination audit of a
prepared corpus against PubMedQA / BioASQ ids (`audit`). The Beam run is data/prepare_beam.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import prepare_stages as stages
from biomedlm_jax.data import readers, shards


def work_dir(out: str) -> str:
    """Where a run keeps its tokenized input files until it finishes: a rerun after a kill resumes there."""
    return f"{out.rstrip('/')}.work"



def make_job(inputs: Sequence[str], tokenizer_dir: str, out: str, *, seq_len: int = 1024,
             eval_fraction: float = 0.005, rows_per_shard: int = 65536, on_error: str = "raise",
             fmt: str = "auto", batch_docs: int = 512) -> stages.Job:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose raise or skip")
    files = readers.expand_files(list(inputs))
    return stages.Job(files=tuple(os.path.abspath(f) for f in files), tokenizer=os.path.abspath(tokenizer_dir),
                      work=work_dir(os.path.abspath(out)), seq_len=seq_len, eval_fraction=eval_fraction,
                      rows_per_shard=rows_per_shard, fmt=fmt, on_error=on_error, batch_docs=batch_docs)



def run_local(job: stages.Job, progress: bool = True) -> tuple[dict, int]:
    """The stages in one process, in order: (layout, number of input files tokenized, not reused)."""
    t0 = last = time.time()
    done = 0
    for i in range(len(job.files)):
        done += stages.tokenize_file(job, i)
        if progress and (time.time() - last > 5 or i + 1 == len(job.files)):
            last = time.time()
            print(f"[prepare] tokenized {i + 1:,}/{len(job.files):,} files ({i + 1 - done:,} reused) "
                  f"in {last - t0:.0f}s", file=sys.stderr, flush=True)
    winners = stages.resolve_all(e for i in range(len(job.files)) for e in stages.record_events(job, i))
    lay = stages.layout(job, [stages.plan_file(job, i, winners.get(i, [])) for i in range(len(job.files))])
    for task in stages.shard_tasks(lay):
        stages.write_shard(job, task, lay)
    return lay, done



def prepare(inputs: Sequence[str], tokenizer_dir: str, out: str, *, seq_len: int = 1024,
            eval_fraction: float = 0.005, rows_per_shard: int = 65536, on_error: str = "raise",
            fmt: str = "auto", overwrite: bool = False, batch_docs: int = 512, progress: bool = True,
            beam_args: Optional[Sequence[str]] = None) -> dict:
    """Tokenize and pack `inputs` into `out` (a local folder or an object-store URL, gs://...); returns
    the manifest. With `beam_args` (Beam pipeline options, e.g. ["--runner=DirectRunner",
    "--direct_num_workers=2"]) the stages run as an Apache Beam pipeline; the output is the same.

    The tokenized input files are kept in `OUT.work/` until the output is complete, so a run that is
    killed or fails resumes where it stopped; `OUT` itself appears only when complete."""
    if paths.is_remote(out):  # built in a local folder, then uploaded with the manifest last
        if paths.exists(out) and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="biomedlm_jax-prepare-") as local:
            manifest = prepare(inputs, tokenizer_dir, os.path.join(local, "out"), seq_len=seq_len,
                               eval_fraction=eval_fraction, rows_per_shard=rows_per_shard, on_error=on_error,
                               fmt=fmt, batch_docs=batch_docs, progress=progress, beam_args=beam_args)
            paths.rmtree(out)
            paths.upload(os.path.join(local, "out"), out)
        return manifest
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    job = make_job(inputs, tokenizer_dir, out, seq_len=seq_len, eval_fraction=eval_fraction,
                   rows_per_shard=rows_per_shard, on_error=on_error, fmt=fmt, batch_docs=batch_docs)
    t0 = time.time()
    for stale in ("out", "plans", "shards"):  # everything but the tokenized files is redone
        shutil.rmtree(os.path.join(job.work, stale), ignore_errors=True)
    # A failure in here keeps OUT.work, so that a rerun resumes
    if beam_args is not None:
        from biomedlm_jax.data import prepare_beam  # needs the [beam] extra

        lay, tokenized = prepare_beam.run(job, beam_args)
    else:
        lay, tokenized = run_local(job, progress)
    try:
        stages.check_rows(job, lay)
    except errors.DataError:  # complete but too small: nothing to resume
        shutil.rmtree(job.work, ignore_errors=True)
        raise
    manifest = stages.finish(job, lay, seconds=time.time() - t0)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(job.out, out)
    shutil.rmtree(job.work, ignore_errors=True)
    if progress:
        print(f"[prepare] {tokenized} of {len(job.files)} input files tokenized, "
              f"{len(job.files) - tokenized} reused from an interrupted run", file=sys.stderr)
    return manifest



_PMID_URL = re.compile(r"(\d+)\s*$")



def corpus_ids(corpus: str) -> set[str]:
    manifest = shards.read_manifest(corpus)
    ids: set[str] = set()
    for info in manifest["splits"].values():
        for line in paths.read_text(paths.join(corpus, info["docs_index"])).splitlines():
            ids.add(line.split("\t", 1)[0])
    return ids



def pubmedqa_ids(path: str) -> list[str]:
    """PubMedQA's JSON (ori_pqal.json, test_ground_truth.json, ...) is keyed by PMID."""
    data = readers.read_json(path)
    if not isinstance(data, dict):
        raise errors.DataError(f"{path}: expected a JSON object keyed by PMID")
    return [str(k) for k in data]



def bioasq_ids(path: str) -> dict[str, list[str]]:
    """{question id: [PMIDs of its documents and snippets]} from a BioASQ JSON file."""
    data = readers.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise errors.DataError(f"{path}: expected {{\"questions\": [...]}} (BioASQ format)")
    out = {}
    for i, q in enumerate(data["questions"]):
        urls = list(q.get("documents", [])) + [s.get("document", "") for s in q.get("snippets", [])]
        pmids = sorted({m.group(1) for u in urls if (m := _PMID_URL.search(str(u)))})
        out[str(q.get("id", i))] = pmids
    return out



def audit(corpus: str, pubmedqa: Sequence[str] = (), bioasq: Sequence[str] = (), out: Optional[str] = None) -> dict:
    ids = corpus_ids(corpus)
    report: dict = {"corpus": corpus, "corpus_documents": len(ids)}
    for path in pubmedqa:
        items = pubmedqa_ids(path)
        hits = [i for i in items if i in ids]
        report[f"pubmedqa:{os.path.basename(path)}"] = {"items": len(items), "overlapping": len(hits), "ids": hits}
    for path in bioasq:
        questions = bioasq_ids(path)
        hit_q = {q: [p for p in pmids if p in ids] for q, pmids in questions.items()}
        hit_q = {q: p for q, p in hit_q.items() if p}
        report[f"bioasq:{os.path.basename(path)}"] = {
            "items": len(questions), "overlapping": len(hit_q), "ids": sorted(hit_q), "pmids": hit_q
        }
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report
