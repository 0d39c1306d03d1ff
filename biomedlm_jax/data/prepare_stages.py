"""The stages of `prepare_data`, shared by the local run and the Apache Beam pipeline (prepare_beam).

Each stage is a plain function of a `Job` (the settings) and a work-unit or shard number, reading and
writing the job's work folder, so any engine can run the stages in any order it likes and on any
number of workers. The local run calls them in loops; the Beam pipeline maps them over collections.

Every path may be a URL (gs://...): the inputs, the tokenizer and WORK are read and written only
through `core.paths`, so workers need no shared disk, and nothing depends on a worker's working
directory or temporary folder. The job itself stays small however many inputs there are: the
launcher lists the input files once (with each one's size and version: mtime, or the object's
generation) into `WORK/inputs-<digest>.jsonl` with each unit's byte offset beside it, and workers
read just the lines of the unit they work on.

Work units: consecutive input files grouped up to `unit_bytes` (one big file is a unit of its own),
so that per-file overhead (a cache, a plan, a task) stops dominating for one-article-per-file input.

1. `tokenize_unit(job, u)`: read unit u's files, tokenize their records (each + <|endoftext|>) and store
   them in `WORK/units/<key>.npz` (ids, kind: document / empty / delete, token counts, read counts) and
   `<key>.tokens` (the tokens, raw, streamed to the file as they are made). The key hashes the files'
   paths, sizes and versions with the tokenizer and reader settings, so a rerun after a kill skips
   every unit that finished (the expensive part), and a changed file is redone.
2. `record_events(job, u)` → `(id, (u, r, kind))` per record; `resolve(id, events)` keeps the latest:
   records are ordered by (unit, position in unit), which is (input file, position in file), so a
   later file's record for a PMID replaces the earlier one, and `<DeleteCitation>` in a PubMed update
   file removes it.
3. `plan_unit(job, u, winners)`: the records of unit u that survive, each's split (by id hash), and
   the tokens each split gets from the unit, into `WORK/plans/<u>.npz`.
4. `layout(job, totals)`: the documents' order is (unit, position), so a unit's surviving documents
   of a split fill one contiguous token range. Prefix sums of the per-unit totals give every unit's
   start, and hence every document's offset, row and shard, without any other shared state.
5. `write_shard(job, (split, k), layout)` streams rows [k·R, (k+1)·R) into the shard, reading only the
   token ranges it needs from the caches of the units that overlap it.
6. `finish(job)` gathers the shard records and counts into manifest.json, writes the doc-id index of
   each split (ids and token counts from the caches, offsets from the layout) and saves the tokenizer.

This is why the output is identical on 1 or N workers and on any runner: every value written is a
function of the inputs and settings alone (sorted events, prefix sums), never of which worker
tokenized what first.
"""
from __future__ import annotations

import hashlib
import io
import json
from bisect import bisect_right
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import packing, readers
from biomedlm_jax.data import shards as shards_lib
from biomedlm_jax.data import tokenizer as tokenizer_lib

# Stage 1 and what it rests on live in prepare_units; these names are re-exported, as callers know them
from biomedlm_jax.data.prepare_units import (DELETE, DOC, DROPPED, EMPTY, READ_BYTES, SPLITS,  # noqa: F401
                                             UNIT_BYTES, Job, cache_path, group_units, load_npz, load_tokenizer,
                                             save_npz, tokenize_unit, tokens_path, unit_files, write_listing)


# ----------------------------------------------------------------------------------------------------
# 2. which record of each id survives
# ----------------------------------------------------------------------------------------------------


def record_events(job: Job, u: int) -> Iterator[tuple[str, tuple]]:
    """(id, (unit, position, kind, text hash, MinHash band keys)) per record of unit u."""
    cache = load_npz(cache_path(job, u), "ids", "kinds", "hashes", "bands")
    bands = [tuple(row) for row in cache["bands"].tolist()]
    for r, (doc_id, kind, h) in enumerate(zip(cache["ids"].tolist(), cache["kinds"].tolist(),
                                              cache["hashes"].tolist())):
        yield doc_id, (u, r, kind, h, bands[r])


def resolve(doc_id: str, events: Iterable[tuple]) -> tuple[int, tuple]:
    """The latest record of an id: (its unit, (its position, kind, records it replaced, 1 if it deleted
    an earlier record, its text hash, its band keys))."""
    events = sorted(events)
    u, r, kind, h, bands = events[-1]
    records = sum(1 for e in events if e[2] != DELETE)  # records of this id that are not deletions
    # all but the last of them were replaced by a later one; a deletion at the end removes the last
    return u, (r, kind, max(records - 1, 0), int(kind == DELETE and records > 0), h, bands)


