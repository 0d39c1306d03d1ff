"""Document readers for the pretraining corpus: PubMed baseline XML, PubTator, JSONL, PMC JATS XML
(data/jats.py), PMC's Cloud Service (data/pmc_cloud.py); what they yield is in data/records.py.

Every reader yields a `Doc` (id, text, split key, curation verdict) and streams: XML goes through `iterparse` and each article is
freed once read, so a 30 GB baseline file never sits in memory. A document is title + abstract
(PubMed / PubTator / JSONL) or title + abstract + body paragraphs (PMC JATS, without references,
tables and figures). Ids are PMIDs, or `PMC...` for full texts, and survive tokenization and packing
in the side index (see input_pipeline / prepare_data), never in the token stream.

Bad input raises `DataError` naming the file and line (or record). With `on_error="skip"`, the bad
record is skipped and counted in `ReadStats` instead. For XML that means the rest of that file, since
a parser cannot resynchronise after malformed XML; a truncated or corrupt `.gz` is named the same way.
Empty documents, duplicate ids (`read_documents` keeps the first copy; `prepare_data` applies PubMed's
update semantics instead: the latest record wins and `<DeleteCitation>` removes) and lines that are not
valid UTF-8 (decoded with U+FFFD replacement characters) are counted.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Iterator, Optional, Sequence

from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data.jats import jats_records, read_jats, read_pmc_tar
# DROP_REASONS, FORMATS, Doc, ReadStats: re-exported, the names callers know readers by
from biomedlm_jax.data.records import (DROP_REASONS, FORMATS, GZIP_ERRORS, Doc, ReadStats,  # noqa: F401
                                       fail, gzip_message, iterparse_file, make_doc, open_binary, parse_xml, xml_text)


def list_files(patterns: str | Sequence[str]) -> list[tuple[str, int, str]]:
    """(path, size, version) of each input file, sorted per pattern and de-duplicated, in time linear in
    their number. A pattern is a file, a glob (`**` recurses) or a folder, local or on an object store
    (gs://..., s3://...). A folder contributes the files below it whose format is recognised (LICENSE and
    README are skipped): by their first bytes for local files, by name on an object store, where
    opening each of millions of objects would cost a request each. A pattern matching nothing is an
    error naming it. PMC Cloud Service inputs are listed by `list_inputs`'s rules (this returns its files)."""
    return list_inputs(patterns)[0]


def list_inputs(patterns: str | Sequence[str], withdrawn: Optional[set] = None
                ) -> tuple[list[tuple[str, int, str]], dict]:
    """`list_files`, and how many PMC article versions were left out when listed: {"older_version": n
    (a later version is listed), "withdrawn": n (the PMCID is in `withdrawn`)}.

    PMC Cloud Service inputs (data/pmc_cloud.py): a folder on an object store with an
    `inventory-reports/` (the bucket itself: `s3://pmc-oa-opendata/`) is listed from its newest
    inventory, not object by object; a glob or folder whose files include article metadata objects
    (`metadata/PMCn.v.json`, `PMCn.v/PMCn.v.json`) contributes those alone (the XML, text and media
    beside them are reached through them). Of each PMCID only the latest version is kept, ordered by
    PMCID."""
    from biomedlm_jax.core import paths
    from biomedlm_jax.data import pmc_cloud

    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out: list[tuple[str, int, str]] = []
    articles: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        remote = paths.is_remote(pattern)
        folder = paths.isdir(pattern) if remote else os.path.isdir(os.path.expanduser(pattern))
        if folder and pmc_cloud.has_inventory(pattern):
            hits = pmc_cloud.list_inventory(pattern)
        else:
            hits = paths.glob_files(pattern)
        meta = [h for h in hits if pmc_cloud.is_metadata(h[0])]
        if meta:
            hits = meta
        elif folder:
            hits = [h for h in hits if _recognised(h[0], sniff=not remote)]
        if not hits:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for h in hits:
            if h[0] not in seen:
                seen.add(h[0])
                (articles if meta else out).append(h)
    counts = {"older_version": 0, "withdrawn": 0}
    if articles:
        latest, counts["older_version"] = pmc_cloud.latest_versions(articles)
        if withdrawn:
            latest, counts["withdrawn"] = pmc_cloud.without(latest, withdrawn)
        out += latest
    return out, counts


