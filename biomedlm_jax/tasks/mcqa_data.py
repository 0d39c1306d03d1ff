"""Multiple-choice QA data, as BioMedLM's fine-tuning read it: items, task loaders and files, and its
token rows, token for token. No JAX here: the lm-eval tasks and data tools read it without a model.

BioMedLM's `finetune/` scripts (github stanford-crfm/BioMedLM) use two heads (mcqa.py has the models):

  * `choice` (MedQA, MedMCQA, MMLU), as `finetune/mc/run_multiple_choice.py` with its
    GPT2ForMultipleChoice. The tokenizer gains `[PAD]`, `[CLS]`, `[SEP]` (special, in that order) and
    the embedding (and so the tied LM head) is resized. Each option is the tokenizer pair
    (`sent1 + "[SEP]"`, `f"{sent2} {ending}" + "[SEP]"`). BioMedLM's `preprocess_medqa.py` puts the
    question in `sent1` and leaves `sent2` empty, so an option reads `question[SEP] option[SEP]`.
  * `seqcls` (PubMedQA yes/no/maybe, BioASQ yes/no), as `finetune/seqcls/run_seqcls_gpt.py` with its
    GPT2ForSequenceClassification. The tokenizer gains `[PAD]` (special) and then
    `<|CONTEXT|> <|QUESTION1|> <|QUESTION2|> <|ANSWER|>` (plain added tokens, unused in the text).
    The input is the pair (context, question): the question is its own sequence, so it has no leading
    space. No EOS by default (BioMedLM's published command leaves `gpt2_append_eos_tok` off); with
    `append_eos` the EOS goes where BioMedLM puts it (after the text, or over the last token of a
    full row). Labels are sorted alphabetically.

Truncation (`truncation`): "biomedlm" is what `tokenizer(first, second, truncation=True,
max_length=L)` does, `longest_first` from the right (the end of the longer segment goes first),
done by the `tokenizers` library itself. "left" cuts the first segment (context / question) from the
left so the second (question / option) survives whole. Either way truncated items are counted.

Loaders return `MCQItem`s whose fields map onto BioMedLM's processed records (`*_hf` JSON lines):
choice `sent1` = question (with any context before it), `sent2` = header, `ending<i>` = options;
seqcls `sentence1` = question, `sentence2` = context. Those files themselves load too
(`load_biomedlm_hf`; `load_task_file` detects them by their keys). Bad input raises `DataError`
naming the file and line or record.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np

from biomedlm_jax.core.errors import DataError
from biomedlm_jax.data import readers
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.data.packing import in_eval_split

LETTERS = "ABCDEFGHIJ"
PAD, CLS, SEP = "[PAD]", "[CLS]", "[SEP]"
# The tokens BioMedLM's scripts add, in their order: (special tokens, plain added tokens) per head.
TASK_TOKENS = {
    "choice": ((PAD, CLS, SEP), ()),  # run_multiple_choice.py
    "seqcls": ((PAD,), ("<|CONTEXT|>", "<|QUESTION1|>", "<|QUESTION2|>", "<|ANSWER|>")),  # run_seqcls_gpt.py
}
TRUNCATIONS = ("biomedlm", "left")
LAYOUT = "biomedlm-v1"  # recorded in checkpoint meta: the input layout a head was trained on


@dataclasses.dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: tuple
    answer: int
    context: str = ""
    subject: str = ""
    header: str = ""  # choice head: BioMedLM's `sent2`, written before each option
    where: str = dataclasses.field(default="", compare=False)  # file:line (or record) for error messages


def _check(item: MCQItem, where: str, n_options: Optional[int]) -> MCQItem:
    if not item.question.strip():
        raise DataError(f"{where}: empty question")
    if n_options is not None and len(item.options) != n_options:
        raise DataError(f"{where}: {len(item.options)} options, expected {n_options}")
    if not 0 <= item.answer < len(item.options):
        raise DataError(f"{where}: answer {item.answer} is out of range for {len(item.options)} options")
    return item if item.where else dataclasses.replace(item, where=where)


def check_option_counts(items: Sequence[MCQItem]) -> int:
    """The number of options every item has (the most common count); an item with another count is a
    DataError naming its file and line. Training, head evaluation and zero-shot all call this."""
    if not items:
        return 0
    k = collections.Counter(len(i.options) for i in items).most_common(1)[0][0]
    for i in items:
        if len(i.options) != k:
            raise DataError(f"{i.where or 'item ' + i.id}: {len(i.options)} options, but the other items have {k}; "
                            "every question in a batch needs the same number of options")
    return k


def _letter(value, n: int, where: str) -> int:
    if isinstance(value, str) and len(value) == 1 and value.upper() in LETTERS[:n]:
        return LETTERS.index(value.upper())
    raise DataError(f"{where}: answer {value!r} is not one of {list(LETTERS[:n])}")


# ----------------------------------------------------------------------------------------------------
# Loaders (one per task)
# ----------------------------------------------------------------------------------------------------


def load_medmcqa(path: str) -> list[MCQItem]:
    """MedMCQA in any of three layouts: the original release (opa..opd, cop 1-4), the re-export
    (choices ["A. ...", ...], answer 0-3), and the subset with ids (options {A..D}, answer_idx letter)."""
    out = []
    for lineno, r in readers.json_lines(path):
        where = f"{path}:{lineno}"
        try:
            if "opa" in r:
                options = tuple(str(r[k]) for k in ("opa", "opb", "opc", "opd"))
                cop = int(r["cop"])
                if not 1 <= cop <= 4:
                    raise DataError(f"{where}: cop {cop} is out of range 1-4")
                answer, qid = cop - 1, str(r.get("id", lineno))
            elif "choices" in r:
                options = tuple(c[3:] if len(c) > 2 and c[1:3] == ". " and c[0] in LETTERS else c for c in r["choices"])
                answer, qid = int(r["answer"]), str(r.get("id", lineno))
            elif "options" in r:
                options = tuple(r["options"][k] for k in sorted(r["options"]))
                answer, qid = _letter(r["answer_idx"], len(options), where), str(r.get("realidx", lineno))
            else:
                raise DataError(f"{where}: not a MedMCQA record (no opa..opd, choices or options)")
            item = MCQItem(qid, str(r["question"]), options, answer, where=where)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: bad MedMCQA record ({type(e).__name__}: {e})") from e
        out.append(_check(item, where, 4))
    return out


def load_medqa(path: str) -> list[MCQItem]:
    """MedQA-USMLE `phrases_no_exclude_{train,dev,test}.jsonl`: question, options {A..D}, answer_idx."""
    out = []
    for lineno, r in readers.json_lines(path):
        where = f"{path}:{lineno}"
        try:
            options = tuple(r["options"][k] for k in sorted(r["options"]))
            item = MCQItem(f"{os.path.basename(path)}:{lineno}", str(r["question"]), options,
                           _letter(r["answer_idx"], len(options), where), where=where)
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: bad MedQA record ({type(e).__name__}: {e})") from e
        out.append(_check(item, where, None))
    return out


PUBMEDQA_LABELS = ("maybe", "no", "yes")  # sorted alphabetically, as BioMedLM's seqcls head


def load_pubmedqa(path: str, split: str = "all", test_ids_path: Optional[str] = None, seed: int = 0,
                  dev_size: int = 50) -> list[MCQItem]:
    """PubMedQA PQA-L (`ori_pqal.json`). split: all | test (the PMIDs in `test_ground_truth.json`) |
    train / dev (the other 500: a seeded, label-stratified 450/50 split, as BLURB's fold-0 split sizes).
    Question and context are built as BioMedLM's `preprocess_blurb_seqcls.py` builds them: the
    stripped question, and the non-empty stripped CONTEXTS joined by single spaces."""
    data = readers.read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object keyed by PMID")
    items = []
    for pmid, r in data.items():
        where = f"{path}: record {pmid}"
        try:
            label = str(r["final_decision"]).lower()
            if label not in PUBMEDQA_LABELS:
                raise DataError(f"{where}: final_decision {label!r} is not yes/no/maybe")
            context = " ".join(c.strip() for c in r["CONTEXTS"] if c.strip())
            item = MCQItem(pmid, str(r["QUESTION"]).strip(), PUBMEDQA_LABELS, PUBMEDQA_LABELS.index(label),
                           context=context, where=where)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: bad PubMedQA record ({type(e).__name__}: {e})") from e
        items.append(_check(item, where, 3))
    if split == "all":
        return items
    test_ids_path = test_ids_path or os.path.join(os.path.dirname(path), "test_ground_truth.json")
    test_ids = set(readers.read_json(test_ids_path))
    if split == "test":
        return [i for i in items if i.id in test_ids]
    rest = [i for i in items if i.id not in test_ids]
    # label-stratified quotas summing to dev_size (largest remainder)
    counts = [sum(i.answer == label for i in rest) for label in range(3)]
    exact = [dev_size * c / max(len(rest), 1) for c in counts]
    quota = [int(e) for e in exact]
    for label in sorted(range(3), key=lambda l: exact[l] - quota[l], reverse=True)[: dev_size - sum(quota)]:
        quota[label] += 1
    dev_ids = set()
    rng = np.random.default_rng(seed)
    for label in range(3):
        ids = sorted(i.id for i in rest if i.answer == label)
        dev_ids |= set(rng.permutation(ids)[: quota[label]].tolist())
    if split not in ("train", "dev"):
        raise ValueError(f"split={split!r}: choose all, train, dev or test")
    return [i for i in rest if (i.id in dev_ids) == (split == "dev")]


BIOASQ_LABELS = ("no", "yes")


def load_bioasq(path: str) -> list[MCQItem]:
    """BioASQ task-b JSON: the `yesno` questions; context = the snippets' text."""
    data = readers.read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DataError(f"{path}: expected {{\"questions\": [...]}} (BioASQ task-b format)")
    out = []
    for i, q in enumerate(data["questions"]):
        if q.get("type") != "yesno":
            continue
        where = f"{path}: questions[{i}] (id {q.get('id', '?')})"
        answer = q.get("exact_answer")
        answer = answer[0] if isinstance(answer, list) and answer else answer
        if not isinstance(answer, str) or answer.strip().lower() not in BIOASQ_LABELS:
            raise DataError(f"{where}: exact_answer {q.get('exact_answer')!r} is not yes/no")
        context = " ".join(s.get("text", "") for s in q.get("snippets", []))
        item = MCQItem(str(q.get("id", i)), str(q.get("body", "")), BIOASQ_LABELS,
                       BIOASQ_LABELS.index(answer.strip().lower()), context=context)
        out.append(_check(item, where, 2))
    return out


MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


def load_mmlu(path: str, split: str = "test") -> list[MCQItem]:
    """MMLU CSVs: a file, or a folder holding `<subject>_<split>.csv` (searched recursively, medical
    subjects only). Both the final release (header, 0-based answer) and the original (no header,
    answer letter) layouts are read."""
    if os.path.isdir(path):
        files = sorted(f for s in MMLU_MEDICAL for f in glob.glob(os.path.join(path, "**", f"{s}_{split}.csv"), recursive=True))
        if not files:
            raise DataError(f"{path}: no MMLU medical <subject>_{split}.csv files")
    else:
        files = [path]
    out = []
    for f in files:
        subject = os.path.basename(f).rsplit("_", 1)[0]
        with open(f, encoding="utf-8", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh), 1):
                if lineno == 1 and row[:1] == ["question"]:
                    continue  # header of the final release
                where = f"{f}:{lineno}"
                if len(row) != 6:
                    raise DataError(f"{where}: {len(row)} columns, expected question + 4 options + answer")
                ans = row[5].strip()
                answer = int(ans) if ans.isdigit() else _letter(ans, 4, where)
                out.append(_check(MCQItem(f"{subject}:{lineno}", row[0], tuple(row[1:5]), answer, subject=subject,
                                          where=where), where, 4))
    return out


