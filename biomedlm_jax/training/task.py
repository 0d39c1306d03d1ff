"""What the one trainer asks of a task, and the language-model task itself.

`train.train_and_evaluate` runs any `Task`: pretraining (`LMTask`), seq2seq (`seq2seq.Seq2SeqTask`,
an LMTask on prompt -> answer rows) and MCQA heads (`mcqa.MCQATask`). A task says what differs
between objectives: the model (`model`, with `backbone` naming the GPT params inside it, None when
the model *is* the GPT), the init inputs, the data, the loss, the eval sums and how to summarise them.
Everything else (sharding, the optimizer, checkpoints, resume, preemption, metrics) is the trainer's.

The trainer knows no task by name: an entry point constructs its task and passes it
(`train_and_evaluate(config, workdir, task=...)`); without one the trainer runs `LMTask`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.data import input_pipeline
from biomedlm_jax.models.gpt import GPT, resize_embeddings
from biomedlm_jax.models.gpt_config import GPTConfig
from biomedlm_jax.training import losses


class Task:
    """The interface. Subclasses override what differs; the optional hooks have working defaults."""

    backbone: Optional[str] = None  # where the GPT params sit inside the model's params (None: they are them)
    best_metric: Optional[str] = None  # eval metric to keep a best checkpoint by (None: no best checkpoint)
    # positions per logits chunk in the LM loss when the trainer chose one (trainer.auto_loss_chunk: the
    # logits would take too much of the device's HBM); None: the config's loss_chunk_size
    loss_chunk: Optional[int] = None

    def __init__(self, config):
        self.config = config

    def prepare(self, tok, cfg: GPTConfig):
        """(tokenizer, model config) after task-specific changes: MCQA and BioMedLM's seq2seq layout add
        tokens, and the vocabulary grows to hold them. Documents need none."""
        return tok, cfg

    def model(self, cfg: GPTConfig):
        raise NotImplementedError

    def example_inputs(self) -> tuple:
        """The model's init arguments (their shapes decide nothing but the params' shapes)."""
        raise NotImplementedError

    def tokens_per_example(self) -> int:
        """Tokens the model reads per example (for tokens/s and MFU)."""
        raise NotImplementedError

    def batch_fields(self) -> dict:
        """{field: (per-example shape, dtype)} of a train batch, whose arrays are (grad_accum, micro,
        *shape): what the train step is compiled for."""
        raise NotImplementedError

    def load_data(self, tok):
        """(train rows, eval rows): objects with `.rows` (a dict of arrays, examples first) and
        `.fingerprint()`; optional `weights` / `segments` / `positions` for LM rows."""
        raise NotImplementedError

    def eval_batches(self, eval_data, micro: int, local_rows: tuple):
        raise NotImplementedError

    def loss(self, model, params, mb, rng, deterministic: bool):
        """(loss sum, weight sum) of one micro-batch."""
        raise NotImplementedError

    def eval_sums(self, model, params, b) -> dict:
        raise NotImplementedError

    def summarize(self, sums: dict) -> dict:
        raise NotImplementedError

    # --- optional hooks -------------------------------------------------------------------------------

    def adapt_backbone(self, params_np, cfg: GPTConfig):
        """Loaded GPT params (numpy) -> the backbone this task's model holds: grown for added tokens."""
        return resize_embeddings(params_np, cfg.vocab_size)

    def initial_head(self, source, cfg: GPTConfig) -> Optional[dict]:
        """{param name: host params} of a head that `init_from` (a sources.Source) already has, so a
        fine-tuned classifier continues with its own head; None: the head keeps its random init."""
        return None

    def meta(self) -> dict:
        """Extra entries for each checkpoint's meta (e.g. what a classifier head answers)."""
        return {}


class LMTask(Task):
    """Next-token prediction on token rows: pretraining, and seq2seq with per-target loss weights."""

    def model(self, cfg: GPTConfig):
        return GPT(cfg)

    def example_inputs(self):
        return (jnp.ones((1, self.config.seq_len), jnp.int32),)

    def tokens_per_example(self) -> int:
        return self.config.seq_len

    def batch_fields(self) -> dict:
        T = self.config.seq_len
        return {"inputs": ((T,), np.int32), "targets": ((T,), np.int32)}

    def load_data(self, tok):
        return input_pipeline.load_train_eval(self.config.data, self.config.seq_len, tok)

    def eval_batches(self, eval_data, micro, local_rows):
        return input_pipeline.eval_batches(eval_data.rows, micro, local_rows, self.config.eval_batches,
                                           getattr(eval_data, "weights", None), getattr(eval_data, "segments", None),
                                           getattr(eval_data, "positions", None))

    def loss(self, model, params, mb, rng, deterministic: bool):
        """(weighted NLL sum, weight sum) of one micro-batch; fields (b, T): inputs, targets, optional
        weights/positions/segment_ids. With a chunk (`loss_chunk`, else `loss_chunk_size`), logits are built a
        chunk at a time."""
        kw = dict(position_ids=mb.get("positions"), segment_ids=mb.get("segment_ids"), deterministic=deterministic,
                  rngs={"dropout": rng})
        chunk = self.loss_chunk if self.loss_chunk is not None else (
            self.config.loss_chunk_size if self.config is not None else 0)
        if not chunk:
            logits = model.apply({"params": params}, mb["inputs"], **kw)
            return losses.token_nll_sum(logits, mb["targets"], mb.get("weights"))
        hidden = model.apply({"params": params}, mb["inputs"], method="hidden_states", **kw)

        def head(h):
            return model.apply({"params": params}, h, method="logits")

        return losses.chunked_token_nll_sum(hidden, head, mb["targets"], mb.get("weights"), chunk)

    def eval_sums(self, model, params, b) -> dict:
        mb = {k: v[0] for k, v in b.items()}  # eval batches carry one micro-batch
        loss_sum, count = self.loss(model, params, mb, jax.random.PRNGKey(0), True)
        return {"loss_sum": loss_sum, "count": count}

    def summarize(self, sums: dict) -> dict:
        loss = sums["loss_sum"] / sums["count"]
        return {"loss": loss, "perplexity": losses.perplexity(loss), "tokens": sums["count"]}


def for_config(config) -> Task:
    """The task of a config run without one: the LM task. Other tasks are passed by their entry points."""
    name = config.data.get("task", "lm")
    if name != "lm":
        raise ValueError(f"data.task={name!r}: the trainer builds only the lm task itself; pass this config's task "
                         "object, train_and_evaluate(config, workdir, task=...), as finetune_mcqa "
                         "(mcqa.MCQATask) and finetune_seq2seq (seq2seq.Seq2SeqTask) do")
    return LMTask(config)

