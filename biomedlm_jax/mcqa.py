"""Multiple-choice QA as BioMedLM fine-tuned it: task loaders, prompt shaping, the two heads, zero-shot.

BioMedLM's `finetune/` scripts use two heads. Both read the final hidden state of the **last real
token** of right-padded input:

  * `choice` (MedQA, MedMCQA, MMLU), as in GPT2ForMultipleChoice. The tokenizer gains `[PAD]`, `[CLS]`
    and `[SEP]`, and the embedding (and so the tied LM head) is resized. Each option is read as
    `context [SEP] "{question} {option}" [SEP]`. `Linear(d_model, 1)` with bias gives one score per
    option, followed by a softmax over the options.
  * `seqcls` (PubMedQA yes/no/maybe, BioASQ yes/no), as in GPT2ForSequenceClassification. The input
    is `context question` (a tokenizer pair, no separator), optionally followed by EOS.
    `Linear(d_model, num_labels, bias=False)` scores the labels, sorted alphabetically.

Long contexts are cut from the left, so the question and option always survive. The number of
truncated examples is reported. `zero_shot_scores` needs no head: each option is scored by its mean
(or summed) token log-likelihood after the prompt, for evaluating a pretrained checkpoint.

Every loader returns `MCQItem`s. Bad input raises `DataError` naming the file and line or record:
a wrong number of options, a missing or out-of-range answer, an empty question, or a file that is
not in the expected format.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import os
import zlib
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax import readers
from biomedlm_jax import tokenizer as tokenizer_lib
from biomedlm_jax.model import GPT, GPTConfig

DataError = readers.DataError
LETTERS = "ABCDEFGHIJ"
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]")


@dataclasses.dataclass(frozen=True)
class MCQItem:
    id: str
    question: str
    options: tuple
    answer: int
    context: str = ""
    subject: str = ""


def _check(item: MCQItem, where: str, n_options: Optional[int]) -> MCQItem:
    if not item.question.strip():
        raise DataError(f"{where}: empty question")
    if n_options is not None and len(item.options) != n_options:
        raise DataError(f"{where}: {len(item.options)} options, expected {n_options}")
    if not 0 <= item.answer < len(item.options):
        raise DataError(f"{where}: answer {item.answer} is out of range for {len(item.options)} options")
    return item


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
            item = MCQItem(qid, str(r["question"]), options, answer)
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
            item = MCQItem(str(lineno), str(r["question"]), options, _letter(r["answer_idx"], len(options), where))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: bad MedQA record ({type(e).__name__}: {e})") from e
        out.append(_check(item, where, None))
    return out


PUBMEDQA_LABELS = ("maybe", "no", "yes")  # sorted alphabetically, as BioMedLM's seqcls head


def load_pubmedqa(path: str, split: str = "all", test_ids_path: Optional[str] = None, seed: int = 0,
                  dev_size: int = 50) -> list[MCQItem]:
    """PubMedQA PQA-L (`ori_pqal.json`). split: all | test (the PMIDs in `test_ground_truth.json`) |
    train / dev (the other 500: a seeded, label-stratified 450/50 split, as BLURB's fold-0 split sizes)."""
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
            item = MCQItem(pmid, str(r["QUESTION"]), PUBMEDQA_LABELS, PUBMEDQA_LABELS.index(label),
                           context=" ".join(r["CONTEXTS"]))
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
                out.append(_check(MCQItem(f"{subject}:{lineno}", row[0], tuple(row[1:5]), answer, subject=subject),
                                  where, 4))
    return out


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    head: str  # choice | seqcls
    loader: Callable
    labels: tuple = ()  # seqcls label names (sorted alphabetically)
    paper: Optional[float] = None  # BioMedLM's reported accuracy


REGISTRY = {
    "medmcqa": TaskSpec("medmcqa", "choice", load_medmcqa, paper=57.3),
    "medqa": TaskSpec("medqa", "choice", load_medqa, paper=50.3),
    "pubmedqa": TaskSpec("pubmedqa", "seqcls", load_pubmedqa, PUBMEDQA_LABELS, paper=74.4),
    "bioasq": TaskSpec("bioasq", "seqcls", load_bioasq, BIOASQ_LABELS, paper=95.7),
    "mmlu_medical": TaskSpec("mmlu_medical", "choice", load_mmlu, paper=None),  # medical genetics: 69.0
}
PAPER_MMLU_MEDICAL_GENETICS = 69.0


def seeded_split(items: Sequence[MCQItem], dev_fraction: float, seed: int) -> dict:
    """{"train", "dev"} by a seeded hash of the item id (for data that ships only dev/test splits)."""
    def is_dev(i):
        return zlib.crc32(f"{seed}:{i.id}".encode()) % 10_000 < dev_fraction * 10_000
    return {"train": [i for i in items if not is_dev(i)], "dev": [i for i in items if is_dev(i)]}


# ----------------------------------------------------------------------------------------------------
# Tokenizer / embedding changes and encoding
# ----------------------------------------------------------------------------------------------------


def add_special_tokens(tok) -> dict:
    """Add [PAD], [CLS], [SEP] (the choice head's set) to `tok` in place; returns their ids."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def resize_embeddings(params: dict, new_vocab: int, backbone: Optional[str] = None) -> dict:
    """Grow `wte` to `new_vocab` rows. Old rows are unchanged; new rows are their mean. The LM head is
    tied to `wte`, so it grows consistently. Returns new params."""
    tree = params[backbone] if backbone else params
    wte = np.asarray(tree["wte"]["embedding"])
    if new_vocab < wte.shape[0]:
        raise ValueError(f"cannot shrink the vocabulary from {wte.shape[0]} to {new_vocab}")
    extra = np.repeat(wte.mean(0, keepdims=True), new_vocab - wte.shape[0], axis=0)
    new = dict(tree, wte={"embedding": jnp.asarray(np.concatenate([wte, extra]).astype(wte.dtype))})
    return dict(params, **{backbone: new}) if backbone else new


@dataclasses.dataclass
class Encoded:
    ids: np.ndarray  # (N, K, T) int32, right-padded
    mask: np.ndarray  # (N, K, T) bool
    labels: np.ndarray  # (N,) int32
    truncated: int = 0

    @property
    def rows(self) -> dict:
        return {"ids": self.ids, "mask": self.mask, "labels": self.labels}

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(self.ids.tobytes())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def encode(items: Sequence[MCQItem], tok, head: str, max_len: int, pad_id: int, sep_id: Optional[int] = None,
           append_eos: bool = False, question_template: str = "{question} {option}") -> Encoded:
    """Token arrays for either head (see the module docstring). Contexts are cut from the left."""
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    k = max(len(i.options) for i in items) if head == "choice" else 1
    ids = np.full((len(items), k, max_len), pad_id, np.int32)
    mask = np.zeros((len(items), k, max_len), bool)
    truncated = 0
    for n, item in enumerate(items):
        ctx = tok.encode(item.context).ids if item.context else []
        cut = False
        if head == "choice":
            if len(item.options) != k:
                raise DataError(f"item {item.id}: {len(item.options)} options, the batch has {k}")
            for j, opt in enumerate(item.options):
                qo = tok.encode(question_template.format(question=item.question, option=opt)).ids + [sep_id]
                qo = qo[-(max_len - 1):]  # a question longer than the row keeps its end (and the option)
                room = max_len - len(qo) - 1
                c = ctx[-room:] if room > 0 else []
                cut |= len(c) < len(ctx) or room <= 0
                seq = (c + [sep_id] if room > 0 else []) + qo
                ids[n, j, : len(seq)] = seq
                mask[n, j, : len(seq)] = True
        else:
            q = tok.encode((" " if ctx else "") + item.question).ids + ([eos] if append_eos else [])
            q = q[-max_len:]
            room = max_len - len(q)
            c = ctx[-room:] if room > 0 else []
            cut = len(c) < len(ctx)
            seq = c + q
            ids[n, 0, : len(seq)] = seq
            mask[n, 0, : len(seq)] = True
        truncated += cut
    labels = np.asarray([i.answer for i in items], np.int32)
    return Encoded(ids, mask, labels, truncated)


# ----------------------------------------------------------------------------------------------------
# The model with a head
# ----------------------------------------------------------------------------------------------------


class MCQAModel(nn.Module):
    """GPT backbone ("transformer") + score head reading the last real token's hidden state.

    ids, mask: (B, K, T). choice head -> (B, K) option scores; seqcls head (K = 1) -> (B, num_labels).
    """

    config: GPTConfig
    head: str = "choice"
    num_labels: int = 1

    def setup(self):
        self.transformer = GPT(self.config)
        out = 1 if self.head == "choice" else self.num_labels
        self.score = nn.Dense(
            out, use_bias=self.head == "choice", dtype=jnp.float32, param_dtype=self.config.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.config.initializer_range), ("embed", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        )

    def __call__(self, ids, mask, deterministic: bool = True):
        B, K, T = ids.shape
        h = self.transformer.hidden_states(ids.reshape(B * K, T), mask.reshape(B * K, T), deterministic=deterministic)
        last = jnp.maximum(mask.reshape(B * K, T).sum(-1) - 1, 0)  # index of the last real token
        feats = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # (B*K, C)
        scores = self.score(feats)  # (B*K, out)
        return scores.reshape(B, K) if self.head == "choice" else scores.reshape(B, self.num_labels)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(scores).argmax(-1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


# ----------------------------------------------------------------------------------------------------
# Zero-shot scoring with the LM (no head)
# ----------------------------------------------------------------------------------------------------


def zero_shot_scores(model: GPT, params, tok, items: Sequence[MCQItem], template: str = "{context}{question}\nAnswer:",
                     reduce: str = "mean", max_len: int = 512, batch_size: int = 16) -> np.ndarray:
    """(N, K) scores: each option's mean (or summed) token log-likelihood after the prompt."""
    k = max(len(i.options) for i in items)
    seqs, spans = [], []
    for item in items:
        ctx = f"{item.context}\n" if item.context else ""
        prompt = tok.encode(template.format(context=ctx, question=item.question)).ids
        for opt in item.options:
            o = tok.encode(" " + opt).ids
            p = prompt[-max(max_len - len(o), 1):]
            s = (p + o)[-max_len:]
            seqs.append(s)
            spans.append((len(s) - min(len(o), len(s) - 1), len(s)))
    T = max(len(s) for s in seqs)
    T = -(-T // 64) * 64
    ids = np.zeros((len(seqs), T), np.int32)
    w = np.zeros((len(seqs), T - 1), np.float32)
    for n, (s, (a, b)) in enumerate(zip(seqs, spans)):
        ids[n, : len(s)] = s
        w[n, a - 1: b - 1] = 1.0

    @jax.jit
    def score(params, ids, w):
        logits = model.apply({"params": params}, ids)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok_lp = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        total = (tok_lp * w).sum(-1)
        return total / jnp.maximum(w.sum(-1), 1.0) if reduce == "mean" else total

    out = []
    for i in range(0, len(seqs), batch_size):
        chunk_ids, chunk_w = ids[i: i + batch_size], w[i: i + batch_size]
        pad = batch_size - len(chunk_ids)
        if pad:
            chunk_ids = np.concatenate([chunk_ids, np.zeros((pad, T), np.int32)])
            chunk_w = np.concatenate([chunk_w, np.zeros((pad, T - 1), np.float32)])
        out.append(np.asarray(score(params, chunk_ids, chunk_w))[: batch_size - pad])
    return np.concatenate(out).reshape(len(items), k)


# ----------------------------------------------------------------------------------------------------
# Task files and the trainer task
# ----------------------------------------------------------------------------------------------------


def load_task_file(task: str, spec: str) -> list[MCQItem]:
    """Items of `task` from "PATH" or "PATH:SPLIT" (PubMedQA: train/dev/test/all; MMLU: the CSV split
    name when PATH is a folder, e.g. test, dev, val)."""
    if task not in REGISTRY:
        raise ValueError(f"unknown MCQA task {task!r}; choose from {sorted(REGISTRY)}")
    path, split = spec, None
    if ":" in os.path.basename(spec):
        path, split = spec.rsplit(":", 1)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{task}: {path} does not exist")
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


class MCQATask:
    """The trainer task (see train.LMTask) for a multiple-choice / classification head."""

    backbone = "transformer"
    best_metric = "accuracy"

    def __init__(self, config):
        self.config = config
        d = config.data
        self.spec = REGISTRY[d.mcqa_task] if d.mcqa_task in REGISTRY else None
        if self.spec is None:
            raise ValueError(f"data.mcqa_task={d.mcqa_task!r}; choose from {sorted(REGISTRY)}")
        self.head = self.spec.head
        self.num_labels = len(self.spec.labels) if self.head == "seqcls" else 1
        self.k = 1
        self.pad_id = self.sep_id = None

    def prepare(self, tok, cfg: GPTConfig):
        if self.head == "choice":
            ids = add_special_tokens(tok)  # idempotent: a resumed run's tokenizer already has them
            self.pad_id, self.sep_id = ids["[PAD]"], ids["[SEP]"]
            cfg = cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))
        else:
            self.pad_id = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
        return tok, cfg

    def model(self, cfg: GPTConfig):
        return MCQAModel(cfg, self.head, self.num_labels)

    def example_inputs(self):
        shape = (1, self.k, self.config.seq_len)
        return jnp.ones(shape, jnp.int32), jnp.ones(shape, bool)

    def tokens_per_example(self) -> int:
        return self.k * self.config.seq_len

    def items(self) -> dict:
        d = self.config.data
        train = load_task_file(d.mcqa_task, d.train)
        if d.carve_dev_fraction:
            split = seeded_split(train, d.carve_dev_fraction, self.config.seed)
            train, dev = split["train"], split["dev"]
        else:
            dev = load_task_file(d.mcqa_task, d.dev) if d.dev else []
        extra = self.extra_train_items(train)
        return {"train": train + extra, "dev": dev, "n_extra": len(extra)}

    def extra_train_items(self, train: Sequence[MCQItem]) -> list[MCQItem]:
        """Items of `data.extra_train` ("task=PATH[:SPLIT]", comma-separated), added to training only:
        e.g. MedMCQA questions for MedQA, the paper's 54.7 row. Each extra task must use the same head
        (and, for seqcls, the same labels) and, for the choice head, the same number of options."""
        out = []
        want = {len(i.options) for i in train}
        for entry in filter(None, (e.strip() for e in self.config.data.extra_train.split(","))):
            task, sep, spec = entry.partition("=")
            if not sep or task not in REGISTRY:
                raise ValueError(f"data.extra_train entry {entry!r}: expected TASK=PATH with TASK in {sorted(REGISTRY)}")
            other = REGISTRY[task]
            if (other.head, other.labels) != (self.head, self.spec.labels):
                raise ValueError(f"data.extra_train: {task} ({other.head} head, labels {other.labels}) cannot train "
                                 f"the {self.spec.name} {self.head} head (labels {self.spec.labels})")
            items = load_task_file(task, spec)
            bad = next((i for i in items if self.head == "choice" and {len(i.options)} != want), None)
            if bad is not None:
                raise DataError(f"{spec}: item {bad.id} has {len(bad.options)} options; {self.spec.name} items have "
                                f"{sorted(want)}")
            out.extend(items)
        return out

    def encode(self, items, tok) -> Encoded:
        d = self.config.data
        return encode(items, tok, self.head, self.config.seq_len, self.pad_id, self.sep_id, d.append_eos,
                      d.question_template)

    def load_data(self, tok):
        splits = self.items()
        train, dev = self.encode(splits["train"], tok), self.encode(splits["dev"], tok)
        self.k = train.ids.shape[1]
        extra = f" (incl. {splits['n_extra']} from data.extra_train)" if splits["n_extra"] else ""
        print(f"[mcqa] {self.spec.name} ({self.head} head): {len(splits['train'])} train{extra} / {len(splits['dev'])} dev "
              f"items; contexts cut from the left in {train.truncated} train / {dev.truncated} dev items "
              f"(rows of {self.config.seq_len} tokens); dev majority baseline "
              f"{majority_baseline(splits['train'], splits['dev']):.3f}", flush=True)
        return train, dev

    def eval_batches(self, eval_data, micro, local_rows):
        from biomedlm_jax import input_pipeline

        return input_pipeline.eval_batches(eval_data.rows, micro, local_rows, self.config.eval_batches)

    def loss(self, model, params, mb, rng, deterministic: bool):
        scores = model.apply({"params": params}, mb["ids"], mb["mask"], deterministic=deterministic,
                             rngs={"dropout": rng})
        nll = -jnp.take_along_axis(jax.nn.log_softmax(scores, -1), mb["labels"][:, None], -1)[:, 0]
        return nll.sum(), jnp.asarray(nll.shape[0], jnp.float32)

    def eval_sums(self, model, params, b) -> dict:
        scores = model.apply({"params": params}, b["ids"][0], b["mask"][0], deterministic=True)
        labels, valid = b["labels"][0], b["valid"][0]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(scores, -1), labels[:, None], -1)[:, 0]
        correct = (jnp.argmax(scores, -1) == labels).astype(jnp.float32)
        return {"loss_sum": (nll * valid).sum(), "count": valid.sum(), "correct": (correct * valid).sum()}

    def summarize(self, sums: dict) -> dict:
        return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"],
                "count": sums["count"]}

    def adapt_backbone(self, params_np, cfg: GPTConfig):
        if params_np["wte"]["embedding"].shape[0] < cfg.vocab_size:
            return resize_embeddings(params_np, cfg.vocab_size)
        return params_np

    def meta(self) -> dict:
        d = self.config.data
        return {"backbone": self.backbone, "mcqa": {
            "task": self.spec.name, "head": self.head, "num_labels": self.num_labels, "labels": list(self.spec.labels),
            "seq_len": self.config.seq_len, "append_eos": d.append_eos, "question_template": d.question_template}}
