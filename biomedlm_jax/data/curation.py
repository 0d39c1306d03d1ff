"""Curation that costs more than reading a field, behind prepare_data flags (both off by default; the
[curation] extra installs their libraries):

- `--near_dedupe`: near-duplicates by MinHash (datasketch). Each document's word 5-gram shingles give
  128 permutations, cut into 16 bands of 8 rows; two documents that agree on a whole band are
  candidates (Jaccard similarity ~0.71 gives a 50% chance, 0.9 gives >99.9%), and the later one in
  input order is dropped, as exact duplicates are (`duplicate_text`). This is the scheme of Dolma and
  datatrove's MinHash deduplication, without their pairwise check of candidates.
- `--detect_language`: a language detector (lingua, low-accuracy mode over its 75 languages but Latin) for
  records whose language fields are missing or wrong: a kept document whose text is detected as not
  English is dropped (`language`). It reads the first 2,000 characters.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

NUM_PERM, BANDS, ROWS = 128, 16, 8
SHINGLE = 5  # words
SAMPLE_CHARS = 2000


def _missing(what: str, extra: str) -> ImportError:
    return ImportError(f"{what} needs the {extra} package: pip install -e .[curation]")


def minhash_bands(text: str) -> np.ndarray:
    """The document's 16 band keys (63-bit ints, each naming its band, so bands never collide with
    each other): equal band keys mean equal MinHash rows in that band."""
    try:
        from datasketch import MinHash
    except ImportError as e:
        raise _missing("--near_dedupe", "datasketch") from e
    words = text.casefold().split()
    shingles = {" ".join(words[i:i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}
    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode("utf-8") for s in shingles])
    rows = np.asarray(m.hashvalues, np.uint64).reshape(BANDS, ROWS)
    out = np.empty(BANDS, np.int64)
    for b in range(BANDS):
        digest = hashlib.blake2b(bytes([b]) + rows[b].tobytes(), digest_size=8).digest()
        out[b] = int.from_bytes(digest, "little") >> 1
    return out


@functools.lru_cache(maxsize=1)
def _detector():
    try:
        from lingua import Language, LanguageDetectorBuilder
    except ImportError as e:
        raise _missing("--detect_language", "lingua-language-detector") from e
    # Latin is left out of the candidates: biomedical English (anatomy, taxa, drug names) was detected as
    # Latin in 2 of the 1,692 shipped abstracts, and no modern article is written in it
    return LanguageDetectorBuilder.from_all_languages_without(Language.LATIN).with_low_accuracy_mode().build()


def is_english(text: str) -> bool:
    """False only when the detector names another language for the text's first 2,000 characters
    (None, too short or mixed to tell, counts as English)."""
    from lingua import Language

    lang = _detector().detect_language_of(text[:SAMPLE_CHARS])
    return lang is None or lang == Language.ENGLISH
