"""PubMed Central's Cloud Service as an input: the public S3 bucket `s3://pmc-oa-opendata`.

Since August 2026 this bucket is where PMC full text comes from in bulk (the FTP bulk packages are
gone). NLM's `README.txt` in the bucket describes the layout (docs/data.md quotes it):

    s3://pmc-oa-opendata/
      PMC10009416.1/                    one prefix per article version (PMCID.version)
        PMC10009416.1.xml               JATS XML
        PMC10009416.1.txt               plain text extracted from it
        PMC10009416.1.json              metadata (below), also under metadata/
        PMC10009416.1.pdf, images, supplements (where licences allow)
      metadata/PMC10009416.1.json       pmcid, version, pmid, doi, title, citation, is_pmc_openaccess,
                                        is_manuscript, is_historical_ocr, is_retracted, license_code,
                                        xml_url / text_url / pdf_url (with ?md5=DIGEST), media_urls
      inventory-reports/pmc-oa-opendata/metadata/<YYYY-MM-DDTHH-MMZ>/manifest.json
                                        a daily S3 Inventory: CSV.gz files of (bucket, key of each
                                        metadata JSON, last modified, ETag)

An input is a metadata object (`.../metadata/PMCn.v.json` or `.../PMCn.v/PMCn.v.json`); its article
is the XML beside it (`.../PMCn.v/PMCn.v.xml`, derived from the listing's path, so mirrors and other
buckets work too). The launcher lists them (`list_inventory`: the bucket's newest inventory when the
input is a folder that has one, else a listing of the glob or folder), keeps the latest version of
each PMCID (`latest_versions`), and orders them by PMCID. Reading one (`fetch`) costs two requests:
the metadata, then, for an article that is kept, its XML, whose MD5 is checked against the metadata.

Curation from the metadata: an article outside the chosen licence subsets, or not in the open-access
subset, is dropped as `license`; `is_retracted` drops it as `retracted`.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
from typing import Optional, Sequence

from biomedlm_jax.core import paths
from biomedlm_jax.core.errors import DataError

INVENTORY = "inventory-reports"

# The licence subsets NLM names (pmc.ncbi.nlm.nih.gov/tools/pmcaws), by the metadata's license_code.
# oa_comm: Creative Commons licences that allow commercial reuse (the eSearch filter NLM's README gives
# for "articles that permit commercial reuse": CC0, CC BY, CC BY-SA, CC BY-ND); oa_noncomm: the
# non-commercial ones. phe_timebound: NLM's README lists no code for the COVID-19 public-health-
# emergency licences; an open-access article whose code is neither Creative Commons nor TDM is taken
# as one (our reading, not NLM's statement).
CC_COMMERCIAL = frozenset({"CC0", "CC BY", "CC BY-SA", "CC BY-ND"})
CC_NONCOMMERCIAL = frozenset({"CC BY-NC", "CC BY-NC-SA", "CC BY-NC-ND"})
SUBSETS = ("oa_comm", "oa_noncomm", "phe_timebound")
DEFAULT_LICENSES = ("oa_comm",)

_META = re.compile(r"(?:^|/)(?:metadata/)?(PMC\d+)\.(\d+)\.json$")
_IN_PREFIX = re.compile(r"(PMC\d+)\.(\d+)/\1\.\2\.json$")


def article_version(path: str) -> Optional[tuple[str, int]]:
    """(PMCID, version) of a metadata object's path, or None when the path is not one."""
    name = path.rsplit("/", 2)
    m = _IN_PREFIX.search(path) or (_META.search(path) if len(name) >= 2 and name[-2] == "metadata" else None)
    return (m.group(1), int(m.group(2))) if m else None


def is_metadata(path: str) -> bool:
    return article_version(path) is not None


