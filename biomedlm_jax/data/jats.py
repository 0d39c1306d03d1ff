"""PMC JATS XML: the text of an `<article>` (title, abstracts, body; citation debris removed, figure and
table references labelled), one or more articles per file (`read_jats`), and PMC's legacy bulk packages
(`read_pmc_tar`, a tar of articles read member by member). `readers` re-exports these."""
from __future__ import annotations

import os
import re
import tarfile
from typing import Iterator, Optional

from biomedlm_jax.data.records import (GZIP_ERRORS, Doc, ReadStats, make_doc, fail, iterparse_file, parse_xml,
                                       xml_text)


# JATS elements whose text is not running prose: references, tables, figures, display formulas,
# supplements, acknowledgements, footnotes, appendices. Inline formulas keep their text.
_JATS_SKIP = {"ref-list", "table-wrap", "table", "fig", "fig-group", "supplementary-material", "disp-formula",
              "graphic", "inline-graphic", "media", "ack", "fn-group", "app-group"}
_XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
_SKIP_ABSTRACTS = {"graphical", "teaser", "toc"}  # abstract-type values that are not an abstract's prose
# What a citation leaves behind once its xrefs are gone: brackets holding only separators, and runs of
# separators before punctuation ("risk , ." → "risk.")
_SEP = r"(?:[,;\u2013\u2014-]|and)"
_EMPTY_BRACKETS = re.compile(r"\s*[(\[]\s*(?:" + _SEP + r"\s*)*[)\]]")
_LOOSE_SEPARATORS = re.compile(r"\s*(?:[,;]\s*)+(?=[.,;:)\]]|$)")
_ONLY_SEPARATORS = re.compile(r"^\s*(?:" + _SEP + r"\s*)*$")


def _english(lang: Optional[str]) -> bool:
    """True for no language given or an English tag (en, en-US, EN)."""
    return not lang or lang.strip().lower().split("-")[0] == "en"


class _Jats:
    """Text of one JATS article: citation references go with their brackets and separators; figure,
    table and other references keep their text, or the target's label ("Fig. 2") when empty."""

    def __init__(self, article):
        self.labels = {}
        for e in article.iter():
            if e.get("id") and e.find("label") is not None:
                self.labels[e.get("id")] = xml_text(e.find("label"))

    def paragraphs(self, elem) -> list[str]:
        out = []

        def walk(e):
            if e.tag in _JATS_SKIP:
                return
            if e.tag in ("p", "title"):
                out.append(self.text(e))
                return
            for child in e:
                walk(child)

        walk(elem)
        return [p for p in out if p]

    def text(self, elem) -> str:
        raw, _ = self._inline(elem)
        text = " ".join(raw.split())
        text = _EMPTY_BRACKETS.sub("", text)
        text = _LOOSE_SEPARATORS.sub("", text)
        return " ".join(text.split())

    def _inline(self, elem) -> tuple[str, bool]:
        """(text, whether a citation was removed inside)."""
        parts, cited = [elem.text or ""], False
        for child in elem:
            if child.tag == "xref":
                if child.get("ref-type") == "bibr":
                    cited = True
                else:
                    label = xml_text(child) or self.labels.get((child.get("rid") or "").split(" ")[0], "")
                    parts.append(label)
            elif child.tag not in _JATS_SKIP:
                inner, inner_cited = self._inline(child)
                if inner_cited and _ONLY_SEPARATORS.match(inner):
                    inner = ""  # <sup><xref>1</xref>,<xref>2</xref></sup>: nothing of it is prose
                cited |= inner_cited
                parts.append(inner)
            parts.append(child.tail or "")
        return "".join(parts), cited


def jats_doc(article, fallback_id: str = "") -> Doc:
    """The `Doc` of a JATS <article>: id PMCID (else PMID, else `fallback_id`), split key its PMID when
    it has one. Dropped (language) when the article's xml:lang is not English. Abstracts in another
    language and graphical / teaser abstracts are left out of the text."""
    meta = article.find("front/article-meta")
    ids = {}
    if meta is not None:
        for aid in meta.findall("article-id"):
            ids[aid.get("pub-id-type")] = (aid.text or "").strip()
    doc_id = ids.get("pmc") or ids.get("pmcid") or ids.get("pmid")
    if doc_id and (ids.get("pmc") or ids.get("pmcid")) and not doc_id.upper().startswith("PMC"):
        doc_id = "PMC" + doc_id
    doc_id = doc_id or fallback_id
    jats = _Jats(article)
    title_el = meta.find("title-group/article-title") if meta is not None else None
    title = jats.text(title_el) if title_el is not None else ""
    abstract = []
    if meta is not None:
        for ab in meta.findall("abstract"):
            if ab.get("abstract-type") in _SKIP_ABSTRACTS or not _english(ab.get(_XML_LANG)):
                continue
            abstract += jats.paragraphs(ab)
    body = article.find("body")
    paragraphs = jats.paragraphs(body) if body is not None else []
    text = "\n".join(x for x in [title, *abstract, *paragraphs] if x)
    drop = "" if _english(article.get(_XML_LANG)) else "language"
    return make_doc(doc_id, text, ids.get("pmid", ""), drop)


def read_jats(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[Doc]:
    """PMC open-access JATS XML: one or more <article> elements per file."""
    stats = stats if stats is not None else ReadStats()
    yield from jats_records(iterparse_file(path, {"article"}, stats, on_error, frozenset({"article"})),
                             os.path.basename(path))


def jats_records(articles, fallback_id: str) -> Iterator[Doc]:
    """The Doc of each parsed <article>, freed once read; `fallback_id` for an article without ids."""
    for elem in articles:
        doc = jats_doc(elem, fallback_id)
        elem.clear()
        yield doc


# What reading a damaged tar member raises: a cut archive, a corrupt gzip stream, a bad header
TAR_ERRORS = (tarfile.TarError, *GZIP_ERRORS)


def read_pmc_tar(path: str, stats: Optional[ReadStats] = None, on_error: str = "raise") -> Iterator[Doc]:
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
                    yield from jats_records(parse_xml(tar.extractfile(member), where, {"article"}, stats, on_error,
                                                    frozenset({"article"})), where)
                    member = None
        except TAR_ERRORS as e:
            at = f"{path}:{member.name}" if member is not None else path
            fail(stats, on_error, f"{at}: truncated or corrupt archive ({type(e).__name__}: {e})")
