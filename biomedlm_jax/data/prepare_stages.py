"""The stages of `prepare_data`, shared by the local run and the Apache Beam pipeline (prepare_beam).

Each stage is a plain function of a `Job` (the settings) and a file or shard number, reading and
writing the job's work folder, so any engine can run the stages in any order it likes and on any
number of workers. The local run calls them in loops; the Beam pipeline maps them over collections.

1. `tokenize_file(job, i)`: read input file i, tokenize its records (each + <|endoftext|>) and store
   them in `WORK/files/<key>.npz`: ids, kind (document / empty / delete), token counts, tokens, read
   counts. The key hashes the file's path, size and mtime with the tokenizer and reader settings, so a
   rerun after a kill skips every file that finished (the expensive part), and a changed file is redone.
2. `record_events(job, i)` → `(id, (i, r, kind))` per record; `resolve(id, events)` keeps the latest:
   records are ordered by (input file, position in file), so a later file's record for a PMID replaces
   the earlier one, and `<DeleteCitation>` in a PubMed update file removes it.
3. `plan_file(job, i, winners)`: the records of file i that survive, each's split (by id hash), and
   the tokens each split gets from the file, into `WORK/plans/<i>.npz`.
4. `layout(job, totals)`: the documents' order is (file, position), so a file's surviving documents
   of a split fill one contiguous token range. Prefix sums of the per-file totals give every file's
   start, and hence every document's offset, row and shard, without any other shared state.
5. `write_shard(job, split, k, layout)` assembles rows [k·R, (k+1)·R) from the cached tokens of the
   files that overlap it.
6. `finish(job)` gathers the shard records and counts into manifest.json, writes the doc-id index of
   each split (ids and token counts from the caches, offsets from the layout) and saves the tokenizer.

This is why the output is identical on 1 or N workers and on any runner: every value written is a
function of the inputs and settings alone (sorted events, prefix sums), never of which worker
tokenized what first.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from bisect import bisect_right
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import packing, readers
from biomedlm_jax.data import shards as shards_lib
from biomedlm_jax.data import tokenizer as tokenizer_lib

SPLITS = ("train", "validation")
DOC, EMPTY, DELETE = 0, 1, 2  # record kinds
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Job:
    files: tuple[str, ...]
    tokenizer: str  # a tokenizer directory every worker can read
    work: str  # WORK: caches, plans and the output being built (WORK/out)
    seq_len: int = 1024
    eval_fraction: float = 0.005
    rows_per_shard: int = 65536
    fmt: str = "auto"
    on_error: str = "raise"
    batch_docs: int = 512

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def out(self) -> str:
        return paths.join(self.work, "out")


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return tokenizer_lib.load_tokenizer(path)


@functools.lru_cache(maxsize=4)
def tokenizer_digest(path: str) -> str:
    return shards_lib.tokenizer_sha256(load_tokenizer(path))


def _save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())


def _load_npz(path: str, *names: str) -> dict:
    """The named arrays of an .npz in WORK, reading only those members (not a cache's tokens when the
    caller wants its ids)."""
    with paths.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {name: npz[name] for name in names}


def cache_path(job: Job, i: int) -> str:
    path = job.files[i]
    st = os.stat(path)
    key = json.dumps([CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns,
                      tokenizer_digest(job.tokenizer), job.fmt, job.on_error])
    return paths.join(job.work, "files", f"{i:06d}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


# ----------------------------------------------------------------------------------------------------
# 1. read and tokenize one input file
# ----------------------------------------------------------------------------------------------------


def tokenize_file(job: Job, i: int) -> bool:
    """Tokenize input file i into its cache unless a finished cache exists; True when it did the work."""
    target = cache_path(job, i)
    if paths.exists(target):
        return False
    tok = load_tokenizer(job.tokenizer)
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    if eos is None:
        raise errors.DataError(f"{job.tokenizer}: the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
    dtype = packing.token_dtype(tok.get_vocab_size())
    stats = readers.ReadStats(files=1)
    ids, kinds, lengths, pieces = [], [], [], []
    batch: list[tuple[int, str]] = []  # (record number, text) waiting for encode_batch

    def flush():
        for (r, _), enc in zip(batch, tok.encode_batch([t for _, t in batch])):
            lengths[r] = len(enc.ids) + 1
            pieces.append((r, np.asarray(enc.ids + [eos], dtype)))
        batch.clear()

    try:
        for doc_id, text in readers.read_records(job.files[i], stats, job.on_error, job.fmt):
            r = len(ids)
            ids.append(doc_id)
            lengths.append(0)
            if text is None:
                kinds.append(DELETE)
            elif not text.strip():
                kinds.append(EMPTY)
            else:
                kinds.append(DOC)
                batch.append((r, text))
                if len(batch) >= job.batch_docs:
                    flush()
        flush()
    except errors.DataError:
        if job.on_error == "skip":  # the file could not even be opened as its format: counted, never fatal
            stats.errors_skipped += 1
        else:
            raise
    pieces.sort(key=lambda p: p[0])
    tokens = np.concatenate([p for _, p in pieces]) if pieces else np.zeros(0, dtype)
    paths.makedirs(paths.join(job.work, "files"))
    _save_npz(target, ids=np.asarray(ids, dtype=str), kinds=np.asarray(kinds, np.int8),
              lengths=np.asarray(lengths, np.int64), tokens=tokens,
              stats=np.asarray(json.dumps(stats.as_dict())))
    return True


# ----------------------------------------------------------------------------------------------------
# 2. which record of each id survives
# ----------------------------------------------------------------------------------------------------


def record_events(job: Job, i: int) -> Iterator[tuple[str, tuple[int, int, int]]]:
    cache = _load_npz(cache_path(job, i), "ids", "kinds")
    for r, (doc_id, kind) in enumerate(zip(cache["ids"].tolist(), cache["kinds"].tolist())):
        yield doc_id, (i, r, kind)


def resolve(doc_id: str, events: Iterable[tuple[int, int, int]]) -> tuple[int, tuple[int, int, int, int]]:
    """The latest record of an id: (its file, (its position, kind, records it replaced, 1 if it deleted
    an earlier record))."""
    events = sorted(events)
    i, r, kind = events[-1]
    records = sum(1 for e in events if e[2] != DELETE)  # records of this id that are not deletions
    # all but the last of them were replaced by a later one; a deletion at the end removes the last
    return i, (r, kind, max(records - 1, 0), int(kind == DELETE and records > 0))


def resolve_all(events: Iterable[tuple[str, tuple[int, int, int]]]) -> dict[int, list]:
    """`resolve` over every id, in memory (the local run): {file: [winner, ...]}."""
    by_id: dict[str, list] = {}
    for doc_id, event in events:
        by_id.setdefault(doc_id, []).append(event)
    out: dict[int, list] = {}
    for doc_id, evs in by_id.items():
        i, winner = resolve(doc_id, evs)
        out.setdefault(i, []).append(winner)
    return out


# ----------------------------------------------------------------------------------------------------
# 3. per file: surviving documents, their splits and token totals
# ----------------------------------------------------------------------------------------------------


def plan_path(job: Job, i: int) -> str:
    return paths.join(job.work, "plans", f"{i:06d}.npz")


def plan_file(job: Job, i: int, winners: Iterable[tuple[int, int, int, int]]) -> dict:
    """Writes the plan of file i and returns {"file": i, "tokens": {split: n}, "counts": {...}}."""
    cache = _load_npz(cache_path(job, i), "ids", "lengths", "stats")
    ids, lengths = cache["ids"].tolist(), cache["lengths"]
    counts = json.loads(str(cache["stats"]))
    counts.update(documents=0, empty=0, duplicates=0, deleted=0)
    kept, validation = [], []
    for r, kind, replaced, deleted in sorted(winners):
        counts["duplicates"] += replaced
        counts["deleted"] += deleted
        if kind == EMPTY:
            counts["empty"] += 1
        elif kind == DOC:
            kept.append(r)
            validation.append(packing.in_eval_split(ids[r], job.eval_fraction))
    kept_a, val_a = np.asarray(kept, np.int64), np.asarray(validation, bool)
    counts["documents"] = len(kept)
    tokens = {"train": int(lengths[kept_a[~val_a]].sum()), "validation": int(lengths[kept_a[val_a]].sum())}
    docs = {"train": int((~val_a).sum()), "validation": int(val_a.sum())}
    summary = {"file": i, "tokens": tokens, "docs": docs, "counts": counts}
    paths.makedirs(paths.join(job.work, "plans"))
    _save_npz(plan_path(job, i), kept=kept_a, validation=val_a, summary=np.asarray(json.dumps(summary)))
    return summary


def plan_summary(job: Job, i: int) -> dict:
    """What `plan_file` returned for file i, read back from WORK."""
    return json.loads(str(_load_npz(plan_path(job, i), "summary")["summary"]))


def _split_tokens(job: Job, i: int, split: str, with_tokens: bool = True
                  ) -> tuple[list[str], np.ndarray, Optional[np.ndarray]]:
    """File i's surviving documents of `split` in order: (ids, token counts, their concatenated tokens)."""
    cache = _load_npz(cache_path(job, i), "ids", "lengths", *(["tokens"] if with_tokens else []))
    plan = _load_npz(plan_path(job, i), "kept", "validation")
    lengths, ids = cache["lengths"], cache["ids"]
    sel = plan["kept"][plan["validation"] == (split == "validation")]
    flat = None
    if with_tokens:
        tokens = cache["tokens"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        parts = [tokens[starts[r]:ends[r]] for r in sel.tolist()]
        flat = np.concatenate(parts) if parts else tokens[:0]
    return [str(ids[r]) for r in sel.tolist()], lengths[sel], flat


# ----------------------------------------------------------------------------------------------------
# 4. where every file's documents go
# ----------------------------------------------------------------------------------------------------


def layout(job: Job, plans: Sequence[dict]) -> dict:
    """From every file's plan summary: per split, each file's first token offset, the rows and shards."""
    plans = sorted(plans, key=lambda p: p["file"])
    if [p["file"] for p in plans] != list(range(len(job.files))):
        raise RuntimeError(f"plans for {len(plans)} of {len(job.files)} input files")
    out: dict = {}
    for split in SPLITS:
        totals = np.asarray([p["tokens"][split] for p in plans], np.int64)
        starts = np.concatenate([[0], np.cumsum(totals)])
        rows = int(starts[-1] // job.row_len)
        out[split] = {"starts": starts.tolist(), "tokens": int(starts[-1]), "rows": rows,
                      "shards": -(-rows // job.rows_per_shard),
                      "documents": int(sum(p["docs"][split] for p in plans))}
    counts: dict = {}
    for p in plans:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    out["read_stats"] = {k: counts.get(k, 0) for k in readers.ReadStats().as_dict()}
    return out


def shard_tasks(lay: dict) -> list[tuple[str, int]]:
    return [(split, k) for split in SPLITS for k in range(lay[split]["shards"])]


# ----------------------------------------------------------------------------------------------------
# 5. shards and the doc-id index
# ----------------------------------------------------------------------------------------------------


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.npy"


def shard_meta_path(job: Job, split: str, k: int) -> str:
    """Where `write_shard` leaves the shard's record (file, rows, sha256) for `finish`."""
    return paths.join(job.work, "shards", f"{split}-{k:05d}.json")


def write_shard(job: Job, task: tuple[str, int], lay: dict) -> dict:
    split, k = task
    info, R, L = lay[split], job.rows_per_shard, job.row_len
    first, last = k * R, min((k + 1) * R, info["rows"])
    a, b = first * L, last * L
    starts = info["starts"]
    dtype = packing.token_dtype(load_tokenizer(job.tokenizer).get_vocab_size())
    out = np.empty(b - a, dtype)
    filled = a
    i = max(bisect_right(starts, a) - 1, 0)
    while filled < b and i < len(job.files):
        lo, hi = starts[i], starts[i + 1]
        if hi > filled:
            _, _, flat = _split_tokens(job, i, split)
            take = flat[filled - lo: min(hi, b) - lo]
            out[filled - a: filled - a + len(take)] = take
            filled += len(take)
        i += 1
    if filled != b:
        raise RuntimeError(f"shard {split} {k}: filled {filled - a} of {b - a} tokens")
    rows = out.reshape(last - first, L)
    buf = io.BytesIO()
    np.save(buf, rows)
    name = shard_name(split, k)
    paths.makedirs(job.out)
    paths.write_bytes(paths.join(job.out, name), buf.getvalue())
    meta = {"file": name, "rows": int(last - first), "sha256": hashlib.sha256(rows.tobytes()).hexdigest()}
    paths.makedirs(paths.join(job.work, "shards"))
    paths.write_text(shard_meta_path(job, split, k), json.dumps(meta))
    return meta


def write_index(job: Job, split: str, lay: dict) -> None:
    """`doc id <TAB> first row` of every surviving document of `split`, in order, into WORK/out."""
    with paths.Path(paths.join(job.out, f"{split}-docs.tsv")).open("w") as f:
        for i in range(len(job.files)):
            ids, lengths, _ = _split_tokens(job, i, split, with_tokens=False)
            if ids:
                offsets = lay[split]["starts"][i] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
                f.write("".join(f"{d}\t{int(o) // job.row_len}\n" for d, o in zip(ids, offsets)))


# ----------------------------------------------------------------------------------------------------
# 6. the manifest
# ----------------------------------------------------------------------------------------------------


def check_rows(job: Job, lay: dict) -> None:
    if not lay["train"]["rows"]:  # an empty dataset would only fail later, in the trainer
        raise errors.DataError(
            f"{', '.join(job.files)}: no training row of {job.row_len} tokens ({lay['read_stats']['documents']} "
            f"documents read, {lay['train']['tokens']} training tokens; read stats {lay['read_stats']}). Check the "
            "inputs, their --format, or use a smaller --seq_len.")


def finish(job: Job, lay: dict, seconds: Optional[float] = None) -> dict:
    """Writes manifest.json, the doc-id indexes and the tokenizer into WORK/out; returns the manifest."""
    tok = load_tokenizer(job.tokenizer)
    splits = {}
    for split in SPLITS:
        shards = [json.loads(paths.read_text(shard_meta_path(job, split, k))) for k in range(lay[split]["shards"])]
        write_index(job, split, lay)
        splits[split] = {
            "rows": lay[split]["rows"],
            "tokens": lay[split]["rows"] * job.row_len,
            "documents": lay[split]["documents"],
            "dropped_tokens": lay[split]["tokens"] - lay[split]["rows"] * job.row_len,
            "shards": shards,
            "docs_index": f"{split}-docs.tsv",
            "fingerprint": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16],
        }
    manifest = {
        "format": shards_lib.PREPARED_FORMAT,
        "seq_len": job.seq_len,
        "row_len": job.row_len,
        "dtype": np.dtype(packing.token_dtype(tok.get_vocab_size())).name,
        "tokenizer": {"sha256": tokenizer_digest(job.tokenizer), "vocab_size": tok.get_vocab_size(),
                      "eos_id": tok.token_to_id(tokenizer_lib.EOS_TOKEN)},
        "inputs": list(job.files),
        "eval_fraction": job.eval_fraction,
        "read_stats": lay["read_stats"],
        "splits": splits,
    }
    if seconds is not None:
        manifest["seconds"] = round(seconds, 1)
    tokenizer_lib.save_tokenizer(tok, paths.join(job.out, "tokenizer"))
    paths.write_text(paths.join(job.out, shards_lib.MANIFEST), json.dumps(manifest, indent=2))
    return manifest
