"""Corpus preparation behind `python -m biomedlm_jax.prepare_data`: the job description
(`make_job`), the local run of its stages (`run_local`, `prepare`) and the contamination audit of a
prepared corpus against PubMedQA / BioASQ ids (`audit`). The Beam run is data/prepare_beam.py."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Optional, Sequence

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import prepare_stages as stages
from biomedlm_jax.data import pmc_cloud, readers, shards


def work_dir(out: str) -> str:
    """Where a run keeps its tokenized inputs until it finishes, beside the output (on the same store
    for a gs:// output): a rerun after a kill resumes there."""
    return f"{out.rstrip('/')}.work"


# Runners whose workers run elsewhere: every path must be a URL they can reach
CLUSTER_RUNNERS = ("DataflowRunner", "FlinkRunner", "SparkRunner", "PortableRunner")
# Options by which a runner's workers get this package (the standard ways)
PACKAGING = ("--setup_file", "--sdk_container_image", "--extra_package", "--extra_packages",
             "--worker_harness_container_image")


def _options(beam_args: Sequence[str]) -> dict:
    out = {}
    for a in beam_args:
        name, _, value = a.partition("=")
        out[name] = value
    return out


def check_runner(inputs: Sequence[str], tokenizer_dir: str, out: str, beam_args: Sequence[str],
                 work: Optional[str] = None) -> None:
    """Refuses a cluster runner (or workers in an external / docker environment) while any path is
    local, naming the flag, and a cluster runner without a way to ship this package to its workers."""
    opts = _options(beam_args)
    runner = opts.get("--runner", "").rsplit(".", 1)[-1]
    remote_workers = runner in CLUSTER_RUNNERS or opts.get("--environment_type", "").upper() in ("EXTERNAL", "DOCKER")
    if not remote_workers:
        return
    where = f"--runner={runner}" if runner in CLUSTER_RUNNERS else f"--environment_type={opts['--environment_type']}"
    for flag, values in (("--input", inputs), ("--tokenizer", [tokenizer_dir]), ("--out", [out]),
                         ("--work_dir", [work] if work else [])):
        local = [v for v in values if not paths.is_remote(v)]
        if local:
            raise ValueError(f"{flag}={local[0]} is a local path, but with {where} the workers run on other "
                             "machines and cannot read it: put it on storage every worker reaches (gs://...)")
    if runner in CLUSTER_RUNNERS and not any(o in opts for o in PACKAGING):
        raise ValueError(f"with {where} the workers must install biomedlm_jax: pass --setup_file=./setup.py "
                         "(from the repository root), or --sdk_container_image with it installed")


def make_job(inputs: Sequence[str], tokenizer_dir: str, out: str, *, seq_len: int = 1024,
             eval_fraction: float = 0.005, rows_per_shard: int = 65536, on_error: str = "raise",
             fmt: str = "auto", batch_docs: int = 512, unit_bytes: int = stages.UNIT_BYTES,
             pmc_license: str | Sequence[str] = pmc_cloud.DEFAULT_LICENSES, dedupe_text: bool = True,
             fetch_concurrency: int = readers.FETCH_CONCURRENCY, work: Optional[str] = None,
             near_dedupe: bool = False, detect_language: bool = False,
             pmc_withdrawn: Optional[str] = None) -> stages.Job:
    """Lists the inputs once (sizes and versions from the listing), groups them into work units and
    writes the list into WORK; the job carries only its path and digest."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose raise or skip")
    licenses = pmc_cloud.parse_licenses(pmc_license)
    files, listed = readers.list_inputs(list(inputs), pmc_cloud.read_withdrawn(pmc_withdrawn) if pmc_withdrawn else None)
    units = stages.group_units(files, unit_bytes)
    tokenizer_dir = paths.resolve(tokenizer_dir)
    tok = stages.load_tokenizer(tokenizer_dir)
    work = paths.resolve(work) if work else work_dir(paths.resolve(out))
    paths.makedirs(work)
    listing = stages.write_listing(work, files, units)
    return stages.Job(inputs=tuple(paths.resolve(i) if os.path.exists(i) else i for i in inputs), listing=listing,
                      units=(units[-1] + 1) if units else 0, files=len(files),
                      tokenizer=tokenizer_dir, tokenizer_sha256=shards.tokenizer_sha256(tok), work=work,
                      seq_len=seq_len, eval_fraction=eval_fraction, rows_per_shard=rows_per_shard, fmt=fmt,
                      on_error=on_error, batch_docs=batch_docs, vocab_size=tok.get_vocab_size(),
                      licenses=licenses, older_versions=listed["older_version"], withdrawn=listed["withdrawn"],
                      dedupe_text=dedupe_text,
                      fetch_concurrency=fetch_concurrency, out_dir=paths.resolve(out),
                      pmc_block_ids=pmc_cloud.block_ids(unit_bytes), near_dedupe=near_dedupe,
                      detect_language=detect_language)


def run_local(job: stages.Job, progress: bool = True) -> tuple[dict, int]:
    """The stages in one process, in order: (layout, number of work units tokenized, not reused)."""
    t0 = last = time.time()
    done = 0
    for u in range(job.units):
        done += stages.tokenize_unit(job, u)
        if progress and (time.time() - last > 5 or u + 1 == job.units):
            last = time.time()
            print(f"[prepare] tokenized {u + 1:,}/{job.units:,} work units ({u + 1 - done:,} reused) "
                  f"in {last - t0:.0f}s", file=sys.stderr, flush=True)
    winners = stages.resolve_all(e for u in range(job.units) for e in stages.record_events(job, u))
    dups = stages.duplicates_all(winners)
    lay = stages.layout(job, [stages.plan_unit(job, u, winners.get(u, []), dups.get(u, ()))
                              for u in range(job.units)])
    for task in stages.shard_tasks(lay):
        stages.write_shard(job, task, lay)
    return lay, done


def prepare(inputs: Sequence[str], tokenizer_dir: str, out: str, *, seq_len: int = 1024,
            eval_fraction: float = 0.005, rows_per_shard: int = 65536, on_error: str = "raise",
            fmt: str = "auto", overwrite: bool = False, batch_docs: int = 512, progress: bool = True,
            unit_bytes: int = stages.UNIT_BYTES, beam_args: Optional[Sequence[str]] = None,
            pmc_license: str | Sequence[str] = pmc_cloud.DEFAULT_LICENSES, dedupe_text: bool = True,
            fetch_concurrency: int = readers.FETCH_CONCURRENCY, work: Optional[str] = None,
            keep_work: bool = False, near_dedupe: bool = False, detect_language: bool = False,
            pmc_withdrawn: Optional[str] = None) -> dict:
    """Tokenize and pack `inputs` into `out`; returns the manifest. Every path may be local or a URL
    (gs://..., s3://...). With `beam_args` (Beam pipeline options, e.g. ["--runner=DirectRunner",
    "--direct_num_workers=2"]) the stages run as an Apache Beam pipeline; the output is the same.

    The tokenized inputs are kept in `OUT.work/` (beside OUT, on the same store) until the output is
    complete, so a run that is killed or fails resumes where it stopped. Workers write the shards
    straight into OUT and the launcher writes `manifest.json` last: that is the commit (readers take
    only a folder with a manifest), and no shard is ever copied or moved. An OUT without a manifest
    beside its OUT.work is an interrupted run's, redone by the next run; any other existing OUT is
    kept unless `overwrite`, which removes its manifest first.

    `work` puts the work folder elsewhere than OUT.work; with `keep_work` its tokenized units stay after
    success, so that a later run over a newer PMC listing (with the same `work`) fetches and tokenizes
    only the articles that changed."""
    if beam_args is not None:
        check_runner(inputs, tokenizer_dir, out, beam_args, work)
    out = paths.resolve(out)
    work = paths.resolve(work) if work else work_dir(out)
    manifest_path = paths.join(out, shards.MANIFEST)
    if paths.exists(out):
        if paths.exists(manifest_path) or not paths.exists(work):
            if not overwrite:
                raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
            if paths.exists(manifest_path):
                paths.Path(manifest_path).unlink()  # first: from here on no reader takes OUT as complete
        paths.rmtree(out)
    job = make_job(inputs, tokenizer_dir, out, seq_len=seq_len, eval_fraction=eval_fraction,
                   rows_per_shard=rows_per_shard, on_error=on_error, fmt=fmt, batch_docs=batch_docs,
                   unit_bytes=unit_bytes, pmc_license=pmc_license, dedupe_text=dedupe_text,
                   fetch_concurrency=fetch_concurrency, work=work, near_dedupe=near_dedupe,
                   detect_language=detect_language, pmc_withdrawn=pmc_withdrawn)
    t0 = time.time()
    for stale in ("out", "plans", "shards"):  # everything but the tokenized units is redone
        paths.rmtree(paths.join(job.work, stale))

    def give_up():  # nothing to resume: no work folder, and no OUT that a rerun would refuse
        paths.rmtree(job.work)
        paths.rmtree(out)

    # A failure in here keeps OUT.work, so that a rerun resumes (unless nothing was tokenized yet)
    try:
        if beam_args is not None:
            from biomedlm_jax.data import prepare_beam  # needs the [beam] extra

            lay, tokenized = prepare_beam.run(job, beam_args)
        else:
            lay, tokenized = run_local(job, progress)
    except BaseException:
        units = paths.join(job.work, "units")
        if not (paths.exists(units) and any(n.endswith(".npz") for n in paths.listdir(units))):
            give_up()
        raise
    try:
        stages.check_rows(job, lay)
    except errors.DataError:  # complete but too small: nothing to resume
        give_up()
        raise
    manifest = stages.finish(job, lay, seconds=time.time() - t0)
    if keep_work:  # the tokenized units stay for the next listing; this run's plans and lists go
        for name in paths.listdir(job.work):
            if name != "units":
                target = paths.join(job.work, name)
                paths.rmtree(target) if paths.isdir(target) else paths.Path(target).unlink()
    else:
        paths.rmtree(job.work)
    if progress:
        print(f"[prepare] {tokenized} of {job.units} work units ({job.files} input files) tokenized, "
              f"{job.units - tokenized} reused from an interrupted run", file=sys.stderr)
        if lay["read_stats"].get("reused"):
            print(f"[prepare] {lay['read_stats']['reused']:,} PMC records unchanged since the listing the work "
                  "cache holds: taken from it, not fetched again", file=sys.stderr)
        for line in stages.card_lines(manifest):
            print(f"[prepare] {line}", file=sys.stderr)
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
