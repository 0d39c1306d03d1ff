"""`make demo`: the BioMedLM pipeline end to end on the tiny config and the sample data in `data/`.

Stages:
  1. train a domain byte-level BPE (BioMedLM's recipe) on the shipped PubMed abstracts and compare it
     with GPT-2's on held-out abstracts (tokens per word, how biomedical terms split);
  2. prepare the corpus offline with it (tokenize + pack into row shards with a manifest);
  3. pretrain the `tiny` GPT on those shards with the real trainer (`configs/pretrain.py:tiny`,
     `train_and_evaluate`): held-out loss before/after, tokens/s, orbax checkpoints in demo_out/pretrain;
  4. fine-tune it for consumer-health QA on the shipped MedQuAD sample (answer-only loss,
     `configs/seq2seq.py:tiny`), answer dev questions with the KV-cache generator, report ROUGE-L;
  5. fine-tune it as BioMedLM's PubMedQA classifier (seqcls head, `configs/mcqa.py:pubmedqa-tiny`) and
     print the paper-style accuracy table on the official 500-question test split;
  6. export the latest checkpoint to HF safetensors (loadable by transformers.GPT2LMHeadModel),
     reload, check logits match;
  7. convert HF -> orbax -> HF with the `convert` CLI code path and check again;
  8. export the PubMedQA classifier with its head (transformers' GPT2ForSequenceClassification layout),
     load it back as an HF classifier and check its dev logits match.
"""
from __future__ import annotations

import argparse

from biomedlm_jax.workflows import demo


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m biomedlm_jax.demo")
    p.add_argument("--repo", default=".", help="the checkout whose configs/ and data/ samples the demo runs on "
                   "(default: the current directory, as `make demo` runs it)")
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--vocab_size", type=int, default=16384)
    p.add_argument("--seq2seq_steps", type=int, default=100)
    args = p.parse_args(argv)
    demo.run(args.repo, args.workdir, args.steps, args.vocab_size, args.seq2seq_steps)


if __name__ == "__main__":
    main()
