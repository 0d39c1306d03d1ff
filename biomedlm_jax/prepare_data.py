"""Tokenize a corpus once, offline, into packed row shards that pretraining memory-maps.

    python -m biomedlm_jax.prepare_data --input='pubmed/baseline/*.xml.gz,pmc/**/*.nxml' \
        --tokenizer=DIR --out=DIR [--seq_len=1024 --eval_fraction=0.005 --rows_per_shard=65536 --on_error=skip]
    python -m biomedlm_jax.prepare_data audit --corpus=DIR --pubmedqa=ori_pqal.json [--bioasq=training.json] [--out=F]

Output directory:

    manifest.json            format, seq_len/row_len, token dtype, tokenizer sha256, inputs, read counts,
                             per split: rows, tokens, documents, dropped tail, shard files + sha256, fingerprint
    train-00000.npy ...      (rows, seq_len + 1) uint16 (uint32 for vocabularies > 65,536), memory-mappable
    validation-00000.npy ...
    train-docs.tsv           doc_id <TAB> row where the document starts (the side index: ids never enter
    validation-docs.tsv      the token stream); used by `audit` for contamination checks
    tokenizer/               the tokenizer the rows were made with

Documents are streamed (any size of corpus), de-duplicated by id, split into train/validation by a hash
of the id (the same split as the TFDS builder and the trainer's in-memory path), tokenized in parallel
batches, each followed by <|endoftext|>, and packed. The whole output is written to `OUT.tmp-*` and
renamed at the end, so an interrupted run leaves nothing that looks complete, and an existing output is
never overwritten without --overwrite.

Why .npy and not TFRecord: pretraining resumes by seeking to a row position (see input_pipeline), which
needs random access. TFRecord files can only be read sequentially, and reading them needs TensorFlow,
which the GPU images do not have. ArrayRecord would add another native dependency. Memory-mapped .npy
shards give random access with numpy alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from biomedlm_jax import errors, paths, readers
from biomedlm_jax import input_pipeline as ip
from biomedlm_jax import tokenizer as tokenizer_lib

SPLITS = ("train", "validation")


class _SplitWriter:
    """Accumulates packed rows of one split and writes them as .npy shards of `rows_per_shard` rows."""

    def __init__(self, out: str, split: str, packer: ip.Packer, rows_per_shard: int):
        self.out, self.split, self.packer, self.rows_per_shard = out, split, packer, rows_per_shard
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.rows = 0
        self.shards: list[dict] = []
        self.docs = open(os.path.join(out, f"{split}-docs.tsv"), "w", encoding="utf-8")

    def add(self, docs: Sequence[tuple[str, str]]) -> None:
        rows, starts = self.packer.pack(docs)
        for doc_id, offset in starts:
            self.docs.write(f"{doc_id}\t{offset // self.packer.row_len}\n")
        if len(rows):
            self.buffer.append(rows)
            self.buffered += len(rows)
        while self.buffered >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def _write(self, n: int) -> None:
        allrows = np.concatenate(self.buffer)
        shard, rest = allrows[:n], allrows[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}-{len(self.shards):05d}.npy"
        np.save(os.path.join(self.out, name), shard)
        self.shards.append({"file": name, "rows": int(len(shard)),
                            "sha256": hashlib.sha256(np.ascontiguousarray(shard).tobytes()).hexdigest()})
        self.rows += len(shard)

    def close(self) -> dict:
        if self.buffered:
            self._write(self.buffered)
        self.docs.close()
        fingerprint = hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()[:16]
        return {
            "rows": self.rows,
            "tokens": self.rows * self.packer.row_len,
            "documents": self.packer.num_documents,
            "dropped_tokens": self.packer.dropped_tokens,
            "shards": self.shards,
            "docs_index": f"{self.split}-docs.tsv",
            "fingerprint": fingerprint,
        }


def prepare(inputs: Sequence[str], tokenizer_dir: str, out: str, *, seq_len: int = 1024,
            eval_fraction: float = 0.005, rows_per_shard: int = 65536, on_error: str = "raise",
            fmt: str = "auto", overwrite: bool = False, batch_docs: int = 512, progress: bool = True) -> dict:
    """Tokenize and pack `inputs` into `out` (a local folder or an object-store URL, gs://...); returns
    the manifest."""
    if paths.is_remote(out):  # built in a local folder, then uploaded with the manifest last
        if paths.exists(out) and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="biomedlm_jax-prepare-") as local:
            manifest = prepare(inputs, tokenizer_dir, os.path.join(local, "out"), seq_len=seq_len,
                               eval_fraction=eval_fraction, rows_per_shard=rows_per_shard, on_error=on_error,
                               fmt=fmt, batch_docs=batch_docs, progress=progress)
            paths.rmtree(out)
            paths.upload(os.path.join(local, "out"), out)
        return manifest
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    files = readers.expand_files(list(inputs))
    tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        writers = {s: _SplitWriter(tmp, s, ip.Packer(tok, seq_len + 1), rows_per_shard) for s in SPLITS}
        stats = readers.ReadStats()
        pending: dict[str, list] = {s: [] for s in SPLITS}
        t0 = last = time.time()
        for doc_id, text in readers.read_documents(files, stats, on_error=on_error, fmt=fmt):
            split = "validation" if ip.in_eval_split(doc_id, eval_fraction) else "train"
            pending[split].append((doc_id, text))
            if len(pending[split]) >= batch_docs:
                writers[split].add(pending[split])
                pending[split] = []
            if progress and time.time() - last > 5:
                last = time.time()
                print(f"\r[prepare] {stats.documents:,} documents, {stats.files}/{len(files)} files, "
                      f"{writers['train'].packer.tokens_seen / max(last - t0, 1e-9):,.0f} tokens/s",
                      end="", file=sys.stderr, flush=True)
        for split in SPLITS:
            if pending[split]:
                writers[split].add(pending[split])
        splits = {s: w.close() for s, w in writers.items()}
        if not splits["train"]["rows"]:
            # Nothing is written: an empty dataset would only fail later, in the trainer.
            raise errors.DataError(
                f"{', '.join(files)}: no training row of {seq_len + 1} tokens ({stats.documents} documents read, "
                f"{writers['train'].packer.tokens_seen} training tokens; read stats {stats.as_dict()}). Check the inputs, "
                "their --format, or use a smaller --seq_len."
            )
        manifest = {
            "format": ip.PREPARED_FORMAT,
            "seq_len": seq_len,
            "row_len": seq_len + 1,
            "dtype": np.dtype(writers["train"].packer.dtype).name,
            "tokenizer": {"sha256": ip.tokenizer_sha256(tok), "vocab_size": tok.get_vocab_size(),
                          "eos_id": tok.token_to_id(tokenizer_lib.EOS_TOKEN)},
            "inputs": files,
            "eval_fraction": eval_fraction,
            "read_stats": stats.as_dict(),
            "splits": splits,
            "seconds": round(time.time() - t0, 1),
        }
        tokenizer_lib.save_tokenizer(tok, os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, ip.MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------------------------------
# Contamination audit
# ----------------------------------------------------------------------------------------------------

_PMID_URL = re.compile(r"(\d+)\s*$")


def corpus_ids(corpus: str) -> set[str]:
    manifest = ip.read_manifest(corpus)
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
    p.add_argument("--input", required=True, help="comma-separated files/globs/dirs: PubMed XML, PMC JATS, PubTator, JSONL")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--out", required=True)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--eval_fraction", type=float, default=0.005, help="share of documents (by id hash) held out")
    p.add_argument("--rows_per_shard", type=int, default=65536)
    p.add_argument("--format", default="auto", choices=("auto",) + readers.FORMATS)
    p.add_argument("--on_error", default="raise", choices=("raise", "skip"))
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        m = prepare(args.input.split(","), args.tokenizer, args.out, seq_len=args.seq_len,
                    eval_fraction=args.eval_fraction, rows_per_shard=args.rows_per_shard, on_error=args.on_error,
                    fmt=args.format, overwrite=args.overwrite)
    except (errors.DataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = m["read_stats"]
    print(f"[prepare] {s['documents']:,} documents from {s['files']} files ({s['duplicates']} duplicate ids, "
          f"{s['empty']} empty, {s['errors_skipped']} skipped, {s['non_utf8_lines']} non-UTF-8 lines) in {m['seconds']}s")
    for split, info in m["splits"].items():
        print(f"[prepare] {split}: {info['documents']:,} documents -> {info['rows']:,} rows of {m['row_len']} tokens "
              f"in {len(info['shards'])} shards ({info['dropped_tokens']} tail tokens dropped)")
    print(f"[prepare] wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
