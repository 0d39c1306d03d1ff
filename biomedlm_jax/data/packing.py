"""Documents -> fixed-length token rows.

The held-out split formula (`in_eval_split`, a hash of the document id, shared by every preparation
path), the `Packer` that concatenates documents each followed by `<|endoftext|>` and cuts rows of
`seq_len + 1` tokens, and `pack_documents` for in-memory corpora.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import tokenizer as tokenizer_lib


def in_eval_split(doc_id: str, fraction: float) -> bool:
    """Deterministic held-out split by a hash of the document id (stable across runs and machines): the
    one split formula, also behind MCQA's seeded dev carve (`mcqa_data.seeded_split`)."""
    return (zlib.crc32(doc_id.encode("utf-8")) % 10_000) < fraction * 10_000



@dataclass
class PackedRows:
    """(N, row_len) token rows and the id of the first document starting in each row."""

    rows: np.ndarray
    row_doc_ids: list = field(default_factory=list)
    num_documents: int = 0
    num_empty: int = 0
    dropped_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.rows.size)

    def fingerprint(self) -> str:
        """sha256 of the token rows: a resumed run checks it still trains on the same data."""
        return hashlib.sha256(np.ascontiguousarray(self.rows).tobytes()).hexdigest()[:16]



def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32



class Packer:
    """Streams documents into rows of `row_len` tokens: each document's tokens + EOS, concatenated.

    `pack(docs)` tokenizes a batch (in parallel, in Rust) and returns the rows it completed plus each
    document's start offset in the token stream (row = offset // row_len). Tokens that do not fill a
    last row stay in the tail; `dropped_tokens` counts them once the stream ends.
    """

    def __init__(self, tok, row_len: int):
        self.tok, self.row_len = tok, row_len
        self.eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
        if self.eos is None:
            raise DataError(f"the tokenizer has no {tokenizer_lib.EOS_TOKEN} token")
        self.dtype = token_dtype(tok.get_vocab_size())
        self.tokens_seen = 0
        self.num_documents = 0
        self._tail = np.zeros(0, self.dtype)

    def pack(self, docs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, list[tuple[str, int]]]:
        pieces, starts = [self._tail], []
        for (doc_id, _), enc in zip(docs, self.tok.encode_batch([text for _, text in docs])):
            starts.append((doc_id, self.tokens_seen))
            ids = np.asarray(enc.ids + [self.eos], self.dtype)
            self.tokens_seen += len(ids)
            pieces.append(ids)
        self.num_documents += len(docs)
        flat = np.concatenate(pieces)
        n = len(flat) // self.row_len
        self._tail = flat[n * self.row_len:]
        return flat[: n * self.row_len].reshape(n, self.row_len), starts

    @property
    def dropped_tokens(self) -> int:
        return len(self._tail)



def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch



def pack_documents(docs: Iterable[tuple[str, str]], tok, row_len: int, batch_size: int = 256) -> PackedRows:
    """In memory: tokenize, append EOS to each document, concatenate, cut into rows of `row_len` tokens."""
    packer = Packer(tok, row_len)
    chunks, starts, n_empty = [], [], 0

    def non_empty():
        nonlocal n_empty
        for doc in docs:
            if doc[1].strip():
                yield doc
            else:
                n_empty += 1

    for batch in batched(non_empty(), batch_size):
        rows, batch_starts = packer.pack(batch)
        chunks.append(rows)
        starts += batch_starts
    rows = np.concatenate(chunks) if chunks else np.zeros((0, row_len), packer.dtype)
    row_doc_ids = [None] * len(rows)
    for doc_id, offset in starts:
        r = offset // row_len
        if r < len(rows) and row_doc_ids[r] is None:
            row_doc_ids[r] = doc_id
    return PackedRows(rows, row_doc_ids, packer.num_documents, n_empty, packer.dropped_tokens)
