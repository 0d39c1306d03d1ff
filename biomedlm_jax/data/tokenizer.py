"""Byte-level BPE tokenizers: load (HF `tokenizer.json` or GPT-2's vocab/merges files) and save them
with their special tokens, train one BioMedLM's way (`train_bpe`: vocab 28,896, min_frequency 2), and
compare two on held-out text (`compare`: tokens per word, how biomedical terms split)."""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
from typing import Iterable, Optional, Sequence

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from biomedlm_jax.core import paths

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"  # BioMedLM's separator between a seq2seq source and its target

_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))



def byte_level_bpe(vocab_file: str, merges_file: str) -> Tokenizer:
    """GPT-2-style tokenizer from a vocab (token -> id JSON) and a merges file."""
    tok = Tokenizer(models.BPE.from_file(vocab_file, merges_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.token_to_id(EOS_TOKEN) is not None:
        tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok



def load_tokenizer(path: str) -> Tokenizer:
    """Load a byte-level BPE tokenizer from a file or directory (see module docstring); `path` may be
    on an object store (gs://...)."""
    if paths.is_remote(path):
        if not paths.exists(path):
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        with paths.local_copy(path) as local:
            return load_tokenizer(local)
    if os.path.isfile(path):
        if os.path.basename(path).endswith(".json"):
            return _from_tokenizer_json(path)
        raise ValueError(f"{path}: expected a tokenizer.json file or a directory of tokenizer files")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        return _from_tokenizer_json(tj)
    for vocab, merges in _PAIRS:
        v, m = os.path.join(path, vocab), os.path.join(path, merges)
        if os.path.exists(v) and os.path.exists(m):
            try:
                return byte_level_bpe(v, m)
            except Exception as e:  # tokenizers raises bare Exceptions on malformed files
                raise ValueError(f"{v} / {m}: cannot build a BPE tokenizer: {e}") from e
    raise FileNotFoundError(
        f"{path}: no tokenizer files found; expected tokenizer.json, vocab.json + merges.txt, "
        "or encoder.json + vocab.bpe"
    )



def _from_tokenizer_json(path: str) -> Tokenizer:
    """A tokenizer.json without the padding / truncation state it may carry: `transformers` saves the
    state of its last padded call there (e.g. pad to 1,024) and ignores it on load, and so do we."""
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizers JSON file: {e}") from e
    tok.no_padding()
    tok.no_truncation()
    return tok



def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: Optional[int] = None,
                   special_tokens: Optional[dict] = None) -> None:
    """Write tokenizer.json, vocab.json + merges.txt and tokenizer_config.json.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` and `GPT2TokenizerFast.from_pretrained`
    load the result. `special_tokens` ({"pad_token": "[PAD]", "sep_token": ...}) go into
    tokenizer_config.json, so transformers pads with that token. `out_dir` may be on an object store.
    """
    with paths.staged(out_dir) as local:
        _save_tokenizer(tok, local, model_max_length, special_tokens)



def _save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: Optional[int], special_tokens: Optional[dict]):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    if isinstance(tok.model, models.BPE):
        tok.model.save(out_dir)  # vocab.json + merges.txt
    special = EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else None
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "bos_token": special,
        "eos_token": special,
        "unk_token": special,
    }
    if model_max_length is not None:
        cfg["model_max_length"] = model_max_length
    cfg.update(special_tokens or {})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)



def find_tokenizer(path: str) -> Optional[Tokenizer]:
    """The tokenizer stored in a checkpoint directory, or None when it holds no tokenizer files."""
    if not paths.isdir(path):
        return None
    names = set(paths.listdir(path))
    if "tokenizer.json" in names or any(v in names and m in names for v, m in _PAIRS):
        return load_tokenizer(path)
    return None



BIOMEDICAL_TERMS = (
    "acetyltransferase", "thrombocytopenia", "immunohistochemistry", "pharmacokinetics", "thrombin",
    "myocardial", "hepatocellular", "glomerulonephritis", "electroencephalography", "methotrexate",
    "cyclooxygenase", "hyperlipidemia", "angiotensin", "phosphorylation", "cardiomyopathy", "leukocytes",
)



