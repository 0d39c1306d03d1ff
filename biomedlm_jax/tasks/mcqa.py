"""Multiple-choice QA models as BioMedLM fine-tuned them: the two heads, fine-tuned classifiers in
and out, the zero-shot scorer, and the trainer task.

The data side (items, task loaders, BioMedLM's token rows, token for token) is `mcqa_data`; this
module adds the models. Both heads read the final hidden state of the **last real token** of
right-padded input (the last non-`[PAD]` position), as BioMedLM's `finetune/` scripts do:

  * `choice` (MedQA, MedMCQA, MMLU): `Linear(d_model, 1)` with bias gives one score per option;
    softmax over the options (its GPT2ForMultipleChoice).
  * `seqcls` (PubMedQA, BioASQ): `Linear(d_model, num_labels, bias=False)` scores the labels, sorted
    alphabetically (its GPT2ForSequenceClassification).

`load_classifier` reads a fine-tuned classifier from an HF directory (BioMedLM's or transformers'
layout) or an MCQA workdir. `zero_shot_scores` needs no head: it scores each option by its token
log-likelihood after a prompt, for evaluating a pretrained LM.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.core import errors, paths
from biomedlm_jax.data import input_pipeline
from biomedlm_jax.data import tokenizer as tokenizer_lib
from biomedlm_jax.formats import checkpoint, hf, hf_config, sources
from biomedlm_jax.inference import scoring
from biomedlm_jax.models import lora
from biomedlm_jax.models.gpt import GPT
from biomedlm_jax.models.gpt_config import GPTConfig
from biomedlm_jax.tasks import mcqa_data
from biomedlm_jax.tasks.mcqa_data import LAYOUT, PAD, REGISTRY, SEP, TRUNCATIONS, Encoded, MCQItem
from biomedlm_jax.training.task import Task

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


def label_order(head_labels: Optional[Sequence[str]], task_labels: Sequence[str], num_labels: int,
                where: str) -> np.ndarray:
    """Column indices that put a seqcls head's scores in `task_labels` order. A head without label
    names (LABEL_0..) is taken to be in BioMedLM's order (labels sorted alphabetically)."""
    if num_labels != len(task_labels):
        raise ValueError(f"{where}: the head scores {num_labels} labels, the task has {len(task_labels)} "
                         f"({', '.join(task_labels)})")
    if head_labels is None:
        return np.arange(num_labels)
    lower = [str(lab).lower() for lab in head_labels]
    if sorted(lower) != sorted(task_labels):
        raise ValueError(f"{where}: the head's labels {list(head_labels)} are not the task's {list(task_labels)}")
    return np.asarray([lower.index(lab) for lab in task_labels])


@dataclasses.dataclass
class Classifier:
    """A fine-tuned classifier ready to score: `model.apply({"params": params}, ids, mask)`."""

    model: MCQAModel
    params: dict
    tok: object
    head: dict  # head, labels (or None), num_labels, seq_len (None: the caller's), truncation, append_eos, pad_id


class NotAClassifier(errors.CheckpointError):
    """A checkpoint without a classifier head (a plain language model)."""


