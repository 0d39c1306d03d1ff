"""Document readers for the pretraining corpus: PubMed baseline XML, PubTator, JSONL, PMC JATS XML.

Every reader yields `(doc_id, text)` and streams: XML goes through `iterparse` and each article is
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

import contextlib
import dataclasses
import gzip
import json
import os
import tarfile
import xml.etree.ElementTree as ET
import zlib
from typing import Iterable, Iterator, Optional, Sequence

from biomedlm_jax.core.errors import DataError


@dataclasses.dataclass
class ReadStats:
    documents: int = 0  # yielded
    empty: int = 0  # no text after extraction
    duplicates: int = 0  # records replaced by another record of the same id
    deleted: int = 0  # ids removed by a PubMed <DeleteCitation> (prepare_data)
    errors_skipped: int = 0  # malformed records skipped with on_error="skip"
    non_utf8_lines: int = 0  # lines decoded with replacement characters
    files: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FORMATS = ("pubmed_xml", "pubtator", "jsonl", "jats", "pmc_tar", "text")


def list_files(patterns: str | Sequence[str]) -> list[tuple[str, int, str]]:
    """(path, size, version) of each input file, sorted per pattern and de-duplicated, in time linear in
    their number. A pattern is a file, a glob (`**` recurses) or a folder, local or on an object store
    (gs://...). A folder contributes the files below it whose format is recognised (LICENSE and
    README are skipped): by their first bytes for local files, by name on an object store, where
    opening each of millions of objects would cost a request each. A pattern matching nothing is an
    error naming it."""
    from biomedlm_jax.core import paths

    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        hits = paths.glob_files(pattern)
        remote = paths.is_remote(pattern)
        if paths.isdir(pattern) if remote else os.path.isdir(os.path.expanduser(pattern)):  # a folder
            hits = [h for h in hits if _recognised(h[0], sniff=not remote)]
        if not hits:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for h in hits:
            if h[0] not in seen:
                seen.add(h[0])
                out.append(h)
    return out


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


@contextlib.contextmanager
def _open_binary(path: str):
    """The decompressed bytes of a local or remote file (gzip by the `.gz` name)."""
    from biomedlm_jax.core import paths

    with paths.open_read(path) as raw:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        else:
            yield raw


# What a damaged gzip raises while it is read: cut short (EOFError), not gzip, or corrupt inside.
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _gzip_message(path: str, e: BaseException) -> str:
    return f"{path}: truncated or corrupt gzip ({type(e).__name__}: {e})"


def _lines(path: str, stats: ReadStats, on_error: str = "raise") -> Iterator[tuple[int, str]]:
    """(line number, text) with invalid UTF-8 replaced and counted; a damaged gzip ends the file."""
    lineno = 0
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("utf-8", errors="replace")
                    stats.non_utf8_lines += 1
                yield lineno, line.rstrip("\r\n")
        except GZIP_ERRORS as e:
            _fail(stats, on_error, _gzip_message(f"{path}:{lineno + 1}", e))


def _head(path: str, n: int = 4096) -> bytes:
    """Up to n first bytes, also of a gzip cut short (its damage is reported when the file is read)."""
    out = b""
    with _open_binary(path) as f:
        read = getattr(f, "read1", f.read)  # an object store's file objects have no read1
        try:
            while len(out) < n:
                chunk = read(n - len(out))
                if not chunk:
                    break
                out += chunk
        except GZIP_ERRORS as e:
            if not out:
                raise DataError(_gzip_message(path, e)) from e
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
            _fail(stats, on_error, f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            _fail(stats, on_error, f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            continue
        yield lineno, record


def read_jsonl(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[str, str]]:
    stats = stats if stats is not None else ReadStats()
    for lineno, record in json_lines(path, stats, on_error):
        text = record_text(record)
        if text is None:
            _fail(stats, on_error, f"{path}:{lineno}: expected an object with 'text' or 'title'/'abstract'")
            continue
        yield record_id(record, f"{os.path.basename(path)}:{lineno}"), text


def _fail(stats: ReadStats, on_error: str, message: str) -> None:
    if on_error != "skip":
        raise DataError(message + "  (pass --on_error=skip to skip such records)")
    stats.errors_skipped += 1


# ----------------------------------------------------------------------------------------------------
# PubTator
# ----------------------------------------------------------------------------------------------------


def read_pubtator(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[str, str]]:
    """`PMID|t|title`, `PMID|a|abstract`, tab-separated annotation lines, blank line between documents."""
    stats = stats if stats is not None else ReadStats()
    pmid, title, abstract = None, "", ""

    def flush():
        return (pmid, "\n".join(x for x in (title.strip(), abstract.strip()) if x)) if pmid is not None else None

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
            _fail(stats, on_error, f"{path}:{lineno}: not a PubTator line (expected 'PMID|t|', 'PMID|a|' or an annotation)")
    doc = flush()
    if doc:
        yield doc


# ----------------------------------------------------------------------------------------------------
# XML (PubMed baseline, PMC JATS)
# ----------------------------------------------------------------------------------------------------


def _text(elem) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def _parse(f, where: str, tags: set, stats: ReadStats, on_error: str):
    """Yields end-event elements of the XML stream `f` whose tag is in `tags`; malformed XML is named
    `where:line`. Errors of the stream below (gzip, tar) pass through to the caller."""
    try:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag in tags:
                yield elem
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        _fail(stats, on_error, f"{where}:{line}: malformed XML ({e})")


def _iterparse(path: str, tags: set, stats: ReadStats, on_error: str):
    """`_parse` over a file (gzip by its name); a damaged gzip names the file."""
    with _open_binary(path) as f:
        try:
            yield from _parse(f, path, tags, stats, on_error)
        except GZIP_ERRORS as e:
            _fail(stats, on_error, _gzip_message(path, e))


def pubmed_article(citation) -> tuple[Optional[str], str]:
    """(PMID, title + abstract) of a MedlineCitation element; labelled abstract sections are joined as
    'LABEL: text'."""
    pmid = citation.findtext("PMID")
    article = citation.find("Article")
    title = _text(article.find("ArticleTitle")) if article is not None else ""
    parts = []
    if article is not None:
        for sec in article.findall("Abstract/AbstractText"):
            body = _text(sec)
            label = sec.get("Label")
            if body:
                parts.append(f"{label}: {body}" if label else body)
    text = "\n".join(x for x in (title, " ".join(parts)) if x)
    return (pmid.strip() if pmid else None), text


def read_pubmed_xml(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise",
                    deletions: bool = False) -> Iterator[tuple[str, Optional[str]]]:
    """PubMed baseline/update files: PubmedArticleSet/PubmedArticle/MedlineCitation (gzip or plain).
    With `deletions`, each PMID of an update file's `<DeleteCitation>` is yielded as (pmid, None)."""
    stats = stats if stats is not None else ReadStats()
    for elem in _iterparse(path, {"MedlineCitation", "DeleteCitation"}, stats, on_error):
        if elem.tag == "DeleteCitation":
            pmids = [p.text.strip() for p in elem.findall("PMID") if p.text and p.text.strip()]
            elem.clear()
            if deletions:
                yield from ((pmid, None) for pmid in pmids)
            continue
        pmid, text = pubmed_article(elem)
        elem.clear()
        if pmid is None:
            _fail(stats, on_error, f"{path}: a MedlineCitation without a PMID")
            continue
        yield pmid, text