def train_bpe(texts: Iterable[str], vocab_size: int = 28896, min_frequency: int = 2, show_progress: bool = True,
              length: Optional[int] = None) -> Tokenizer:
    """Byte-level BPE as BioMedLM trained it: no prefix space, min_frequency 2, and `<|endoftext|>` as the
    last id (vocab_size - 1, like GPT-2's 50256 and BioMedLM's 28895). `texts` is consumed as a stream."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    # Put <|endoftext|> into the BPE vocab itself (not only as an added token), so vocab.json + merges.txt
    # carry it and every loader (ours, GPT2TokenizerFast from the two files) agrees on its id.
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = tok.model.save(tmp)
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        vocab[EOS_TOKEN] = len(vocab)
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        return byte_level_bpe(vocab_file, merges_file)



def sample_documents(docs: Iterable[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The `n` documents whose ids hash lowest (blake2b of the id), in hash order: a deterministic sample
    that depends only on which documents there are, not on their order, the files they are spread over
    or the number of files. One pass over `docs`; memory holds at most `n` documents (a heap)."""
    if n <= 0:
        raise ValueError(f"sample size must be positive, got {n}")
    heap: list[tuple[int, str, str]] = []  # (-hash, id, text): the root is the largest hash kept
    for doc_id, text in docs:
        h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "big")
        item = (-h, doc_id, text)
        if len(heap) < n:
            heapq.heappush(heap, item)
        elif item > heap[0]:  # a smaller hash (or the same hash and a smaller id) than the largest kept
            heapq.heapreplace(heap, item)
    return [(doc_id, text) for _, doc_id, text in sorted(heap, key=lambda x: (-x[0], x[1]))]



def _word_pieces(tok: Tokenizer, word: str) -> list[str]:
    """How `word` splits in running text (preceded by a space, as GPT-2-style tokenizers see it)."""
    ids = tok.encode(" " + word).ids
    return [tok.decode([i]) for i in ids]



def compare(tokenizers: dict, texts: Sequence[str], terms: Sequence[str] = BIOMEDICAL_TERMS) -> dict:
    """Per tokenizer: tokens per word, characters per token, share of words split into >= 3 pieces (over
    word occurrences), and how each term splits."""
    words = [w for t in texts for w in t.split()]
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    n_chars = sum(len(t) for t in texts)
    out = {"documents": len(texts), "words": len(words), "characters": n_chars, "tokenizers": {}}
    for name, tok in tokenizers.items():
        n_tokens = sum(len(e.ids) for e in tok.encode_batch(list(texts)))
        pieces = {w: len(e.ids) for w, e in zip(counts, tok.encode_batch([" " + w for w in counts]))}
        split3 = sum(c for w, c in counts.items() if pieces[w] >= 3)
        out["tokenizers"][name] = {
            "vocab_size": tok.get_vocab_size(),
            "tokens": n_tokens,
            "tokens_per_word": n_tokens / max(len(words), 1),
            "chars_per_token": n_chars / max(n_tokens, 1),
            "share_words_3plus_pieces": split3 / max(len(words), 1),
            "terms": {term: _word_pieces(tok, term) for term in terms},
        }
    return out



def format_comparison(result: dict) -> str:
    names = list(result["tokenizers"])
    rows = [("", *names)]
    for key, fmt in (("vocab_size", "{:,}"), ("tokens", "{:,}"), ("tokens_per_word", "{:.3f}"),
                     ("chars_per_token", "{:.3f}"), ("share_words_3plus_pieces", "{:.1%}")):
        rows.append((key, *(fmt.format(result["tokenizers"][n][key]) for n in names)))
    for term in next(iter(result["tokenizers"].values()))["terms"]:
        rows.append((term, *(" | ".join(p.strip() for p in result["tokenizers"][n]["terms"][term]) for n in names)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"held-out text: {result['documents']:,} documents, {result['words']:,} words, "
             f"{result['characters']:,} characters"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