def expand_files(patterns: str | Sequence[str]) -> list[str]:
    """Comma-separated globs / files / folders (or a list of them) -> the files, as `list_files`."""
    return [path for path, _, _ in list_files(patterns)]


# By name alone (no need to open the file): what a folder on an object store contributes
_NAMED = (".xml", ".nxml", ".jsonl", ".pubtator", ".PubTator.txt", ".pubtator.txt", ".tar", ".tgz")


def _recognised(path: str, sniff: bool = True) -> bool:
    if not sniff:
        name = path[:-3] if path.endswith(".gz") else path
        return name.endswith(_NAMED)
    try:
        detect_format(path)
        return True
    except DataError:
        return False


def _lines(path: str, stats: ReadStats, on_error: str = "raise") -> Iterator[tuple[int, str]]:
    """(line number, text) with invalid UTF-8 replaced and counted; a damaged gzip ends the file."""
    lineno = 0
    with open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    stats.non_utf8_lines += 1
                yield lineno, line.rstrip("\r\n")
        except GZIP_ERRORS as e:
            fail(stats, on_error, gzip_message(f"{path}:{lineno + 1}", e))


def _head(path: str, n: int = 4096) -> bytes:
    """Up to n first bytes, also of a gzip cut short (its damage is reported when the file is read)."""
    out = b""
    with open_binary(path) as f:
        read = getattr(f, "read1", f.read)  # an object store's file objects have no read1
        try:
            while len(out) < n:
                chunk = read(n - len(out))
                if not chunk:
                    break
                out += chunk
        except GZIP_ERRORS as e:
            if not out:
                raise DataError(gzip_message(path, e)) from e
    return out


