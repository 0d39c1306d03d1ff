"""The first half of `prepare_data`'s stages (see prepare_stages for the whole): the job, the input list
in WORK grouped into work units, and tokenizing a unit into its cache (stage 1), with the reuse of an
earlier listing's PMC articles. `prepare_stages` re-exports every name here."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
from typing import Optional, Sequence

import numpy as np

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import packing, pmc_cloud, readers
from biomedlm_jax.data import tokenizer as tokenizer_lib

SPLITS = ("train", "validation")
DOC, EMPTY, DELETE = 0, 1, 2  # record kinds; a record curation leaves out is DROPPED + its reason's index
DROPPED = 3
CACHE_VERSION = 3  # 3: split keys, curation (dropped records), text hashes, sources
BANDS = 16  # MinHash bands per document with near_dedupe (data/curation.py's BANDS)
UNIT_BYTES = 64 << 20  # input bytes per work unit (files are grouped up to this; a bigger file is one unit)
READ_BYTES = 16 << 20  # cached tokens fetched per request batch while a shard is written


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a worker needs, small whatever the number of inputs (the file list is in WORK)."""
    inputs: tuple[str, ...]  # what the user gave (globs, folders, files), for messages and the manifest
    listing: str  # WORK/inputs-<sha256>.jsonl: [path, size, version, unit] per input file
    units: int
    files: int
    tokenizer: str  # a tokenizer directory or URL every worker can read
    tokenizer_sha256: str
    work: str  # WORK: caches, plans, shard records
    out_dir: str = ""  # OUT: workers write shards straight here; manifest.json, written last, commits it
    seq_len: int = 1024
    eval_fraction: float = 0.005
    rows_per_shard: int = 65536
    fmt: str = "auto"
    on_error: str = "raise"
    batch_docs: int = 512
    vocab_size: int = 0
    licenses: tuple[str, ...] = ("oa_comm",)  # PMC Cloud Service licence subsets kept
    older_versions: int = 0  # PMC article versions left out when listed (a later version exists)
    withdrawn: int = 0  # PMC articles left out when listed (on the --pmc_withdrawn list)
    dedupe_text: bool = True  # drop documents whose normalized text an earlier document has
    fetch_concurrency: int = readers.FETCH_CONCURRENCY
    pmc_block_ids: int = pmc_cloud.block_ids(UNIT_BYTES)  # PMCIDs per unit of PMC Cloud Service articles
    near_dedupe: bool = False  # also drop near-duplicates (MinHash bands, data/curation.py)
    detect_language: bool = False  # also drop documents a language detector finds not English

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def out(self) -> str:
        return self.out_dir or paths.join(self.work, "out")

    @property
    def dtype(self):
        return np.dtype(packing.token_dtype(self.vocab_size))


def group_units(files: Sequence[tuple[str, int, str]], unit_bytes: int = UNIT_BYTES) -> list[int]:
    """The unit of each file: consecutive files share a unit until their sizes add up to `unit_bytes`.

    PMC Cloud Service articles (metadata entries, ordered by PMCID) are grouped by PMCID block instead:
    PMCIDs [k·B, (k+1)·B) form a unit, B = unit_bytes / 64 KB (`pmc_cloud.ARTICLE_BYTES`; 1,024 for
    64 MB). A unit's articles then depend on its block alone, so a newer listing changes only the units
    whose articles were added, revised or removed (see `tokenize_unit` for the reuse within them)."""
    units, unit, size = [], -1, unit_bytes
    block = None
    per_block = pmc_cloud.block_ids(unit_bytes)
    for entry in files:
        av = pmc_cloud.article_version(entry[0])
        if av is not None:
            b = int(av[0][3:]) // per_block
            if b != block:
                unit, block, size = unit + 1, b, 0
            units.append(unit)
            continue
        if size + entry[1] > unit_bytes or unit < 0 or block is not None:
            unit, size, block = unit + 1, 0, None
        units.append(unit)
        size += entry[1]
    return units


def pmc_block(job: "Job", u: int) -> Optional[int]:
    """The PMCID block of a unit of PMC Cloud Service articles (see `group_units`), None for other units."""
    first = unit_files(job, u)[0][0]
    av = pmc_cloud.article_version(first)
    return int(av[0][3:]) // job.pmc_block_ids if av is not None else None


def write_listing(work: str, files: Sequence[tuple[str, int, str]], units: Sequence[int]) -> str:
    """Writes the input list into WORK as `inputs-<sha256>.jsonl` (one `[path, size, version, unit]`
    line per file, units in order) and `inputs-<sha256>.offsets.npy` (the byte offset of each unit's
    first line, and the end); returns the list's path. The digest in the name means a worker can never
    read another run's list, and the offsets let it read just its unit's lines: memory and bytes per
    worker grow with the number of units, not of files."""
    lines = [json.dumps([f, n, v, u]) + "\n" for (f, n, v), u in zip(files, units)]
    text = "".join(lines)
    digest = hashlib.sha256(text.encode()).hexdigest()[:20]
    path = paths.join(work, f"inputs-{digest}.jsonl")
    offsets, pos = [], 0
    for line, u in zip(lines, units):
        if u == len(offsets):
            offsets.append(pos)
        pos += len(line.encode())
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets + [pos], np.int64))
    paths.write_bytes(path[:-len(".jsonl")] + ".offsets.npy", buf.getvalue())
    paths.write_text(path, text)
    return path