_JATS_SKIP = {"ref-list", "table-wrap", "table", "fig", "fig-group", "supplementary-material", "disp-formula",
              "inline-formula", "xref", "graphic", "media", "ack", "fn-group", "app-group"}


def _jats_paragraphs(elem) -> list[str]:
    out = []

    def walk(e):
        if e.tag in _JATS_SKIP:
            return
        if e.tag in ("p", "title"):
            out.append(_text_skipping(e))
            return
        for child in e:
            walk(child)

    walk(elem)
    return [p for p in out if p]


def _text_skipping(elem) -> str:
    parts = [elem.text or ""]
    for child in elem:
        if child.tag not in _JATS_SKIP:
            parts.append(_text_skipping(child))
        parts.append(child.tail or "")
    return " ".join("".join(parts).split())


def jats_article(article) -> tuple[Optional[str], str]:
    """(PMCID or PMID, title + abstract + body paragraphs) of a JATS <article>."""
    meta = article.find("front/article-meta")
    ids = {}
    if meta is not None:
        for aid in meta.findall("article-id"):
            ids[aid.get("pub-id-type")] = (aid.text or "").strip()
    doc_id = ids.get("pmc") or ids.get("pmcid") or ids.get("pmid")
    if doc_id and ids.get("pmc") and not doc_id.upper().startswith("PMC"):
        doc_id = "PMC" + doc_id
    title = _text_skipping(meta.find("title-group/article-title")) if meta is not None and meta.find("title-group/article-title") is not None else ""
    abstract = []
    if meta is not None:
        for ab in meta.findall("abstract"):
            abstract += _jats_paragraphs(ab)
    body = article.find("body")
    paragraphs = _jats_paragraphs(body) if body is not None else []
    return doc_id, "\n".join(x for x in [title, *abstract, *paragraphs] if x)


