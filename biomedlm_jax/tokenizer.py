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

from biomedlm_jax.data.tokenizer import (
    BIOMEDICAL_TERMS,
    EOS_TOKEN,
    compare,
    format_comparison,
    load_tokenizer,
    sample_documents,
    save_tokenizer,
    train_bpe,
)


def main(argv=None) -> int:
    import argparse

    from biomedlm_jax.data import readers

    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer (BioMedLM's recipe)")
    t.add_argument("--input", required=True, help="comma-separated files/globs: JSONL, PubTator, PubMed XML, JATS")
    t.add_argument("--vocab_size", type=int, default=28896)
    t.add_argument("--min_frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--on_error", choices=("raise", "skip"), default="raise")
    t.add_argument("--sample_docs", type=int, default=0,
                   help="train on a deterministic sample of N documents (lowest id hashes), read in one pass "
                        "holding at most N in memory (0 = every document)")
    c = sub.add_parser("compare", help="compare tokenizers on held-out text")
    c.add_argument("--tokenizer", action="append", required=True, help="DIR or NAME=DIR; give it twice or more")
    c.add_argument("--input", required=True, help="held-out documents (same formats as train)")
    c.add_argument("--terms", default=",".join(BIOMEDICAL_TERMS), help="comma-separated terms to show splits of")
    c.add_argument("--out", default="tokenizer_comparison.json", help="JSON results file")
    c.add_argument("--max_documents", type=int, default=0, help="0 = all")
    args = p.parse_args(argv)

    if args.cmd == "train":
        stats = readers.ReadStats()
        docs = readers.read_documents(readers.expand_files(args.input), stats, on_error=args.on_error)
        if args.sample_docs:
            docs = sample_documents(docs, args.sample_docs)
        tok = train_bpe((text for _, text in docs), args.vocab_size, args.min_frequency)
        save_tokenizer(tok, args.out)
        sampled = f"a sample of {len(docs):,} of " if args.sample_docs else ""
        print(f"trained on {sampled}{stats.documents:,} documents ({stats.duplicates} duplicate ids, {stats.empty} empty, "
              f"{stats.errors_skipped} skipped): vocab {tok.get_vocab_size():,}, {EOS_TOKEN} = "
              f"{tok.token_to_id(EOS_TOKEN)}; wrote {args.out}")
        if tok.get_vocab_size() < args.vocab_size:
            print(f"note: the corpus supports only {tok.get_vocab_size():,} tokens at min_frequency={args.min_frequency}")
        return 0

    toks = {}
    for spec in args.tokenizer:
        name, _, path = spec.rpartition("=") if "=" in spec else (os.path.basename(os.path.normpath(spec)), "", spec)
        toks[name] = load_tokenizer(path)
    texts = [text for _, text in readers.read_documents(readers.expand_files(args.input))]
    if args.max_documents:
        texts = texts[: args.max_documents]
    result = compare(toks, texts, [t for t in args.terms.split(",") if t])
    print(format_comparison(result))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(f"wrote {args.out}")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