def _label_index(value, where: str) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise DataError(f"{where}: label {value!r} is not an option index")
    return int(value)


def load_biomedlm_hf(path: str, head: str, labels: Sequence[str] = ()) -> list[MCQItem]:
    """BioMedLM's processed JSON-lines files, as its preprocessing scripts write them:
    multiple choice `{"id", "sent1", "sent2", "ending0".."endingN", "label"}` (label: option index) and
    sequence classification `{"id", "sentence1", "sentence2", "label"}` (label: one of `labels`;
    `{"sentence", "label"}` for single sentences). Ids are the records' own, else `file:line`."""
    out = []
    for lineno, r in readers.json_lines(path):
        where = f"{path}:{lineno}"
        qid = str(r.get("id", f"{os.path.basename(path)}:{lineno}"))
        if head == "choice":
            if "sent1" not in r or "ending0" not in r or "label" not in r:
                raise DataError(f"{where}: not a BioMedLM multiple-choice record (needs sent1, sent2, ending0.., "
                                f"label); found keys {sorted(r)}")
            endings = []
            while f"ending{len(endings)}" in r:
                endings.append(str(r[f"ending{len(endings)}"]))
            item = MCQItem(qid, str(r["sent1"]), tuple(endings), _label_index(r["label"], where),
                           header=str(r.get("sent2") or ""), where=where)
        else:
            if "label" not in r or not ("sentence1" in r or "sentence" in r):
                raise DataError(f"{where}: not a BioMedLM sequence-classification record (needs sentence1, "
                                f"sentence2, label); found keys {sorted(r)}")
            label = str(r["label"]).strip()
            if label not in labels:
                raise DataError(f"{where}: label {r['label']!r} is not one of {list(labels)}")
            question = r["sentence1"] if "sentence1" in r else r["sentence"]
            item = MCQItem(qid, str(question), tuple(labels), list(labels).index(label),
                           context=str(r.get("sentence2") or ""), where=where)
        out.append(_check(item, where, None))
    return out