def read_jats(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[str, str]]:
    """PMC open-access JATS XML: one or more <article> elements per file."""
    stats = stats if stats is not None else ReadStats()
    yield from _jats_records(_iterparse(path, {"article"}, stats, on_error), os.path.basename(path))


def _jats_records(articles, fallback_id: str) -> Iterator[tuple[str, str]]:
    """(id, text) of each parsed <article>, freed once read; `fallback_id` for an article without ids."""
    for elem in articles:
        doc_id, text = jats_article(elem)
        elem.clear()
        yield doc_id or fallback_id, text


# What reading a damaged tar member raises: a cut archive, a corrupt gzip stream, a bad header
TAR_ERRORS = (tarfile.TarError, *GZIP_ERRORS)


def read_pmc_tar(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[str, str]]:
    """PMC's bulk packages: a tar archive (`.tar.gz`, `.tgz` or `.tar`) of JATS `.xml` / `.nxml` files,
    read member by member as one stream, never unpacked to disk; other members (PDFs, images) are
    passed over. Each article is a record keyed like `read_jats`'s (PMCID, else PMID; else
    `archive:member`). A member that is malformed XML is named `archive:member:line`; with
    on_error="skip" it is counted and the next member is read. A truncated or corrupt archive is named
    with the member being read when it broke; nothing after it can be read, so with "skip" the rest of
    the archive is counted as one error."""
    from biomedlm_jax.core import paths

    stats = stats if stats is not None else ReadStats()
    member = None
    with paths.open_read(path) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:  # a stream; gzip by its magic bytes
                for member in tar:
                    if not member.isfile() or not member.name.endswith((".xml", ".nxml")):
                        continue
                    where = f"{path}:{member.name}"
                    yield from _jats_records(_parse(tar.extractfile(member), where, {"article"}, stats, on_error),
                                             where)
                    member = None
        except TAR_ERRORS as e:
            at = f"{path}:{member.name}" if member is not None else path
            _fail(stats, on_error, f"{at}: truncated or corrupt archive ({type(e).__name__}: {e})")


def read_text(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[tuple[str, str]]:
    """Plain text: blank-line-separated documents."""
    stats = stats if stats is not None else ReadStats()
    buf, start = [], 1
    for lineno, line in _lines(path, stats, on_error):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            yield f"{os.path.basename(path)}:{start}", "\n".join(buf)
            buf = []
    if buf:
        yield f"{os.path.basename(path)}:{start}", "\n".join(buf)


READERS = {"pubmed_xml": read_pubmed_xml, "pubtator": read_pubtator, "jsonl": read_jsonl, "jats": read_jats,
           "pmc_tar": read_pmc_tar, "text": read_text}


def read_records(path: str, stats: ReadStats, on_error: str = "raise", fmt: str = "auto"
                 ) -> Iterator[tuple[str, Optional[str]]]:
    """One file's records in order: (id, text), or (id, None) where a PubMed update deletes the id."""
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind not in READERS:
        raise ValueError(f"format {kind!r}: choose from {sorted(READERS)} or auto")
    if kind == "pubmed_xml":
        return read_pubmed_xml(path, stats, on_error, deletions=True)
    return READERS[kind](path, stats, on_error)


def read_documents(files: Iterable[str], stats: Optional[ReadStats] = None, on_error: str = "raise",
                   fmt: str = "auto", dedupe: bool = True) -> Iterator[tuple[str, str]]:
    """(doc_id, text) over many files of any supported format: empty documents dropped, ids de-duplicated."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose raise or skip")
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    for path in files:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind not in READERS:
            raise ValueError(f"format {kind!r}: choose from {sorted(READERS)} or auto")
        stats.files += 1
        for doc_id, text in READERS[kind](path, stats, on_error):
            if not text.strip():
                stats.empty += 1
                continue
            if dedupe:
                if doc_id in seen:
                    stats.duplicates += 1
                    continue
                seen.add(doc_id)
            stats.documents += 1
            yield doc_id, text