def load_classifier(spec: str, step: Optional[int] = None, dtype: Optional[str] = None) -> Classifier:
    """A fine-tuned classifier from "hf:DIR" (BioMedLM's fine-tuned GPT2ForMultipleChoice /
    GPT2ForSequenceClassification, or transformers' GPT2ForSequenceClassification) or
    "orbax:WORKDIR" (a finetune_mcqa run: WORKDIR/best unless `step`, then that step)."""
    src = sources.parse(spec, "init_from")
    kind, path = src.kind, src.path
    overrides = {"remat_policy": "none", **({"dtype": dtype, "param_dtype": dtype} if dtype else {})}
    if kind == "hf":
        cfg = hf_config.load_config(path, **overrides)
        h = hf.read_classifier_head(path, cfg, dtype=np.dtype(jnp.dtype(cfg.param_dtype)))
        if h is None:
            raise NotAClassifier(f"{path}: a language model without a classifier head; score it with --zero_shot")
        tok = tokenizer_lib.find_tokenizer(path)
        if tok is None:
            raise FileNotFoundError(f"{path}: no tokenizer files next to the classifier")
        pad = tok.token_to_id(PAD) if tok.token_to_id(PAD) is not None else h.pad_token_id
        if pad is None:
            raise errors.CheckpointError(f"{path}: neither a [PAD] token in the tokenizer nor pad_token_id in config.json")
        if h.kind == "choice" and tok.token_to_id(SEP) is None:
            raise errors.CheckpointError(f"{path}: a multiple-choice classifier whose tokenizer has no [SEP] token")
        backbone = hf.load_params_numpy(path, cfg, dtype=np.dtype(jnp.dtype(cfg.param_dtype)))
        n = h.kernel.shape[1] if h.kind == "seqcls" else 1
        head = {"head": h.kind, "labels": list(h.labels) if h.labels else None, "num_labels": n, "seq_len": None,
                "truncation": "biomedlm", "append_eos": False, "pad_id": int(pad), "task": None}
        params = jax.tree.map(jnp.asarray, {"transformer": backbone, "score": h.params()})
        return Classifier(MCQAModel(cfg, h.kind, n), params, tok, head)
    best = paths.join(path, checkpoint.BEST_DIR)
    src = best if step is None and checkpoint.latest_step(best) is not None else path
    if step is None:  # the newest step that restores (a damaged one is moved aside), else the error
        return checkpoint.restore_newest(src, lambda s: _load_orbax_classifier(path, src, s, overrides))[1]
    return _load_orbax_classifier(path, src, step, overrides)


def _load_orbax_classifier(path: str, src: str, step: int, overrides: dict) -> Classifier:
    step, meta = checkpoint.read_meta(src, step)
    if "mcqa" not in meta:
        raise NotAClassifier(f"{src}: not an MCQA checkpoint (no head); score it with --zero_shot")
    head = dict(meta["mcqa"])
    check_layout(head, src)
    cfg = GPTConfig(**meta["model"]).replace(**overrides)
    model = MCQAModel(cfg, head["head"], head["num_labels"])
    ids = jnp.ones((1, 1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), ids, ids > 0)["params"]))
    if meta.get("lora_base"):  # a LoRA run's step: the frozen weights come from its base
        params = checkpoint.restore_lora_run(checkpoint.reader(src), step, meta, cfg, checkpoint.place(abstract),
                                             f"{src}/checkpoints/{step}")
    else:
        params = checkpoint.restore_params(checkpoint.reader(src), step, checkpoint.place(abstract), meta,
                                           f"{src}/checkpoints/{step}")
    if cfg.lora_rank:  # a LoRA run: adapters folded into the backbone's weights
        params = dict(params, transformer=lora.merge(params["transformer"], cfg))
        model = MCQAModel(cfg.replace(lora_rank=0), head["head"], head["num_labels"])
    tok_dir = checkpoint.tokenizer_dir(src) if paths.isdir(checkpoint.tokenizer_dir(src)) else checkpoint.tokenizer_dir(path)
    tok = tokenizer_lib.load_tokenizer(tok_dir)
    head.update(pad_id=tok.token_to_id(PAD), step=step, source=src)
    return Classifier(model, params, tok, head)


# ----------------------------------------------------------------------------------------------------
# Zero-shot scoring with the LM (no head)
# ----------------------------------------------------------------------------------------------------