@functools.lru_cache(maxsize=4)
def _unit_offsets(listing: str) -> np.ndarray:
    with paths.Path(listing[:-len(".jsonl")] + ".offsets.npy").open("rb") as f:
        return np.load(f, allow_pickle=False)


@functools.lru_cache(maxsize=4096)
def _unit_files(listing: str, u: int) -> tuple[tuple[str, int, str], ...]:
    offsets = _unit_offsets(listing)
    (data,) = paths.read_ranges([(listing, int(offsets[u]), int(offsets[u + 1]))])
    out = []
    for line in data.decode("utf-8").splitlines():
        f, n, v, unit = json.loads(line)
        if unit != u:
            raise RuntimeError(f"{listing}: unit {u}'s lines hold unit {unit} (a damaged input list)")
        out.append((f, n, v))
    return tuple(out)


def unit_files(job: Job, u: int) -> tuple[tuple[str, int, str], ...]:
    """(path, size, version) of the input files of unit u, in order (read from WORK once per process)."""
    return _unit_files(job.listing, u)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return tokenizer_lib.load_tokenizer(path)


def save_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    paths.write_bytes(path, buf.getvalue())


def load_npz(path: str, *names: str) -> dict:
    """The named arrays of an .npz in WORK, reading only those members."""
    with paths.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
        return {name: npz[name] for name in names}


def settings_key(job: Job) -> list:
    """What a unit's tokens depend on besides its files."""
    return [CACHE_VERSION, job.tokenizer_sha256, job.fmt, job.on_error, list(job.licenses), job.near_dedupe,
            job.detect_language]


