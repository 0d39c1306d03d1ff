"""The programs a run executes, built as the run builds them but from shapes only, and lowered for any
devices: a config's train step (pretraining, seq2seq, MCQA, LoRA) on a mesh, and the decode engine's
step for a slot count and context.

Nothing is read from disk but the config: `init_from` gives the architecture when it is readable here,
else `config.model`'s variant does (the BioMedLM configs name biomedlm-2.7b, the checkpoint's
architecture). The tokens a task adds to the vocabulary are added to a stand-in tokenizer of the
model's vocabulary size, so the model has the size a real run gives it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from biomedlm_jax.formats import checkpoint, hf_config, sources
from biomedlm_jax.models import gpt_config
from biomedlm_jax.planning import topology
from biomedlm_jax.training import configlib, state, trainer
from biomedlm_jax.training import task as tasks


@dataclasses.dataclass
class TrainProgram:
    lowered: object  # jax.stages.Lowered
    config: object  # the run config (a resolved copy)
    cfg: gpt_config.GPTConfig  # the model as trained (task tokens and LoRA included)
    mesh: object
    task: object
    params: int  # all parameters
    trainable: int
    note: str = ""  # how the architecture was found


def task_for(config, options: int = 4):
    """The config's task object, as its entry point builds it (`options`: answers per MCQA item)."""
    kind = config.data.get("task", "lm")
    if kind == "lm":
        return tasks.LMTask(config)
    if kind == "mcqa":
        from biomedlm_jax.tasks import mcqa

        return mcqa.MCQATask(config, n_options=options)
    if kind == "seq2seq":
        from biomedlm_jax.tasks import seq2seq

        return seq2seq.Seq2SeqTask(config)
    raise ValueError(f"data.task={kind!r}: the compile check knows lm, mcqa and seq2seq")


def architecture(config) -> tuple[gpt_config.GPTConfig, str]:
    """(the base model's config, a note): init_from's when readable here, else config.model's variant."""
    src = sources.parse_optional(config.init_from)
    if src is not None:
        try:
            if src.kind == "hf":
                base = hf_config.load_config(src.path)
            else:
                base = gpt_config.GPTConfig(**checkpoint.read_meta(src.path)[1]["model"])
            return configlib.resolve_model(config.model, base, src.path), f"architecture from {config.init_from}"
        except (OSError, ValueError, KeyError):
            pass
    note = f"model.variant={config.model.variant}" + (f" ({config.init_from} not readable here)" if src else "")
    return configlib.resolve_model(config.model), note


def stand_in_tokenizer(vocab_size: int):
    """A tokenizer with exactly `vocab_size` tokens: what `Task.prepare` grows as a real one."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))


def train_program(config, s: topology.Slice, devices: list, options: int = 4) -> TrainProgram:
    """The config's train step lowered for `devices`, the slice's (libtpu's compile-only TPU devices),
    with the run's (data, fsdp, tensor) mesh laid out on them."""
    import flax.linen as nn

    config = config.copy_and_resolve_references()
    base_cfg, note = architecture(config)
    with config.unlocked():
        config.init_from = ""  # the step does not depend on where the weights come from
    base_cfg = trainer.with_lora(base_cfg, config)
    task = task_for(config, options)
    _, cfg = task.prepare(stand_in_tokenizer(base_cfg.vocab_size), base_cfg)
    mesh = topology.mesh_for(s, tuple(config.mesh_shape), devices)
    trainer.check_config(config, base_cfg, mesh)
    model = task.model(cfg)
    task.loss_chunk = trainer.auto_loss_chunk(config, cfg, mesh, s.device.hbm_bytes)  # as a run on the slice
    tx, _ = trainer.make_optimizer(config)
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    plan = state.LoraPlan.for_run(config, cfg, base_cfg, task)
    step, abstract, _, plan = trainer.train_step_program(model, tx, task, plan, mesh, rules)
    micro = config.global_batch_size // config.grad_accum_steps
    batch = state.abstract_batch(task, config.grad_accum_steps, micro, state.batch_sharding(mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = step.lower(abstract, batch)
    trainable, total = plan.counts(abstract["params"])
    return TrainProgram(lowered, config, cfg, mesh, task, total, trainable, note)


@dataclasses.dataclass
class DecodeProgram:
    lowered: object
    cfg: gpt_config.GPTConfig
    slots: int
    cache_len: int
    steps_per_sync: int
    weights: dict  # the abstract params the loop reads (int8 kernels with --quantize=int8)
    kv_cache: dict  # the abstract decode state's KV cache


def decode_program(cfg: gpt_config.GPTConfig, device, slots: int, max_prompt_len: int, max_new_tokens: int,
                   quantize: Optional[str] = None, steps_per_sync: int = 8, bucket: int = 64) -> DecodeProgram:
    """The engine's decode step (`steps_per_sync` steps for every slot, inference.engine) for one
    device, with bf16 (the config's dtype) or int8 weights; weights and state are shapes only."""
    from jax.sharding import SingleDeviceSharding

    from biomedlm_jax.inference import engine as engine_lib
    from biomedlm_jax.inference.sampling import SamplingConfig
    from biomedlm_jax.models import gpt
    from biomedlm_jax.models import quantize as quantize_lib

    if cfg.kv_cache_layout == "auto":  # the layout the engine picks on the target (not this host's) platform
        cfg = cfg.replace(kv_cache_layout="seq_major" if device.platform == "tpu" else "heads_major")
    model = gpt.GPT(cfg)
    abstract = jax.eval_shape(lambda: gpt.init_params(model, jax.random.PRNGKey(0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(cfg.dtype)), abstract)
    qmodel = [model]

    def quantized(p):
        qmodel[0], qp = quantize_lib.quantize(model, p, quantize)
        return qp

    params = jax.eval_shape(quantized, abstract)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=cfg.eos_token_id)
    shapes = engine_lib.state_shapes(qmodel[0], params, sampling, slots=slots, max_prompt_len=max_prompt_len,
                                     bucket=bucket)
    on = SingleDeviceSharding(device)

    def placed(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on), tree)

    lowered = engine_lib.generate_steps.lower(qmodel[0], placed(params), placed(shapes["head"]),
                                               placed(shapes["state"]), sampling, steps_per_sync)
    return DecodeProgram(lowered, cfg, slots, shapes["cache_len"], steps_per_sync, params,
                         shapes["state"]["cache"])