def biomedlm_hf_head(path: str) -> Optional[str]:
    """"choice" / "seqcls" when `path` is one of BioMedLM's processed JSON-lines files (judged by the
    first record's keys), else None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                return None
            if not isinstance(record, dict):
                return None
            if "sent1" in record or "ending0" in record:
                return "choice"
            if "sentence1" in record or ("sentence" in record and "label" in record):
                return "seqcls"
            return None
    return None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    head: str  # choice | seqcls
    loader: Callable
    labels: tuple = ()  # seqcls label names (sorted alphabetically)
    paper: Optional[float] = None  # BioMedLM's reported accuracy
    files: str = ""  # which files the task reads and where to get them (for errors when none is given)


REGISTRY = {
    "medmcqa": TaskSpec("medmcqa", "choice", load_medmcqa, paper=57.3, files=(
        "MedMCQA train.json / dev.json (https://github.com/medmcqa/medmcqa)")),
    "medqa": TaskSpec("medqa", "choice", load_medqa, paper=50.3, files=(
        "MedQA-USMLE data_clean/questions/US/4_options/phrases_no_exclude_{train,dev,test}.jsonl "
        "(https://github.com/jind11/MedQA), or BioMedLM's medqa_usmle_hf/{train,dev,test}.json")),
    "pubmedqa": TaskSpec("pubmedqa", "seqcls", load_pubmedqa, PUBMEDQA_LABELS, paper=74.4, files=(
        "PubMedQA ori_pqal.json[:train|dev|test] (shipped in data/pubmedqa; https://github.com/pubmedqa/pubmedqa), "
        "or BioMedLM's pubmedqa_hf/{train,dev,test}.json")),
    "bioasq": TaskSpec("bioasq", "seqcls", load_bioasq, BIOASQ_LABELS, paper=95.7, files=(
        "BioASQ task-b JSON (licence-restricted: register at http://bioasq.org), or BioMedLM's bioasq_hf/*.json")),
    "mmlu_medical": TaskSpec("mmlu_medical", "choice", load_mmlu, paper=None, files=(  # medical genetics: 69.0
        "MMLU CSVs, a file or a folder[:test|dev|val] (https://github.com/hendrycks/test)")),
}
PAPER_MMLU_MEDICAL_GENETICS = 69.0


def seeded_split(items: Sequence[MCQItem], dev_fraction: float, seed: int) -> dict:
    """{"train", "dev"} by a seeded hash of the item id (for data that ships only dev/test splits)."""
    def is_dev(i):
        return in_eval_split(f"{seed}:{i.id}", dev_fraction)
    return {"train": [i for i in items if not is_dev(i)], "dev": [i for i in items if is_dev(i)]}


# ----------------------------------------------------------------------------------------------------
# Tokens, embeddings and BioMedLM's inputs
# ----------------------------------------------------------------------------------------------------


def add_task_tokens(tok, head: str) -> dict:
    """Add the tokens BioMedLM's script for `head` adds (`TASK_TOKENS`), in its order, to `tok` in place.
    Tokens already present keep their ids (a resumed run, or a fine-tuned checkpoint's tokenizer), as
    BioMedLM's scripts add nothing to a tokenizer that has a pad token. Returns {token: id}."""
    from tokenizers import AddedToken

    special, plain = TASK_TOKENS[head]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([t for t in plain if tok.token_to_id(t) is None])
    return {t: tok.token_to_id(t) for t in special + plain}


def segments(item: MCQItem, head: str) -> list[tuple[str, str]]:
    """The (first, second) texts BioMedLM's script passes to `tokenizer(first, second)`: one pair per
    option for the choice head, one pair for seqcls."""
    if head == "choice":
        sent1 = " ".join(s for s in (item.context, item.question) if s)
        return [(sent1 + SEP, f"{item.header} {option}" + SEP) for option in item.options]
    return [(item.context, item.question)]


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray  # (N, K, T) int32, right-padded with [PAD]
    mask: np.ndarray  # (N, K, T) bool
    labels: np.ndarray  # (N,) int32
    truncated: int = 0  # items with at least one row cut to fit

    @property
    def rows(self) -> dict:
        return {"ids": self.ids, "mask": self.mask, "labels": self.labels}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.ids.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def _left_cut(first: list, second: list, max_len: int) -> list:
    """Drop the start of `first` so `second` fits whole (or, longer than the row, keeps its end)."""
    if len(second) >= max_len:
        return second[len(second) - max_len:]
    room = max_len - len(second)
    return first[max(len(first) - room, 0):] + second


def token_rows(items: Sequence[MCQItem], tok, head: str, max_len: int, truncation: str = "biomedlm",
               append_eos: bool = False) -> tuple[list[list[list[int]]], int]:
    """Per item, its rows of token ids (one per option, or one), and the number of items truncated.
    The pair is encoded by the `tokenizers` library, as `transformers` calls it in BioMedLM's scripts;
    "biomedlm" truncation is that library's `longest_first` from the right."""
    from tokenizers import Tokenizer

    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}: choose one of {TRUNCATIONS}")
    pairs = [p for item in items for p in segments(item, head)]
    enc = Tokenizer.from_str(tok.to_str())  # a copy: truncation settings stay off the caller's tokenizer
    enc.no_padding()
    enc.no_truncation()
    full = enc.encode_batch(pairs)
    if truncation == "biomedlm":
        enc.enable_truncation(max_len, strategy="longest_first", direction="right")
        rows = [e.ids for e in enc.encode_batch(pairs)]
    else:
        rows = [_left_cut([i for i, t in zip(e.ids, e.type_ids) if t == 0],
                          [i for i, t in zip(e.ids, e.type_ids) if t != 0], max_len) for e in full]
    if append_eos:  # run_seqcls_gpt.py's gpt2_append_eos_tok: EOS after the text, or over the last token
        eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
        rows = [r + [eos] if len(r) < max_len else r[:-1] + [eos] for r in rows]
    out, truncated, n = [], 0, 0
    for item in items:
        k = len(item.options) if head == "choice" else 1
        out.append(rows[n: n + k])
        truncated += any(len(e.ids) > max_len for e in full[n: n + k])
        n += k
    return out, truncated