def detect_format(path: str) -> str:
    """By extension, then by the first bytes (XML root element, PubTator `id|t|`, JSON object).
    Plain text is never guessed (a LICENSE.txt is not corpus); ask for it with fmt="text"."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".tar", ".tgz")):
        return "pmc_tar"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith((".pubtator", ".PubTator.txt", ".pubtator.txt")):
        return "pubtator"
    head = _head(path).decode("utf-8", errors="replace")
    stripped = head.lstrip()
    if stripped.startswith("<") or name.endswith((".xml", ".nxml")):
        if "<PubmedArticleSet" in head or "<PubmedArticle" in head or "<MedlineCitation" in head:
            return "pubmed_xml"
        if "<article" in head:
            return "jats"
        raise DataError(f"{path}: XML that is neither a PubmedArticleSet nor a JATS <article>")
    first = stripped.split("\n", 1)[0]
    if first.startswith("{"):
        return "jsonl"
    parts = first.split("|")
    if len(parts) >= 3 and parts[1] in ("t", "a"):
        return "pubtator"
    raise DataError(f"{path}: cannot tell the format (expected .jsonl, PubTator, PubMed XML or JATS XML; "
                    "plain text needs --format=text)")


# ----------------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------------


def record_text(record: dict) -> Optional[str]:
    """`text`, or `title` + newline + `abstract` (either may be missing). None when neither exists."""
    if "text" in record:
        return str(record["text"] or "")
    if "title" in record or "abstract" in record:
        return "\n".join(str(record[k]).strip() for k in ("title", "abstract") if record.get(k)).strip()
    return None


def record_id(record: dict, fallback: str) -> str:
    for key in ("pmid", "pmcid", "id", "doc_id"):
        if record.get(key) not in (None, ""):
            return str(record[key])
    return fallback


def read_json(path: str):
    """A whole JSON file (local or on an object store); invalid JSON is a DataError naming the file and line."""
    from biomedlm_jax.core import paths

    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def json_lines(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSONL file. A line that is not valid JSON, or not
    an object, is a DataError naming file:line, or skipped and counted with on_error="skip"."""
    stats = stats if stats is not None else ReadStats()
    for lineno, line in _lines(path, stats, on_error):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(stats, on_error, f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            fail(stats, on_error, f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            continue
        yield lineno, record


def read_jsonl(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[Doc]:
    """A record with `title` and no `abstract` (nor `text`) is a citation without an abstract: dropped.
    Its split key is its `pmid` when it has one."""
    stats = stats if stats is not None else ReadStats()
    for lineno, record in json_lines(path, stats, on_error):
        text = record_text(record)
        if text is None:
            fail(stats, on_error, f"{path}:{lineno}: expected an object with 'text' or 'title'/'abstract'")
            continue
        doc_id = record_id(record, f"{os.path.basename(path)}:{lineno}")
        drop = "no_abstract" if "text" not in record and record.get("title") and not record.get("abstract") else ""
        yield make_doc(doc_id, text, str(record.get("pmid") or ""), drop)


# ----------------------------------------------------------------------------------------------------
# PubTator
# ----------------------------------------------------------------------------------------------------


def read_pubtator(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[Doc]:
    """`PMID|t|title`, `PMID|a|abstract`, tab-separated annotation lines, blank line between documents.
    A title without an abstract is dropped (no_abstract)."""
    stats = stats if stats is not None else ReadStats()
    pmid, title, abstract = None, "", ""

    def flush():
        if pmid is None:
            return None
        text = "\n".join(x for x in (title.strip(), abstract.strip()) if x)
        return make_doc(pmid, text, drop="no_abstract" if title.strip() and not abstract.strip() else "")

    for lineno, line in _lines(path, stats, on_error):
        if not line.strip():
            doc = flush()
            if doc:
                yield doc
            pmid, title, abstract = None, "", ""
            continue
        head = line.split("|", 2)
        if len(head) == 3 and head[1] in ("t", "a") and "\t" not in head[0]:
            if pmid is not None and head[0] != pmid:
                doc = flush()  # a document without the blank separator line
                if doc:
                    yield doc
                title = abstract = ""
            pmid = head[0]
            if head[1] == "t":
                title = head[2]
            else:
                abstract = head[2]
        elif "\t" in line and pmid is not None and line.split("\t", 1)[0] == pmid:
            continue  # an annotation or relation line
        else:
            fail(stats, on_error, f"{path}:{lineno}: not a PubTator line (expected 'PMID|t|', 'PMID|a|' or an annotation)")
    doc = flush()
    if doc:
        yield doc


# ----------------------------------------------------------------------------------------------------
# XML (PubMed baseline, PMC JATS)
# ----------------------------------------------------------------------------------------------------


RETRACTED = "Retracted Publication"  # PubMed's publication type of an article that was retracted


def pubmed_citation(citation) -> tuple[Optional[str], str, str]:
    """(PMID, title + abstract, why it is dropped or "") of a MedlineCitation element: no_abstract for a
    title without an abstract, retracted for a "Retracted Publication". Labelled abstract sections are
    joined as 'LABEL: text'. Only `Article/Abstract` is read: PubMed's English abstract. `OtherAbstract`
    (an abstract in another language, or a publisher's second abstract) is left out; PubMed's
    `Language` is the article's language, not the abstract's, so it decides nothing here."""
    pmid = citation.findtext("PMID")
    article = citation.find("Article")
    title = xml_text(article.find("ArticleTitle")) if article is not None else ""
    parts = []
    types = set()
    if article is not None:
        for sec in article.findall("Abstract/AbstractText"):
            body = xml_text(sec)
            label = sec.get("Label")
            if body:
                parts.append(f"{label}: {body}" if label else body)
        types = {(t.text or "").strip() for t in article.findall("PublicationTypeList/PublicationType")}
    text = "\n".join(x for x in (title, " ".join(parts)) if x)
    drop = "retracted" if RETRACTED in types else ("no_abstract" if title and not parts else "")
    return (pmid.strip() if pmid else None), text, drop


def read_pubmed_xml(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise",
                    deletions: bool = False) -> Iterator[Doc]:
    """PubMed baseline/update files: PubmedArticleSet/PubmedArticle/MedlineCitation (gzip or plain).
    With `deletions`, each PMID of an update file's `<DeleteCitation>` is yielded with text None.
    Memory does not grow with the file: each PubmedArticle is dropped from the tree once read."""
    stats = stats if stats is not None else ReadStats()
    free = frozenset({"PubmedArticle", "PubmedBookArticle", "DeleteCitation"})
    for elem in iterparse_file(path, {"MedlineCitation", "DeleteCitation"}, stats, on_error, free):
        if elem.tag == "DeleteCitation":
            pmids = [p.text.strip() for p in elem.findall("PMID") if p.text and p.text.strip()]
            if deletions:
                yield from (make_doc(pmid, None) for pmid in pmids)
            continue
        pmid, text, drop = pubmed_citation(elem)
        if pmid is None:
            fail(stats, on_error, f"{path}: a MedlineCitation without a PMID")
            continue
        yield make_doc(pmid, text, drop=drop)


def read_text(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[Doc]:
    """Plain text: blank-line-separated documents."""
    stats = stats if stats is not None else ReadStats()
    buf, start = [], 1
    for lineno, line in _lines(path, stats, on_error):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            yield make_doc(f"{os.path.basename(path)}:{start}", "\n".join(buf))
            buf = []
    if buf:
        yield make_doc(f"{os.path.basename(path)}:{start}", "\n".join(buf))


def read_pmc_cloud(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise",
                   licenses: Sequence[str] = ("oa_comm",), fetched=None) -> Iterator[Doc]:
    """One article of the PMC Cloud Service, given its metadata object (data/pmc_cloud.py): a Doc of
    its JATS XML, or a dropped Doc (license, retracted) without fetching the XML. `fetched` is what
    `pmc_cloud.fetch` returned when the unit fetched it ahead (concurrently)."""
    from biomedlm_jax.data import pmc_cloud

    stats = stats if stats is not None else ReadStats()
    acc, _ = pmc_cloud.article_version(path)
    meta, data, drop = fetched if fetched is not None else pmc_cloud.fetch(path, licenses)
    if drop:
        yield make_doc(acc, "", str(meta.get("pmid") or ""), drop)
        return
    where = pmc_cloud.xml_path(path)
    errors_before = stats.errors_skipped
    docs = list(jats_records(parse_xml(io.BytesIO(data), where, {"article"}, stats, on_error, frozenset({"article"})),
                              acc))
    if not docs:
        if stats.errors_skipped == errors_before:  # (malformed XML skipped is counted once, by parse_xml)
            fail(stats, on_error, f"{where}: no JATS <article> in it")
        return
    doc = docs[0]
    # the id is the PMCID without its version, so a newer version replaces an older one everywhere; the
    # split key is the PMID of the metadata, else the one the XML names, else that id
    pmid = str(meta.get("pmid") or "") or (doc.key if doc.key != doc.id else "")
    yield make_doc(acc, doc.text, pmid, doc.drop)


READERS = {"pubmed_xml": read_pubmed_xml, "pubtator": read_pubtator, "jsonl": read_jsonl, "jats": read_jats,
           "pmc_tar": read_pmc_tar, "pmc_cloud": read_pmc_cloud, "text": read_text}
FETCH_CONCURRENCY = 32  # requests in flight per work unit for PMC Cloud Service articles


def file_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        if fmt not in READERS:
            raise ValueError(f"format {fmt!r}: choose from {sorted(READERS)} or auto")
        return fmt
    from biomedlm_jax.data import pmc_cloud

    return "pmc_cloud" if pmc_cloud.is_metadata(path) else detect_format(path)


def read_records(path: str, stats: ReadStats, on_error: str = "raise", fmt: str = "auto",
                 licenses: Sequence[str] = ("oa_comm",), fetched=None) -> Iterator[Doc]:
    """One file's records in order, as `Doc`s: text None where a PubMed update deletes the id, `drop`
    naming why curation leaves a record out."""
    return _read_kind(file_format(path, fmt), path, stats, on_error, licenses, fetched)


def _read_kind(kind: str, path: str, stats: ReadStats, on_error: str, licenses: Sequence[str],
               fetched=None) -> Iterator[Doc]:
    if kind == "pubmed_xml":
        return read_pubmed_xml(path, stats, on_error, deletions=True)
    if kind == "pmc_cloud":
        return read_pmc_cloud(path, stats, on_error, licenses, fetched)
    return READERS[kind](path, stats, on_error)


def read_unit(files: Sequence[str], stats: ReadStats, on_error: str = "raise", fmt: str = "auto",
              licenses: Sequence[str] = ("oa_comm",), concurrency: int = FETCH_CONCURRENCY
              ) -> Iterator[tuple[str, str, Doc]]:
    """(file, its format, Doc) over many files in order. PMC Cloud Service articles, one or two small objects each,
    are fetched ahead on `concurrency` threads (at most 2 × concurrency waiting), so a unit of a
    thousand articles costs about a thousand round trips divided by `concurrency`, not a thousand.
    A file that cannot be read raises DataError naming it, or, with on_error="skip", is counted."""
    import concurrent.futures as cf
    from collections import deque

    from biomedlm_jax.data import pmc_cloud

    cloud = [fmt == "pmc_cloud" or (fmt == "auto" and pmc_cloud.is_metadata(f)) for f in files]
    pool = cf.ThreadPoolExecutor(max(1, concurrency)) if any(cloud) else None
    ahead: deque = deque()
    nxt = 0

    def top_up():  # `ahead` holds the fetches of files i.. (in order), at most 2 × concurrency
        nonlocal nxt
        while pool is not None and nxt < len(files) and len(ahead) < 2 * concurrency:
            if cloud[nxt]:
                ahead.append((nxt, pool.submit(pmc_cloud.fetch, files[nxt], licenses)))
            nxt += 1

    try:
        for i, path in enumerate(files):
            top_up()
            fetched = None
            if ahead and ahead[0][0] == i:
                _, future = ahead.popleft()
                try:
                    fetched = future.result()
                except DataError:
                    if on_error != "skip":
                        raise
                    stats.errors_skipped += 1
                    continue
            try:
                kind = "pmc_cloud" if cloud[i] else file_format(path, fmt)  # (a format unknown is a DataError)
                for doc in _read_kind(kind, path, stats, on_error, licenses, fetched):
                    yield path, kind, doc
            except DataError:
                if on_error != "skip":  # the file could not even be opened as its format
                    raise
                stats.errors_skipped += 1
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def read_documents(files: Iterable[str], stats: Optional[ReadStats] = None, on_error: str = "raise",
                   fmt: str = "auto", dedupe: bool = True, licenses: Sequence[str] = ("oa_comm",)
                   ) -> Iterator[tuple[str, str]]:
    """(doc_id, text) over many files of any supported format: empty documents and those curation
    leaves out (counted by reason) dropped, ids de-duplicated (the first copy kept)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose raise or skip")
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    files = list(files)
    stats.files += len(files)
    for _, _, doc in read_unit(files, stats, on_error, fmt, licenses):
        if doc.text is None:
            continue
        if doc.drop:
            setattr(stats, doc.drop, getattr(stats, doc.drop) + 1)
            continue
        if not doc.text.strip():
            stats.empty += 1
            continue
        if dedupe:
            if doc.id in seen:
                stats.duplicates += 1
                continue
            seen.add(doc.id)
        stats.documents += 1
        yield doc.id, doc.text