def zero_shot_scores(model: GPT, params, tok, items: Sequence[MCQItem], template: str = "{context}{question}\nAnswer:",
                     reduce: str = "mean", max_len: int = 512, batch_size: int = 16) -> np.ndarray:
    """(N, K) scores: each option's mean (or summed) token log-likelihood after the prompt."""
    k = mcqa_data.check_option_counts(items)
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
    T = -(-max(len(s) for s in seqs) // 64) * 64

    def row(s, span):
        ids, w = np.zeros(T, np.int32), np.zeros(T - 1, np.float32)
        ids[: len(s)] = s
        w[span[0] - 1: span[1] - 1] = 1.0
        return ids, w

    @jax.jit
    def score(ids, w):
        logits = model.apply({"params": params}, ids)[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        tok_lp = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        total = (tok_lp * w).sum(-1)
        return total / jnp.maximum(w.sum(-1), 1.0) if reduce == "mean" else total

    return scoring.score(score, (row(s, span) for s, span in zip(seqs, spans)), batch_size).reshape(len(items), k)


def predict(model, params, enc: Encoded, batch_size: int = 16) -> np.ndarray:
    """A classifier's scores (N, K or labels), batched and jitted. With several devices the batch is
    split across them (data parallel: params replicated, each device scores its share of the questions)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    scores = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))
    return scoring.score(lambda ids, mask: scores(params, jax.device_put(ids, rows), jax.device_put(mask, rows)),
                         zip(enc.ids, enc.mask), batch_size, fill="last")


def check_layout(head: dict, where: str) -> None:
    """A stored head (checkpoint meta["mcqa"]) must have been trained on today's inputs (`LAYOUT`)."""
    if head.get("layout") != LAYOUT:
        raise errors.CheckpointError(
            f"{where}: this head was fine-tuned on the inputs of an earlier biomedlm_jax (before BioMedLM's own "
            f"layout, {LAYOUT}); its scores would not mean anything on today's inputs. Fine-tune it again, or "
            "convert it to hf: and start from its backbone with a fresh head")


# ----------------------------------------------------------------------------------------------------
# The trainer task
# ----------------------------------------------------------------------------------------------------


class MCQATask(Task):
    """The trainer task (see tasks.Task) for a multiple-choice / classification head.

    `n_options`: the number of options per item; by default the training items' (read on first use),
    so `k` is the same whatever is called first."""

    backbone = "transformer"
    best_metric = "accuracy"

    def __init__(self, config, n_options: Optional[int] = None):
        super().__init__(config)
        d = config.data
        self.spec = REGISTRY[d.mcqa_task] if d.mcqa_task in REGISTRY else None
        if self.spec is None:
            raise ValueError(f"data.mcqa_task={d.mcqa_task!r}; choose from {sorted(REGISTRY)}")
        self.head = self.spec.head
        self.num_labels = len(self.spec.labels) if self.head == "seqcls" else 1
        self._n_options = n_options
        self._splits = None
        if d.truncation not in TRUNCATIONS:
            raise ValueError(f"data.truncation={d.truncation!r}: choose one of {TRUNCATIONS}")
        if d.append_eos and self.head == "choice":
            raise ValueError(f"data.append_eos applies to the seqcls head only; {self.spec.name} uses the choice head")

    @property
    def k(self) -> int:
        """Rows per item: the options of a choice item, 1 for seqcls."""
        if self.head != "choice":
            return 1
        if self._n_options is None:
            self._n_options = mcqa_data.check_option_counts(self.items()["train"])
        return self._n_options

    def prepare(self, tok, cfg: GPTConfig):
        mcqa_data.add_task_tokens(tok, self.head)  # idempotent: a resumed run's tokenizer already has them
        return tok, cfg.replace(vocab_size=max(cfg.vocab_size, tok.get_vocab_size()))

    def model(self, cfg: GPTConfig):
        return MCQAModel(cfg, self.head, self.num_labels)

    def example_inputs(self):
        shape = (1, 1, self.config.seq_len)  # the params' shapes do not depend on the options
        return jnp.ones(shape, jnp.int32), jnp.ones(shape, bool)

    def tokens_per_example(self) -> int:
        return self.k * self.config.seq_len

    def batch_fields(self) -> dict:
        k, T = self.k, self.config.seq_len
        return {"ids": ((k, T), np.int32), "mask": ((k, T), bool), "labels": ((), np.int32)}

    def items(self) -> dict:
        """{"train", "dev", "n_extra"}: the task's items (read once)."""
        if self._splits is None:
            d = self.config.data
            train = mcqa_data.load_task_file(d.mcqa_task, d.train, "data.train")
            if d.carve_dev_fraction:
                split = mcqa_data.seeded_split(train, d.carve_dev_fraction, self.config.seed)
                train, dev = split["train"], split["dev"]
            else:
                dev = mcqa_data.load_task_file(d.mcqa_task, d.dev, "data.dev") if d.dev else []
            extra = self.extra_train_items(train)
            self._splits = {"train": train + extra, "dev": dev, "n_extra": len(extra)}
        return self._splits

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
            if not spec:
                raise FileNotFoundError(f"data.extra_train entry {entry!r} has no path: pass "
                                        f"--config.data.extra_train={task}=PATH with PATH the {REGISTRY[task].files}")
            other = REGISTRY[task]
            if (other.head, other.labels) != (self.head, self.spec.labels):
                raise ValueError(f"data.extra_train: {task} ({other.head} head, labels {other.labels}) cannot train "
                                 f"the {self.spec.name} {self.head} head (labels {self.spec.labels})")
            items = mcqa_data.load_task_file(task, spec, "data.extra_train")
            bad = next((i for i in items if self.head == "choice" and {len(i.options)} != want), None)
            if bad is not None:
                raise errors.DataError(f"{bad.where or spec}: {len(bad.options)} options; {self.spec.name} items have "
                                       f"{sorted(want)}")
            out.extend(items)
        return out

    def encode(self, items, tok) -> Encoded:
        d = self.config.data
        return mcqa_data.encode(items, tok, self.head, self.config.seq_len, truncation=d.truncation,
                                append_eos=d.append_eos)

    def load_data(self, tok):
        splits = self.items()
        train, dev = self.encode(splits["train"], tok), self.encode(splits["dev"], tok)
        if splits["dev"] and dev.ids.shape[1] != train.ids.shape[1]:
            raise errors.DataError(f"{self.config.data.dev or self.config.data.train}: dev items have {dev.ids.shape[1]} "
                                   f"options, training items {train.ids.shape[1]}")
        extra = f" (incl. {splits['n_extra']} from data.extra_train)" if splits["n_extra"] else ""
        print(f"[mcqa] {self.spec.name} ({self.head} head): {len(splits['train'])} train{extra} / {len(splits['dev'])} dev "
              f"items; truncated ({self.config.data.truncation}) {train.truncated} train / {dev.truncated} dev items "
              f"(rows of {self.config.seq_len} tokens); dev majority baseline "
              f"{mcqa_data.majority_baseline(splits['train'], splits['dev']):.3f}", flush=True)
        return train, dev

    def eval_batches(self, eval_data, micro, local_rows):
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

    def initial_head(self, source, cfg: GPTConfig) -> Optional[dict]:
        """{"score": head params} when `init_from` is a fine-tuned classifier of this head (BioMedLM's or
        transformers' HF layout, or an MCQA workdir's latest step), in this task's label order; None
        for a plain LM (the head then keeps its random init)."""
        where, path = f"init_from={source}", source.path
        if source.kind == "hf":
            h = hf.read_classifier_head(path, cfg, dtype=np.dtype(jnp.dtype(cfg.param_dtype)))
            if h is None:
                return None
            got, labels, score = h.kind, h.labels, h.params()
        else:
            step, meta = checkpoint.read_meta(path)
            if "mcqa" not in meta:
                return None
            m = meta["mcqa"]
            check_layout(m, where)
            got, labels = m["head"], m.get("labels") if m["head"] == "seqcls" else None
            dt = jnp.dtype(meta["model"].get("param_dtype", "float32"))
            shapes = {"kernel": jax.ShapeDtypeStruct((meta["model"]["d_model"], m["num_labels"]), dt)}
            if got == "choice":
                shapes["bias"] = jax.ShapeDtypeStruct((1,), dt)
            score = jax.device_get(checkpoint.restore_params(checkpoint.reader(path), step,
                                                             {"score": checkpoint.place(shapes)}, meta,
                                                             f"{path}/checkpoints/{step}")["score"])
        if got != self.head:
            raise ValueError(f"{where} is a {got} classifier; the {self.spec.name} task trains a {self.head} head")
        if self.head == "seqcls":
            perm = label_order(labels, self.spec.labels, np.asarray(score["kernel"]).shape[1], where)
            score = {"kernel": np.asarray(score["kernel"])[:, perm]}
        return {"score": {k: np.asarray(v, np.dtype(jnp.dtype(cfg.param_dtype))) for k, v in score.items()}}

    def meta(self) -> dict:
        d = self.config.data
        return {"backbone": self.backbone, "mcqa": {
            "task": self.spec.name, "head": self.head, "num_labels": self.num_labels, "labels": list(self.spec.labels),
            "seq_len": self.config.seq_len, "append_eos": d.append_eos, "truncation": d.truncation, "layout": LAYOUT}}


def finetune(config, workdir: str) -> dict:
    """`python -m biomedlm_jax.finetune_mcqa`: the trainer with `MCQATask` (dev accuracy, the best checkpoint
    in WORKDIR/best)."""
    from biomedlm_jax.training import trainer

    if config.data.task != "mcqa":
        raise ValueError(f"config.data.task={config.data.task!r}: this entry point needs an MCQA config")
    return trainer.train_and_evaluate(config, workdir, task=MCQATask(config))