def encode(items: Sequence[MCQItem], tok, head: str, max_len: int, *, truncation: str = "biomedlm",
           append_eos: bool = False, pad_id: Optional[int] = None) -> Encoded:
    """Token arrays (N, K, max_len) for either head, right-padded with `[PAD]` (or `pad_id`; see the
    module docstring). `tok` must hold the head's tokens (`add_task_tokens`)."""
    pad = tok.token_to_id(PAD) if pad_id is None else pad_id
    if pad is None:
        raise ValueError("the tokenizer has no [PAD] token; call mcqa_data.add_task_tokens(tok, head) first")
    if head == "choice" and tok.token_to_id(SEP) is None:
        raise ValueError("the tokenizer has no [SEP] token; call mcqa_data.add_task_tokens(tok, \"choice\") first")
    if head == "choice" and append_eos:
        raise ValueError("append_eos applies to the seqcls head only (BioMedLM's gpt2_append_eos_tok)")
    k = check_option_counts(items) if head == "choice" else 1
    rows, truncated = token_rows(items, tok, head, max_len, truncation, append_eos)
    ids = np.full((len(items), k, max_len), pad, np.int32)
    mask = np.zeros((len(items), k, max_len), bool)
    for n, item_rows in enumerate(rows):
        for j, seq in enumerate(item_rows):
            ids[n, j, : len(seq)] = seq
            mask[n, j, : len(seq)] = True
    labels = np.asarray([i.answer for i in items], np.int32)
    return Encoded(ids, mask, labels, truncated)