def xml_path(meta_path: str) -> str:
    """The article XML of a metadata object: `ROOT/PMCn.v/PMCn.v.xml` for `ROOT/metadata/PMCn.v.json`
    or `ROOT/PMCn.v/PMCn.v.json`."""
    acc, version = article_version(meta_path)
    name = f"{acc}.{version}"
    head = meta_path.rsplit("/", 2)[0]
    return f"{head}/{name}/{name}.xml"


def subset(meta: dict) -> str:
    """The licence subset of an article version's metadata: oa_comm, oa_noncomm, phe_timebound, or
    "" (not in the open-access subset: author manuscripts under TDM, for instance)."""
    if meta.get("is_pmc_openaccess") is not True:
        return ""
    code = str(meta.get("license_code") or "").strip().upper()
    if code in CC_COMMERCIAL:
        return "oa_comm"
    if code in CC_NONCOMMERCIAL:
        return "oa_noncomm"
    if code and code != "TDM":
        return "phe_timebound"
    return ""


def parse_licenses(value: str | Sequence[str]) -> tuple[str, ...]:
    """`oa_comm`, `oa_comm,phe_timebound`, `all` → the subsets, sorted; anything else is an error."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if items == ["all"]:
        return SUBSETS
    bad = [v for v in items if v not in SUBSETS]
    if bad or not items:
        raise ValueError(f"--pmc_license={','.join(items)}: choose from {', '.join(SUBSETS)} (comma-separated) or all")
    return tuple(sorted(set(items)))


def verdict(meta: dict, licenses: Sequence[str]) -> str:
    """Why an article version is left out ("" when it is kept): license, then retracted."""
    if subset(meta) not in licenses:
        return "license"
    if meta.get("is_retracted") is True:
        return "retracted"
    return ""


def _md5(url: str) -> str:
    m = re.search(r"[?&]md5=([0-9a-fA-F]+)", url or "")
    return m.group(1).lower() if m else ""


def _read(path: str) -> bytes:
    """An object's bytes; a missing object or a refused request is a DataError naming it."""
    try:
        return paths.read_bytes(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: listed but not found (a listing older than the bucket, or a removed "
                        "article version)") from e
    except PermissionError as e:
        raise PermissionError(f"{path}: access refused ({e}). Public buckets are read anonymously when no "
                              "AWS credentials are found; check AWS_ENDPOINT_URL and the bucket's policy") from e


def fetch(meta_path: str, licenses: Sequence[str]) -> tuple[dict, Optional[bytes], str]:
    """(metadata, article XML or None, why it is dropped or ""): the XML is fetched only for an
    article that is kept, and checked against the MD5 in the metadata's xml_url."""
    raw = _read(meta_path)
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{meta_path}: not valid JSON metadata ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: expected a JSON object of article metadata")
    drop = verdict(meta, licenses)
    if drop:
        return meta, None, drop
    xml = xml_path(meta_path)
    data = _read(xml)
    want = _md5(str(meta.get("xml_url") or ""))
    if want and hashlib.md5(data, usedforsecurity=False).hexdigest() != want:
        raise DataError(f"{xml}: its MD5 differs from the one in {meta_path} (a damaged or half-written object)")
    return meta, data, ""


# ----------------------------------------------------------------------------------------------------
# listing
# ----------------------------------------------------------------------------------------------------


def has_inventory(root: str) -> bool:
    """Whether `root`, a folder on an object store, holds an S3 Inventory (the bucket itself does). It
    looks at the store as it is now (`paths.forget_listings`), as `list_inventory` then reads it."""
    if not paths.is_remote(root):
        return False
    paths.forget_listings(root)
    return paths.exists(paths.join(root.rstrip("/"), INVENTORY))


def list_inventory(root: str) -> list[tuple[str, int, str]]:
    """(metadata object, 0, ETag) of every article version in the newest S3 Inventory under
    ROOT/inventory-reports/<bucket>/metadata/: the newest dated folder with a manifest.json, whose
    `files` are CSV.gz files laid out as its `fileSchema` says (Bucket, Key, LastModifiedDate, ETag)."""
    root = root.rstrip("/")
    base = paths.join(root, INVENTORY)
    dated = []
    for bucket in paths.listdir(base):
        folder = paths.join(base, bucket, "metadata")
        if paths.isdir(folder):
            dated += [(name, folder) for name in paths.listdir(folder) if re.match(r"\d{4}-\d\d-\d\dT", name)]
    for name, folder in sorted(dated, reverse=True):
        manifest_path = paths.join(folder, name, "manifest.json")
        if paths.exists(manifest_path):
            break
    else:
        raise DataError(f"{base}: no inventory (a dated folder with a manifest.json) under */metadata/")
    try:
        manifest = json.loads(paths.read_text(manifest_path))
        schema = [c.strip() for c in manifest.get("fileSchema", "Bucket, Key, LastModifiedDate, ETag").split(",")]
        key_col, etag_col = schema.index("Key"), schema.index("ETag")
        files = [f["key"] for f in manifest["files"]]
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{manifest_path}: not an S3 Inventory manifest ({e})") from e
    out = []
    for key in files:  # keys are relative to the bucket: to ROOT, which is the bucket or a mirror of it
        csv_path = paths.join(root, key)
        with paths.open_read(csv_path) as raw, gzip.GzipFile(fileobj=raw) as g:
            for n, row in enumerate(csv.reader(io.TextIOWrapper(g, encoding="utf-8")), 1):
                if len(row) <= max(key_col, etag_col):
                    raise DataError(f"{csv_path}:{n}: expected the columns {schema}")
                path = paths.join(root, row[key_col])
                if is_metadata(path):
                    out.append((path, 0, row[etag_col].strip('"')))
    return out


def latest_versions(entries: Sequence[tuple[str, int, str]]) -> tuple[list[tuple[str, int, str]], int]:
    """The newest version of each PMCID among metadata entries, ordered by PMCID number (a PMCID listed
    both under metadata/ and in its prefix counts once), and how many older versions were left out."""
    best: dict[str, tuple[int, tuple[str, int, str]]] = {}
    versions: dict[str, set] = {}
    for e in entries:
        acc, version = article_version(e[0])
        versions.setdefault(acc, set()).add(version)
        held = best.get(acc)
        # the same version under metadata/ and in its own prefix: prefer metadata/ (the inventory's)
        if held is None or version > held[0] or (version == held[0] and "/metadata/" in e[0]):
            best[acc] = (version, e)
    older = sum(len(v) - 1 for v in versions.values())
    kept = [best[acc][1] for acc in sorted(best, key=lambda a: int(a[3:]))]
    return kept, older


def read_withdrawn(path: str) -> set[str]:
    """PMCIDs from a list of withdrawn articles (NLM's list of PHE articles whose licence expired, or
    any file naming PMCIDs): every `PMC<digits>` token in the file, whatever its layout (CSV, one per
    line). A file without one is an error naming it."""
    try:
        text = paths.read_text(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: the list of withdrawn articles is not there") from e
    ids = set(re.findall(r"\bPMC\d+\b", text))
    if not ids:
        raise DataError(f"{path}: no PMCID (PMC followed by digits) in the list of withdrawn articles")
    return ids


def without(entries: Sequence[tuple[str, int, str]], withdrawn: set[str]) -> tuple[list, int]:
    """The metadata entries whose PMCID is not in `withdrawn`, and how many were left out."""
    kept = [e for e in entries if article_version(e[0])[0] not in withdrawn]
    return kept, len(entries) - len(kept)


ARTICLE_BYTES = 64 << 10  # a PMC article's JATS XML, roughly (median ~50-100 KB): 1,024 per 64 MB unit


def block_ids(unit_bytes: int) -> int:
    """PMCIDs per work unit of articles (a block): unit_bytes / ARTICLE_BYTES, at least 1."""
    return max(1, unit_bytes // ARTICLE_BYTES)