def cache_path(job: Job, u: int) -> str:
    """WORK/units/<u>-<key>.npz (`pmc<block>-<key>.npz` for a unit of PMC Cloud Service articles, whose
    number may shift between listings); its tokens are beside it, `.tokens` for `.npz`."""
    key = json.dumps([*settings_key(job), unit_files(job, u)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    block = pmc_block(job, u)
    name = f"{u:06d}-{digest}" if block is None else f"pmc{block:07d}-{digest}"
    return paths.join(job.work, "units", f"{name}.npz")


def reusable_articles(job: Job, u: int) -> dict:
    """For a unit of PMC Cloud Service articles: {(metadata path, version): (cache, first record, end)}
    of the articles that an earlier cache of the same block (an earlier listing's, made with the same
    settings) holds, read from that cache; {} for other units or when there is none."""
    block = pmc_block(job, u)
    if block is None:
        return {}
    folder = paths.join(job.work, "units")
    mine = cache_path(job, u)
    found = {}
    settings = json.dumps(settings_key(job))
    for name in paths.names_with_prefix(folder, f"pmc{block:07d}-"):  # one listing of this block's caches
        path = paths.join(folder, name)
        if not name.endswith(".npz") or path == mine:
            continue
        old = load_npz(path, "files", "entries", "settings")
        if str(old["settings"]) != settings:
            continue
        files = json.loads(str(old["files"]))
        entries = old["entries"]
        for i, (f, _, v) in enumerate(files):
            rs = np.flatnonzero(entries == i)
            if len(rs):
                found[(f, v)] = (path, int(rs[0]), int(rs[-1]) + 1)
    return found


def tokens_path(job: Job, u: int) -> str:
    return cache_path(job, u)[:-len(".npz")] + ".tokens"


# ----------------------------------------------------------------------------------------------------
# 1. read and tokenize one work unit
# ----------------------------------------------------------------------------------------------------


def text_hash(text: str) -> int:
    """A 63-bit hash of a document's normalized text (case-folded, whitespace collapsed): equal for
    exact duplicates up to case and spacing."""
    norm = " ".join(text.casefold().split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def tokenize_unit(job: Job, u: int) -> bool:
    """Tokenize unit u into its cache unless a finished cache exists; True when it did the work. The
    tokens are streamed to WORK as each batch is encoded; the .npz, written last, marks it finished.
    Per record the cache keeps its id, kind, token count, split key, text hash, source format and the
    input file it came from.

    A unit of PMC Cloud Service articles whose block an earlier listing also tokenized (a cache kept
    in WORK with --keep_work) takes every article whose metadata version is unchanged from that cache,
    tokens included, and fetches and tokenizes only the articles added or revised; the earlier cache
    is then removed. The result is the same as tokenizing the whole unit."""
    target = cache_path(job, u)
    if paths.exists(target):
        return False
    tok = load_tokenizer(job.tokenizer)
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    if eos is None:
        raise errors.DataError(f"{job.tokenizer}: the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
    files = unit_files(job, u)
    reuse = reusable_articles(job, u)
    stats = readers.ReadStats(files=len(files))
    cols: dict[str, list] = {k: [] for k in ("ids", "kinds", "lengths", "keys", "hashes", "sources", "entries",
                                             "bands")}
    if job.near_dedupe or job.detect_language:
        from biomedlm_jax.data import curation
    width = BANDS if job.near_dedupe else 0
    no_bands = (0,) * width  # a record's MinHash band keys until it is known to be a document
    batch: list[tuple[int, str]] = []  # (record number, text) waiting for encode_batch
    fresh = [i for i, (f, _, v) in enumerate(files) if (f, v) not in reuse]
    old_caches: dict[str, dict] = {}
    reused = 0
    paths.makedirs(paths.join(job.work, "units"))
    with paths.open_write(tokens_path(job, u)) as out:

        def flush():  # batches are encoded in record order, so the tokens file is in record order
            for (r, _), enc in zip(batch, tok.encode_batch([t for _, t in batch])):
                cols["lengths"][r] = len(enc.ids) + 1
                out.write(np.asarray(enc.ids + [eos], job.dtype).tobytes())
            batch.clear()

        def add(i: int, kind: str, doc: readers.Doc):
            r = len(cols["ids"])
            for k, v in (("ids", doc.id), ("keys", doc.key), ("lengths", 0), ("sources", readers.FORMATS.index(kind)),
                         ("hashes", 0), ("entries", i), ("bands", no_bands)):
                cols[k].append(v)
            drop = doc.drop
            if (job.detect_language and not drop and doc.text and doc.text.strip()
                    and not curation.is_english(doc.text)):
                drop = "language"
            if doc.text is None:
                cols["kinds"].append(DELETE)
            elif drop:
                cols["kinds"].append(DROPPED + readers.DROP_REASONS.index(drop))
            elif not doc.text.strip():
                cols["kinds"].append(EMPTY)
            else:
                cols["kinds"].append(DOC)
                cols["hashes"][r] = text_hash(doc.text)
                if job.near_dedupe:
                    cols["bands"][r] = tuple(curation.minhash_bands(doc.text).tolist())
                batch.append((r, doc.text))
                if len(batch) >= job.batch_docs:
                    flush()

        def copy(i: int) -> int:  # an unchanged article: its records and tokens from the earlier cache
            cache, a, b = reuse[(files[i][0], files[i][2])]
            if cache not in old_caches:
                old_caches[cache] = load_npz(cache, "ids", "kinds", "lengths", "keys", "hashes", "sources", "bands")
            old = old_caches[cache]
            flush()
            lengths = old["lengths"]
            first = int(lengths[:a].sum())
            n = int(lengths[a:b].sum())
            if n:
                src = cache[:-len(".npz")] + ".tokens"
                item = job.dtype.itemsize
                (data,) = paths.read_ranges([(src, first * item, (first + n) * item)])
                out.write(data)
            for k in ("ids", "kinds", "lengths", "keys", "hashes", "sources"):
                cols[k] += old[k][a:b].tolist()
            cols["bands"] += [tuple(row) for row in old["bands"][a:b].tolist()]
            cols["entries"] += [i] * (b - a)
            return b - a

        read = readers.read_unit([files[i][0] for i in fresh], stats, job.on_error, job.fmt, job.licenses,
                                 job.fetch_concurrency)
        pending = next(read, None)
        position = {f: i for i, (f, _, _) in enumerate(files)}
        for i in range(len(files)):
            if (files[i][0], files[i][2]) in reuse:
                reused += copy(i)
                continue
            while pending is not None and position[pending[0]] == i:
                add(i, *pending[1:])
                pending = next(read, None)
        flush()
    counts = stats.as_dict()
    save_npz(target, ids=np.asarray(cols["ids"], dtype=str), kinds=np.asarray(cols["kinds"], np.int8),
              lengths=np.asarray(cols["lengths"], np.int64), keys=np.asarray(cols["keys"], dtype=str),
              hashes=np.asarray(cols["hashes"], np.int64), sources=np.asarray(cols["sources"], np.int8),
              entries=np.asarray(cols["entries"], np.int64), files=np.asarray(json.dumps(files)),
              bands=np.asarray(cols["bands"], np.int64).reshape(len(cols["ids"]), width),
              settings=np.asarray(json.dumps(settings_key(job))), stats=np.asarray(json.dumps(counts)),
              reused=np.asarray(reused))
    for cache in {c for c, _, _ in reuse.values()}:  # superseded by this unit's cache
        paths.Path(cache).unlink(missing_ok=True)
        paths.Path(cache[:-len(".npz")] + ".tokens").unlink(missing_ok=True)
    return True
