"""What every reader yields and counts (`Doc`, `ReadStats`), and the pieces readers share: opening
a file (gzip by name, local or on an object store), failing or skipping bad input, and streaming XML
with flat memory. `readers` re-exports the public names."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import xml.etree.ElementTree as ET
import zlib
from typing import NamedTuple, Optional

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
    # Curation: records left out, by reason (see `Doc.drop`); prepare_data adds duplicate_text
    no_abstract: int = 0  # a PubMed citation (or JSONL title/abstract record) with a title and no abstract
    retracted: int = 0  # PubMed "Retracted Publication", or PMC metadata is_retracted
    language: int = 0  # a JATS article whose xml:lang is not English
    license: int = 0  # a PMC Cloud Service article outside the chosen license subsets (or not open access)
    older_version: int = 0  # a PMC article version with a later version listed (counted when listed)
    withdrawn: int = 0  # a PMC article on the list of withdrawn articles given (counted when listed)
    duplicate_text: int = 0  # the same normalized text as an earlier document (prepare_data, across sources)
    reused: int = 0  # PMC records taken from an earlier listing's work cache, not fetched again (prepare_data)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FORMATS = ("pubmed_xml", "pubtator", "jsonl", "jats", "pmc_tar", "pmc_cloud", "text")
DROP_REASONS = ("no_abstract", "retracted", "language", "license")


class Doc(NamedTuple):
    """One record of an input file, as `read_records` yields it.

    - `id`: PMID, `PMC...` or another id; a later record of the same id replaces an earlier one.
    - `text`: the document; None when a PubMed update deletes the id.
    - `key`: the article this record belongs to, for the train/validation split: the PMID where the
      record names one (a JATS `pub-id-type="pmid"`), else the id. An abstract and its full text then
      share a key, and hence a split.
    - `drop`: why curation leaves the record out ("" = kept): one of DROP_REASONS."""
    id: str
    text: Optional[str]
    key: str = ""
    drop: str = ""


def make_doc(doc_id: str, text: Optional[str], key: str = "", drop: str = "") -> Doc:
    return Doc(doc_id, text, key or doc_id, drop)


@contextlib.contextmanager
def open_binary(path: str):
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


def gzip_message(path: str, e: BaseException) -> str:
    return f"{path}: truncated or corrupt gzip ({type(e).__name__}: {e})"


def fail(stats: ReadStats, on_error: str, message: str) -> None:
    if on_error != "skip":
        raise DataError(message + "  (pass --on_error=skip to skip such records)")
    stats.errors_skipped += 1


def xml_text(elem) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def parse_xml(f, where: str, tags: set, stats: ReadStats, on_error: str, free: frozenset = frozenset()):
    """Yields end-event elements of the XML stream `f` whose tag is in `tags`; malformed XML is named
    `where:line`. Once an element whose tag is in `free` has ended (and was yielded, if asked for),
    everything read so far is dropped from the tree (the root's children), so memory stays flat however
    many records a file holds: clearing an element alone leaves it, empty, in its parent. Errors of the
    stream below (gzip, tar) pass through to the caller."""
    root = None
    try:
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem
            if event != "end":
                continue
            if elem.tag in tags:
                yield elem
            if elem.tag in free:
                root.clear()
    except ET.ParseError as e:
        line = e.position[0] if getattr(e, "position", None) else "?"
        fail(stats, on_error, f"{where}:{line}: malformed XML ({e})")


def iterparse_file(path: str, tags: set, stats: ReadStats, on_error: str, free: frozenset = frozenset()):
    """`parse_xml` over a file (gzip by its name); a damaged gzip names the file."""
    with open_binary(path) as f:
        try:
            yield from parse_xml(f, path, tags, stats, on_error, free)
        except GZIP_ERRORS as e:
            fail(stats, on_error, gzip_message(path, e))