# ----------------------------------------------------------------------------------------------------
# Task files and scores
# ----------------------------------------------------------------------------------------------------


def load_task_file(task: str, spec: str, key: str = "") -> list[MCQItem]:
    """Items of `task` from "PATH" or "PATH:SPLIT" (PubMedQA: train/dev/test/all; MMLU: the CSV split
    name when PATH is a folder, e.g. test, dev, val). BioMedLM's processed `*_hf` JSON-lines files are
    recognised by their keys and read as they are. `key` names the setting the path came from, for
    the error when no path is given."""
    if task not in REGISTRY:
        raise ValueError(f"unknown MCQA task {task!r}; choose from {sorted(REGISTRY)}")
    if not spec:
        raise FileNotFoundError(f"{task}: no data file given{f' ({key} is empty)' if key else ''}; pass the path to "
                                f"{REGISTRY[task].files}")
    path, split = spec, None
    if ":" in os.path.basename(spec):
        path, split = spec.rsplit(":", 1)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{task}: {path} does not exist{f' ({key})' if key else ''}; {task} reads "
                                f"{REGISTRY[task].files}")
    hf_head = biomedlm_hf_head(path)
    if hf_head is not None:
        if hf_head != REGISTRY[task].head:
            raise DataError(f"{path}: BioMedLM {hf_head} records do not fit the {task} task's {REGISTRY[task].head} head")
        return load_biomedlm_hf(path, hf_head, REGISTRY[task].labels)
    if task == "pubmedqa":
        return load_pubmedqa(path, split or "all")
    if task == "mmlu_medical":
        return load_mmlu(path, split or "test")
    return REGISTRY[task].loader(path)


def majority_baseline(train_items: Sequence[MCQItem], eval_items: Sequence[MCQItem]) -> float:
    """Accuracy of always answering the most frequent training answer (option index / label)."""
    if not eval_items:
        return float("nan")
    ref = train_items or eval_items
    counts = np.bincount([i.answer for i in ref], minlength=max(len(i.options) for i in ref))
    return float(np.mean([i.answer == int(counts.argmax()) for i in eval_items]))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean()) if len(labels) else float("nan")
