"""Byte-level BPE tokenizers (HF `tokenizers`): load GPT-2 / BioMedLM tokenizer files and save them
in a layout `transformers` loads unchanged.

Accepted inputs for `load_tokenizer(path)`:
  * a `tokenizer.json` file, or a directory holding one (HF fast-tokenizer format);
  * a directory with `vocab.json` + `merges.txt` (HF GPT-2 / BioMedLM files);
  * a directory with `encoder.json` + `vocab.bpe` (OpenAI's original GPT-2 release).
The last two are assembled as GPT-2 does it: ByteLevel pre-tokenizer without a prefix space (BioMedLM
also used add_prefix_space=False), BPE model, ByteLevel decoder, and `<|endoftext|>` as a special token.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

EOS_TOKEN = "<|endoftext|>"

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
    """Load a byte-level BPE tokenizer from a file or directory (see module docstring)."""
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
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"{path}: not a valid tokenizers JSON file: {e}") from e


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: Optional[int] = None) -> None:
    """Write tokenizer.json, vocab.json + merges.txt and tokenizer_config.json.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` and `GPT2TokenizerFast.from_pretrained`
    load the result.
    """
    os.makedirs(out_dir, exist_ok=True)
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
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def find_tokenizer(path: str) -> Optional[Tokenizer]:
    """The tokenizer stored in a checkpoint directory, or None when it holds no tokenizer files."""
    if not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    if "tokenizer.json" in names or any(v in names and m in names for v, m in _PAIRS):
        return load_tokenizer(path)
    return None
