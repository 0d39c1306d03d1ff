"""Seq2seq (prompt -> answer) fine-tuning data and evaluation, for the shared trainer.

Fine-tuning is the pretraining loop with another task (`Seq2SeqTask`, which `finetune_seq2seq` passes):
each example becomes one row, right-padded to `seq_len + 1`, with per-target weights that are 1 on
answer tokens (and the EOS) and 0 on the prompt and padding. The trainer's loss is
sum(weights * nll) / sum(weights), so prompt tokens contribute nothing. Two row layouts
(`data.layout`; by default "biomedlm" for textgen data and "template" for the others):

  * "biomedlm", BioMedLM's own (`finetune/textgen/gpt2/{finetune_for_summarization,sum_dataset}.py`):
    `source <|startoftext|> target <|endoftext|>`, padded with `[PAD]`. The tokenizer gains `[PAD]`
    and `<|startoftext|>` (special, in that order) and the embedding grows. Source and target are
    tokenized on their own and cut from the end at `data.max_source_length` / `data.max_target_length`
    (510 each, BioMedLM's defaults); the loss covers the target and the EOS.
  * "template": `prompt_template.format(question) + answer_prefix + answer + EOS`, padded with EOS.

Loaders (a `(question, answer, doc_id)` list each):
  * MedQuAD XML: `Document/QAPairs/QAPair/{Question, Answer}`; pairs with an empty answer (several
    MedlinePlus folders had theirs removed for copyright) are skipped and counted per folder;
  * JSONL: `{"question": ..., "answer": ...}` (optional "id"/"doc_id" to group examples into documents);
  * BioMedLM's textgen format: line-aligned `<split>.source` / `<split>.target` files (its MeQSum example).
Splits are by *document* (MedQuAD file, JSONL doc id), seeded, so no document is in two splits;
textgen data brings its own train/val/test files.

Truncation ("template"): a prompt longer than half the row is cut from the left (the end of the question
stays); an answer that does not fit is cut from the end. ("biomedlm") BioMedLM's cuts above, and should
a row still exceed `seq_len + 1` the source keeps at most half the row, cut from the end like
BioMedLM's, and the target the rest. All cuts are counted and reported.

Packing (`data.pack`): consecutive examples share a row. Segment ids keep attention inside each
example, positions restart at 0 per example, and weights never cross an example boundary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import xml.etree.ElementTree as ET
from typing import Optional, Sequence

import numpy as np

from biomedlm_jax.core import paths
from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import readers
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.training.task import LMTask


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    answer: str
    doc_id: str
    source: str = ""


@dataclasses.dataclass
class LoadStats:
    examples: int = 0
    empty_answers: dict = dataclasses.field(default_factory=dict)  # folder -> count
    errors_skipped: int = 0


# ----------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------


def _text(elem) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def read_medquad(path: str, stats: Optional[LoadStats] = None, on_error: str = "raise") -> list[Example]:
    """All QA pairs under `path` (a MedQuAD checkout or some of its folders), files in sorted order."""
    stats = stats if stats is not None else LoadStats()
    files = sorted(p for p in readers.expand_files([os.path.join(path, "**", "*.xml")]))
    out = []
    for f in files:
        folder = os.path.basename(os.path.dirname(f))
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            msg = f"{f}:{e.position[0]}: malformed XML ({e})"
            if on_error != "skip":
                raise DataError(msg + "  (set data.on_error=skip to skip such files)") from e
            stats.errors_skipped += 1
            continue
        doc_id = f"{folder}/{root.get('id') or os.path.basename(f)}"
        for pair in root.iter("QAPair"):
            q, a = _text(pair.find("Question")), _text(pair.find("Answer"))
            if not a or not q:
                stats.empty_answers[folder] = stats.empty_answers.get(folder, 0) + 1
                continue
            out.append(Example(q, a, doc_id, folder))
    stats.examples += len(out)
    return out


def read_qa_jsonl(path: str, stats: Optional[LoadStats] = None, on_error: str = "raise") -> list[Example]:
    """One {"question": str, "answer": str[, "doc_id" | "id"]} object per line (readers.json_lines)."""
    stats = stats if stats is not None else LoadStats()
    read = readers.ReadStats()
    out = []
    for lineno, rec in readers.json_lines(path, read, on_error):
        q, a = rec.get("question"), rec.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            if on_error != "skip":
                raise DataError(f"{path}:{lineno}: expected {{\"question\": str, \"answer\": str}}, got keys "
                                f"{sorted(rec)}  (pass --config.data.on_error=skip to skip such records)")
            stats.errors_skipped += 1
            continue
        if not a.strip():
            stats.empty_answers[path] = stats.empty_answers.get(path, 0) + 1
            continue
        doc = str(rec.get("doc_id", rec.get("id", f"{os.path.basename(path)}:{lineno}")))
        out.append(Example(q, a, doc, os.path.basename(path)))
    stats.errors_skipped += read.errors_skipped
    stats.examples += len(out)
    return out


def _text_lines(path: str) -> list[str]:
    """Lines as BioMedLM's `linecache.getline(...).rstrip("\\n")` reads them: universal newlines, and
    nothing else stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def read_textgen(path: str, split: str, stats: Optional[LoadStats] = None) -> list[Example]:
    """BioMedLM's textgen format: `<split>.source` and `<split>.target`, one example per line pair."""
    stats = stats if stats is not None else LoadStats()
    src, tgt = os.path.join(path, f"{split}.source"), os.path.join(path, f"{split}.target")
    sources, targets = _text_lines(src), _text_lines(tgt)
    if len(sources) != len(targets):
        raise DataError(f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; they must align line by line")
    out = [Example(s, t, f"{split}:{i + 1}", split) for i, (s, t) in enumerate(zip(sources, targets)) if t.strip()]
    stats.empty_answers[tgt] = len(targets) - len(out)
    stats.examples += len(out)
    return out


def split_by_document(examples: Sequence[Example], seed: int, dev_fraction: float, test_fraction: float) -> dict:
    """{"train", "dev", "test"}: documents (not examples) shuffled with `seed` and cut by fractions."""
    docs = sorted({e.doc_id for e in examples})
    order = np.random.default_rng(seed).permutation(len(docs))
    n_test, n_dev = int(round(len(docs) * test_fraction)), int(round(len(docs) * dev_fraction))
    which = {}
    for rank, i in enumerate(order):
        which[docs[i]] = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
    out: dict = {"train": [], "dev": [], "test": []}
    for e in examples:
        out[which[e.doc_id]].append(e)
    return out


def load_splits(data_cfg, stats: Optional[LoadStats] = None) -> dict:
    """The config's examples as {"train", "dev", "test"}."""
    stats = stats if stats is not None else LoadStats()
    fmt = data_cfg.format
    if fmt == "textgen":
        splits = {}
        for name, files in (("train", "train"), ("dev", "val"), ("test", "test")):
            if os.path.exists(os.path.join(data_cfg.path, f"{files}.source")):
                splits[name] = read_textgen(data_cfg.path, files, stats)
            else:
                splits[name] = []
        return splits
    if fmt == "medquad":
        examples = read_medquad(data_cfg.path, stats, data_cfg.on_error)
    elif fmt == "jsonl":
        examples = [e for f in readers.expand_files(data_cfg.path) for e in read_qa_jsonl(f, stats, data_cfg.on_error)]
    else:
        raise ValueError(f"data.format={fmt!r}: choose medquad, jsonl or textgen")
    if not examples:
        raise DataError(f"{data_cfg.path}: no question-answer pairs found")
    return split_by_document(examples, data_cfg.split_seed, data_cfg.dev_fraction, data_cfg.test_fraction)


# ----------------------------------------------------------------------------------------------------
# Rows with answer-only weights
# ----------------------------------------------------------------------------------------------------


BOS_TOKEN = tokenizer_lib.BOS_TOKEN  # BioMedLM's separator between source and target
PAD_TOKEN = "[PAD]"
LAYOUTS = ("biomedlm", "template")


def layout(data_cfg) -> str:
    """The config's row layout: `data.layout`, or by default "biomedlm" for textgen data, else "template"."""
    name = data_cfg.get("layout", "") or ("biomedlm" if data_cfg.format == "textgen" else "template")
    if name not in LAYOUTS:
        raise ValueError(f"data.layout={name!r}: choose one of {LAYOUTS} (or leave it empty)")
    return name


def add_layout_tokens(tok) -> dict:
    """What finetune_for_summarization.py adds: [PAD], then <|startoftext|> (then <|endoftext|> when
    missing), as special tokens, in place. Tokens already present keep their ids. Returns their ids."""
    from tokenizers import AddedToken

    for t in (PAD_TOKEN, BOS_TOKEN, tokenizer_lib.EOS_TOKEN):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    return {t: tok.token_to_id(t) for t in (PAD_TOKEN, BOS_TOKEN, tokenizer_lib.EOS_TOKEN)}


def prompt_text(template: str, ex: Example) -> str:
    return template.format(question=ex.question)


def prompt_ids(tok, data_cfg, ex: Example) -> list[int]:
    """The tokens generation starts from: the source and <|startoftext|> (biomedlm), or the prompt."""
    if layout(data_cfg) == "biomedlm":
        return tok.encode(ex.question).ids[: data_cfg.max_source_length] + [tok.token_to_id(BOS_TOKEN)]
    return tok.encode(prompt_text(data_cfg.prompt_template, ex)).ids


def encode_biomedlm(tok, ex: Example, max_source: int, max_target: int, row_len: int) -> tuple[list, int, bool, bool]:
    """BioMedLM's row `src <|startoftext|> tgt <|endoftext|>` (sum_dataset.py, LineByLineSumTextDataset):
    (tokens, prompt length = len(src) + 1, source truncated, target truncated)."""
    bos, eos = tok.token_to_id(BOS_TOKEN), tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    src, tgt = tok.encode(ex.question).ids, tok.encode(ex.answer).ids
    cut_src, cut_tgt = len(src) > max_source, len(tgt) > max_target
    src, tgt = src[:max_source], tgt[:max_target]
    if len(src) + len(tgt) + 2 > row_len:  # only when seq_len is below max_source + max_target + 2
        keep = max(row_len - 2 - len(tgt), row_len // 2 - 1)
        cut_src |= len(src) > keep
        src = src[:keep]
        cut_tgt |= len(tgt) > row_len - 2 - len(src)
        tgt = tgt[: row_len - 2 - len(src)]
    return src + [bos] + tgt + [eos], len(src) + 1, cut_src, cut_tgt


def encode_example(tok, ex: Example, template: str, answer_prefix: str, row_len: int) -> tuple[list, int, bool, bool]:
    """(tokens, prompt length, prompt truncated, answer truncated) with len(tokens) <= row_len."""
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    prompt = tok.encode(prompt_text(template, ex)).ids
    answer = tok.encode(answer_prefix + ex.answer).ids + [eos]
    cut_prompt = len(prompt) > row_len // 2
    if cut_prompt:
        prompt = prompt[-(row_len // 2):]  # keep the end: the question and the "Answer:" cue
    cut_answer = len(prompt) + len(answer) > row_len
    answer = answer[: row_len - len(prompt)]
    return prompt + answer, len(prompt), cut_prompt, cut_answer


@dataclasses.dataclass
class Seq2SeqRows:
    rows: np.ndarray  # (N, seq_len + 1) int32, right-padded
    weights: np.ndarray  # (N, seq_len) float32: 1 where the target is an answer token
    prompts_truncated: int = 0
    answers_truncated: int = 0
    segments: Optional[np.ndarray] = None  # (N, seq_len + 1) example index (1, 2, ...) per token; 0 = pad
    positions: Optional[np.ndarray] = None  # (N, seq_len + 1) position of each token inside its example

    def fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.rows).tobytes())
        h.update(np.ascontiguousarray(self.weights).tobytes())
        return h.hexdigest()[:16]


def build_rows(examples: Sequence[Example], tok, seq_len: int, template: str = "", answer_prefix: str = "",
               pack: bool = False, row_layout: str = "template", max_source: int = 510,
               max_target: int = 510) -> Seq2SeqRows:
    """One row per example, or with `pack` as many consecutive examples per row as fit. Packed rows
    carry segment ids and per-example positions: a token attends only inside its own example, and
    the loss weights never cross an example boundary, so packing changes nothing but the padding."""
    row_len = seq_len + 1
    if row_layout == "biomedlm":
        pad = tok.token_to_id(PAD_TOKEN)
        if pad is None or tok.token_to_id(BOS_TOKEN) is None:
            raise ValueError("the tokenizer lacks [PAD] / <|startoftext|>; call seq2seq.add_layout_tokens(tok) first")
        encoded = [encode_biomedlm(tok, ex, max_source, max_target, row_len) for ex in examples]
    else:
        pad = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
        encoded = [encode_example(tok, ex, template, answer_prefix, row_len) for ex in examples]
    groups: list[list[int]] = []
    used = row_len
    for i, (ids, _, _, _) in enumerate(encoded):
        if not pack or used + len(ids) > row_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(ids)
    rows = np.full((len(groups), row_len), pad, np.int32)
    weights = np.zeros((len(groups), seq_len), np.float32)
    segments = np.zeros((len(groups), row_len), np.int32)
    positions = np.zeros((len(groups), row_len), np.int32)
    for r, group in enumerate(groups):
        start = 0
        for seg, i in enumerate(group, 1):
            ids, p, _, _ = encoded[i]
            end = start + len(ids)
            rows[r, start:end] = ids
            segments[r, start:end] = seg
            positions[r, start:end] = np.arange(len(ids))
            # target j predicts token j + 1; answer tokens of this example are at [start + p, end)
            weights[r, start + max(p - 1, 0): end - 1] = 1.0
            start = end
    n_prompt = sum(e[2] for e in encoded)
    n_answer = sum(e[3] for e in encoded)
    if not pack:
        return Seq2SeqRows(rows, weights, n_prompt, n_answer)
    return Seq2SeqRows(rows, weights, n_prompt, n_answer, segments, positions)


def load_train_eval(data_cfg, seq_len: int, tok) -> tuple[Seq2SeqRows, Seq2SeqRows]:
    stats = LoadStats()
    splits = load_splits(data_cfg, stats)
    if data_cfg.max_examples:
        splits = {k: v[: data_cfg.max_examples] for k, v in splits.items()}
    pack = bool(data_cfg.get("pack", False))
    kw = dict(pack=pack, row_layout=layout(data_cfg), max_source=data_cfg.get("max_source_length", 510),
              max_target=data_cfg.get("max_target_length", 510))
    train = build_rows(splits["train"], tok, seq_len, data_cfg.prompt_template, data_cfg.answer_prefix, **kw)
    dev = build_rows(splits["dev"], tok, seq_len, data_cfg.prompt_template, data_cfg.answer_prefix, **kw)
    if len(train.rows) == 0:
        raise DataError(f"{data_cfg.path}: the train split is empty")
    skipped = sum(stats.empty_answers.values())
    print(f"[seq2seq] {len(splits['train'])} train / {len(splits['dev'])} dev / {len(splits['test'])} test examples "
          f"({skipped} empty answers skipped, {stats.errors_skipped} bad records skipped); {kw['row_layout']} layout; truncated: "
          f"{train.prompts_truncated + dev.prompts_truncated} prompts, {train.answers_truncated + dev.answers_truncated} "
          f"answers (rows of {seq_len + 1} tokens{'; packed into ' + str(len(train.rows)) + ' train rows' if pack else ''})",
          flush=True)
    return train, dev


# ----------------------------------------------------------------------------------------------------
# Generation eval: answers for a dev sample and ROUGE-L
# ----------------------------------------------------------------------------------------------------


class Seq2SeqTask(LMTask):
    """The trainer task for prompt -> answer rows (loss on the answer tokens only): LMTask's loss on
    this module's rows; BioMedLM's layout adds its tokens to the tokenizer first."""

    def prepare(self, tok, cfg):
        if layout(self.config.data) == "biomedlm":
            add_layout_tokens(tok)
            cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
        return tok, cfg

    def meta(self) -> dict:
        """The prompt framing, so a server can apply it to a chat turn (serving.chat.PromptTemplate)."""
        d = self.config.data
        return {"prompt_template": {"layout": layout(d), "template": d.get("prompt_template", "") or "{question}",
                                    "answer_prefix": d.get("answer_prefix", "") or ""}}

    def batch_fields(self) -> dict:
        T = self.config.seq_len
        fields = dict(super().batch_fields(), weights=((T,), np.float32))  # the answer tokens' loss weights
        if self.config.data.get("pack", False):
            fields.update(segment_ids=((T,), np.int32), positions=((T,), np.int32))
        return fields

    def load_data(self, tok):
        return load_train_eval(self.config.data, self.config.seq_len, tok)



def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, with stemming) in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return float(np.mean(scores)) if scores else 0.0


def evaluate_generation(config, workdir: str, split: str = "dev") -> dict:
    """Generate answers for the first `data.generate_examples` examples of `split` with the latest
    checkpoint; write `workdir/generations_<split>.jsonl`; return {"rougeL", "examples"}."""
    import jax

    from biomedlm_jax.formats import checkpoint
    from biomedlm_jax.inference import engine, generate

    d = config.data
    examples = load_splits(d)[split][: d.generate_examples]
    if not examples:
        return {"examples": 0}
    model, params = checkpoint.load_model(workdir, remat_policy="none")
    tok = tokenizer_lib.load_tokenizer(checkpoint.tokenizer_dir(workdir))
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    pad = tok.token_to_id(PAD_TOKEN) if layout(d) == "biomedlm" else eos
    budget = min(d.max_new_tokens, model.config.n_positions // 2)
    prompts = [prompt_ids(tok, d, e)[-(model.config.n_positions - budget):] for e in examples]
    cfg = generate.SamplingConfig(max_new_tokens=budget, temperature=0.0, no_repeat_ngram_size=d.no_repeat_ngram_size,
                                  eos_id=eos, pad_id=pad)
    # continuous batching: a short answer's slot takes the next question (greedy: the same tokens as
    # static batches of generate.generate)
    outs = engine.generate_all(model, params, prompts, cfg, slots=16)
    preds = [tok.decode([t for t in o if t != eos]).strip() for o in outs]
    score = rouge_l(preds, [e.answer for e in examples])
    if jax.process_index() == 0:
        paths.write_text(paths.join(workdir, f"generations_{split}.jsonl"), "".join(
            json.dumps({"doc_id": e.doc_id, "question": e.question, "answer": e.answer, "generated": p},
                       ensure_ascii=False) + "\n" for e, p in zip(examples, preds)))
    return {"examples": len(examples), "rougeL": score, "first_question": examples[0].question,
            "first_generated": preds[0]}


def finetune(config, workdir: str) -> dict:
    """`python -m biomedlm_jax.finetune_seq2seq`: the trainer with `Seq2SeqTask`, then the latest checkpoint
    answers `data.generate_examples` dev questions; their ROUGE-L goes to metrics.jsonl (split "generate")."""
    import jax

    from biomedlm_jax.training import metrics, trainer

    if config.data.task != "seq2seq":
        raise ValueError(f"config.data.task={config.data.task!r}: this entry point needs a seq2seq config")
    if not config.init_from and jax.process_index() == 0:
        print("[seq2seq] warning: no init_from; fine-tuning a randomly initialised model", flush=True)
    summary = trainer.train_and_evaluate(config, workdir, task=Seq2SeqTask(config))
    if config.data.generate_examples and not summary.get("preempted"):
        gen = evaluate_generation(config, workdir)
        if gen.get("examples"):
            writer = metrics.MetricsWriter(workdir, tensorboard=False)
            writer.write(summary["step"], {"rougeL": gen["rougeL"], "examples": gen["examples"]}, "generate")
            writer.close()
            if jax.process_index() == 0:
                print(f"[generate] Q: {gen['first_question']}\n[generate] A: {gen['first_generated']}\n"
                      f"[generate] ROUGE-L on {gen['examples']} dev questions: {gen['rougeL']:.4f}", flush=True)
            summary["rougeL"] = gen["rougeL"]
    return summary