def resolve_all(events: Iterable[tuple[str, tuple[int, int, int, int]]]) -> dict[int, list]:
    """`resolve` over every id, in memory (the local run): {unit: [winner, ...]}."""
    by_id: dict[str, list] = {}
    for doc_id, event in events:
        by_id.setdefault(doc_id, []).append(event)
    out: dict[int, list] = {}
    for doc_id, evs in by_id.items():
        u, winner = resolve(doc_id, evs)
        out.setdefault(u, []).append(winner)
    return out


def text_events(u: int, winner: tuple) -> Iterator[tuple[int, tuple[int, int]]]:
    """(text hash, (unit, position)) of a surviving document, for exact de-duplication by text, and
    (band key, (unit, position)) for each of its MinHash bands when near_dedupe computed them: a
    document that shares a key with an earlier one is dropped."""
    r, kind, _, _, h, bands = winner
    if kind == DOC:
        yield h, (u, r)
        for key in bands:
            yield key, (u, r)


def later_copies(h: int, places: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(unit, position) of every document whose text an earlier one (in input order) has: all but the first."""
    yield from sorted(places)[1:]


def duplicates_all(winners: dict[int, list]) -> dict[int, list]:
    """`later_copies` over every surviving document, in memory: {unit: [position, ...]}."""
    by_hash: dict[int, list] = {}
    for u, ws in winners.items():
        for w in ws:
            for h, place in text_events(u, w):
                by_hash.setdefault(h, []).append(place)
    out: dict[int, list] = {}
    for h, places in by_hash.items():
        if len(places) > 1:
            for u, r in later_copies(h, places):
                out.setdefault(u, []).append(r)
    return out


# ----------------------------------------------------------------------------------------------------
# 3. per unit: surviving documents, their splits and token totals
# ----------------------------------------------------------------------------------------------------


def plan_path(job: Job, u: int) -> str:
    return paths.join(job.work, "plans", f"{u:06d}.npz")


def plan_unit(job: Job, u: int, winners: Iterable[tuple],
              duplicates: Iterable[int] = ()) -> dict:
    """Writes the plan of unit u and returns {"unit": u, "tokens": {split: n}, "docs": {split: n},
    "sources": {format: {split: {"documents", "tokens"}}}, "counts": {...}}. `duplicates`: positions
    of documents an earlier document's text repeats (left out when job.dedupe_text). A document's
    split is a hash of its key (the article's PMID where known), not of its id."""
    cache = load_npz(cache_path(job, u), "ids", "keys", "lengths", "sources", "stats", "reused")
    keys, lengths, sources = cache["keys"].tolist(), cache["lengths"], cache["sources"].tolist()
    counts = json.loads(str(cache["stats"]))
    counts["reused"] = int(cache["reused"])
    counts.update(documents=0, empty=0, duplicates=0, deleted=0, duplicate_text=0,
                  **{reason: 0 for reason in readers.DROP_REASONS})
    dup = set(duplicates) if job.dedupe_text else set()
    kept, validation = [], []
    by_source: dict = {}
    for r, kind, replaced, deleted, *_ in sorted(winners):
        counts["duplicates"] += replaced
        counts["deleted"] += deleted
        if kind == EMPTY:
            counts["empty"] += 1
        elif kind >= DROPPED:
            counts[readers.DROP_REASONS[kind - DROPPED]] += 1
        elif kind == DOC and r in dup:
            counts["duplicate_text"] += 1
        elif kind == DOC:
            kept.append(r)
            val = packing.in_eval_split(keys[r], job.eval_fraction)
            validation.append(val)
            cell = by_source.setdefault(readers.FORMATS[sources[r]], {}).setdefault(
                "validation" if val else "train", {"documents": 0, "tokens": 0})
            cell["documents"] += 1
            cell["tokens"] += int(lengths[r])
    kept_a, val_a = np.asarray(kept, np.int64), np.asarray(validation, bool)
    counts["documents"] = len(kept)
    tokens = {"train": int(lengths[kept_a[~val_a]].sum()), "validation": int(lengths[kept_a[val_a]].sum())}
    docs = {"train": int((~val_a).sum()), "validation": int(val_a.sum())}
    summary = {"unit": u, "tokens": tokens, "docs": docs, "sources": by_source, "counts": counts}
    paths.makedirs(paths.join(job.work, "plans"))
    save_npz(plan_path(job, u), kept=kept_a, validation=val_a, summary=np.asarray(json.dumps(summary)))
    return summary


def plan_summary(job: Job, u: int) -> dict:
    """What `plan_unit` returned for unit u, read back from WORK."""
    return json.loads(str(load_npz(plan_path(job, u), "summary")["summary"]))


def _split_docs(job: Job, u: int, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Unit u's surviving documents of `split` in order: (ids, token counts, first token in the unit's
    tokens file)."""
    cache = load_npz(cache_path(job, u), "ids", "lengths")
    plan = load_npz(plan_path(job, u), "kept", "validation")
    lengths, ids = cache["lengths"], cache["ids"]
    sel = plan["kept"][plan["validation"] == (split == "validation")]
    starts = np.cumsum(lengths) - lengths
    return [str(ids[r]) for r in sel.tolist()], lengths[sel], starts[sel]


# ----------------------------------------------------------------------------------------------------
# 4. where every unit's documents go
# ----------------------------------------------------------------------------------------------------


def layout(job: Job, plans: Sequence[dict]) -> dict:
    """From every unit's plan summary: per split, each unit's first token offset, the rows and shards."""
    plans = sorted(plans, key=lambda p: p["unit"])
    if [p["unit"] for p in plans] != list(range(job.units)):
        raise RuntimeError(f"plans for {len(plans)} of {job.units} work units")
    out: dict = {}
    for split in SPLITS:
        totals = np.asarray([p["tokens"][split] for p in plans], np.int64)
        starts = np.concatenate([[0], np.cumsum(totals)])
        rows = int(starts[-1] // job.row_len)
        out[split] = {"starts": starts.tolist(), "tokens": int(starts[-1]), "rows": rows,
                      "shards": -(-rows // job.rows_per_shard),
                      "documents": int(sum(p["docs"][split] for p in plans))}
    counts: dict = {}
    sources: dict = {}
    for p in plans:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for src, cells in p.get("sources", {}).items():
            for split, cell in cells.items():
                acc = sources.setdefault(src, {}).setdefault(split, {"documents": 0, "tokens": 0})
                acc["documents"] += cell["documents"]
                acc["tokens"] += cell["tokens"]
    counts["older_version"] = counts.get("older_version", 0) + job.older_versions
    counts["withdrawn"] = counts.get("withdrawn", 0) + job.withdrawn
    out["read_stats"] = {k: counts.get(k, 0) for k in readers.ReadStats().as_dict()}
    out["sources"] = {src: sources[src] for src in sorted(sources)}
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


def _token_ranges(job: Job, u: int, split: str, a: int, b: int) -> list[tuple[int, int]]:
    """Byte ranges of unit u's tokens file holding tokens [a, b) of the unit's `split` stream (its
    surviving documents of that split, concatenated); runs of adjacent documents are merged."""
    _, lengths, starts = _split_docs(job, u, split)
    ends = np.cumsum(lengths)
    first = int(np.searchsorted(ends, a, side="right"))
    ranges: list[tuple[int, int]] = []
    item = job.dtype.itemsize
    for d in range(first, len(lengths)):
        lo = int(ends[d] - lengths[d])
        if lo >= b:
            break
        s = int(starts[d]) + max(a - lo, 0)
        e = int(starts[d]) + min(b, int(ends[d])) - lo
        if ranges and ranges[-1][1] == s * item:
            ranges[-1] = (ranges[-1][0], e * item)
        else:
            ranges.append((s * item, e * item))
    return ranges


def write_shard(job: Job, task: tuple[str, int], lay: dict) -> dict:
    """Streams shard `task` = (split, k) into OUT: the .npy header, then the token ranges it needs,
    fetched from the unit caches at most READ_BYTES at a time. Peak memory is one such batch, not the
    shard; the sha256 is computed on the way."""
    split, k = task
    info, R, L = lay[split], job.rows_per_shard, job.row_len
    first, last = k * R, min((k + 1) * R, info["rows"])
    a, b = first * L, last * L
    starts = info["starts"]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(job.dtype), "fortran_order": False, "shape": (last - first, L)})
    digest = hashlib.sha256()
    name = shard_name(split, k)
    paths.makedirs(job.out)
    filled = a
    with paths.open_write(paths.join(job.out, name)) as f:
        f.write(header.getvalue())
        u = max(bisect_right(starts, a) - 1, 0)
        while filled < b and u < job.units:
            lo, hi = starts[u], starts[u + 1]
            if hi > filled:
                ranges = _token_ranges(job, u, split, filled - lo, min(hi, b) - lo)
                src = tokens_path(job, u)
                while ranges:
                    take, size = 0, 0
                    while take < len(ranges) and (take == 0 or size + ranges[take][1] - ranges[take][0] <= READ_BYTES):
                        size += ranges[take][1] - ranges[take][0]
                        take += 1
                    for (r0, r1), data in zip(ranges[:take], paths.read_ranges([(src, r0, r1) for r0, r1 in ranges[:take]])):
                        if len(data) != r1 - r0:
                            raise RuntimeError(f"{src}: {len(data)} of {r1 - r0} bytes at {r0} (a damaged cache)")
                        f.write(data)
                        digest.update(data)
                        filled += len(data) // job.dtype.itemsize
                    ranges = ranges[take:]
            u += 1
    if filled != b:
        raise RuntimeError(f"shard {split} {k}: filled {filled - a} of {b - a} tokens")
    meta = {"file": name, "rows": int(last - first), "sha256": digest.hexdigest(),
            "header_bytes": len(header.getvalue())}
    paths.makedirs(paths.join(job.work, "shards"))
    paths.write_text(shard_meta_path(job, split, k), json.dumps(meta))
    return meta


def write_index(job: Job, split: str, lay: dict) -> None:
    """`doc id <TAB> first row` of every surviving document of `split`, in order, into OUT."""
    with paths.open_write(paths.join(job.out, f"{split}-docs.tsv")) as f:
        for u in range(job.units):
            ids, lengths, _ = _split_docs(job, u, split)
            if ids:
                offsets = lay[split]["starts"][u] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
                f.write("".join(f"{d}\t{int(o) // job.row_len}\n" for d, o in zip(ids, offsets)).encode())


# ----------------------------------------------------------------------------------------------------
# 6. the manifest
# ----------------------------------------------------------------------------------------------------


def check_rows(job: Job, lay: dict) -> None:
    if not lay["train"]["rows"]:  # an empty dataset would only fail later, in the trainer
        raise errors.DataError(
            f"{', '.join(job.inputs)}: no training row of {job.row_len} tokens ({lay['read_stats']['documents']} "
            f"documents read, {lay['train']['tokens']} training tokens; read stats {lay['read_stats']}). Check the "
            "inputs, their --format, or use a smaller --seq_len.")


CARD_DROPS = ("no_abstract", "duplicate_text", "language", "retracted", "license", "older_version", "withdrawn",
              "empty",
              "duplicates", "deleted", "errors_skipped")


def card(job: Job, lay: dict) -> dict:
    """The data card: documents and tokens (before packing) per source format and split, and the
    records left out, by reason."""
    stats = lay["read_stats"]
    return {"sources": lay.get("sources", {}), "dropped": {k: stats.get(k, 0) for k in CARD_DROPS},
            "split_key": "the article's PMID where the record names one, else its id",
            "pmc_licenses": list(job.licenses), "dedupe_text": job.dedupe_text, "near_dedupe": job.near_dedupe,
            "detect_language": job.detect_language}


def card_lines(manifest: dict) -> list[str]:
    """The card as the run's last lines."""
    c = manifest.get("card", {})
    out = []
    for src, cells in c.get("sources", {}).items():
        out.append(f"{src}: " + ", ".join(f"{split} {v['documents']:,} documents / {v['tokens']:,} tokens"
                                          for split, v in sorted(cells.items())))
    out.append("dropped: " + ", ".join(f"{k} {v:,}" for k, v in c.get("dropped", {}).items()))
    return out


def finish(job: Job, lay: dict, seconds: Optional[float] = None) -> dict:
    """Writes the doc-id indexes, the tokenizer and, last, manifest.json (the commit: a reader takes a
    folder with a manifest as complete) into OUT; returns the manifest."""
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
        "dtype": job.dtype.name,
        "tokenizer": {"sha256": job.tokenizer_sha256, "vocab_size": tok.get_vocab_size(),
                      "eos_id": tok.token_to_id(tokenizer_lib.EOS_TOKEN)},
        "inputs": list(job.inputs),
        "input_files": job.files,
        "eval_fraction": job.eval_fraction,
        "read_stats": lay["read_stats"],
        "card": card(job, lay),
        "splits": splits,
    }
    if seconds is not None:
        manifest["seconds"] = round(seconds, 1)
    tokenizer_lib.save_tokenizer(tok, paths.join(job.out, "tokenizer"))
    paths.write_text(paths.join(job.out, shards_lib.MANIFEST), json.dumps(manifest, indent=2))
    return manifest
