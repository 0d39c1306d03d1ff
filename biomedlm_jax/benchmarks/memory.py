"""`bench memory`: the fine-tuning step's device memory, from XLA's buffer assignment, for a model
variant, task (LM rows, MedQA's 4 options, PubMedQA), sequence length, batch, LoRA rank, mesh, dtypes,
remat and optimizer-moment dtype, without running a step (docs/finetuning_memory.md)."""
from __future__ import annotations

import os
import time

import numpy as np

# XLA:CPU has no bf16 matmul: it upcasts bf16 dot operands to f32, and loop-invariant code motion then
# hoists that conversion of every layer's stacked weights out of the scanned layer loop (10 GB of f32
# copies for a bf16 2.7B base). GPUs and TPUs multiply bf16 natively, so nothing is converted there. To
# report what an accelerator needs, the CPU compile of `bench memory` leaves that pass out (--cpu_as_is
# keeps it).
_CPU_MEMORY_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}



MEMORY_TASKS = {"lm": None, "medqa": 4, "pubmedqa": 1}  # task -> options per question (None: LM rows)



def bench_memory(variant: str, task: str, seq: int, batch: int, lora_rank: int, mesh: str = "1,1,1",
                 dtype: str = "bfloat16", remat: str = "full", scan_layers: bool = True, moments: str = "bfloat16",
                 base_dtype: str = "bfloat16", grad_accum: int = 1,
                 lora_targets: str = "qkv,attn_out,mlp_in,mlp_out", cpu_as_is: bool = False,
                 mcqa_config: str = "configs/mcqa.py") -> dict:
    """What the trainer's real train step needs on one device, from XLA's buffer assignment of the step
    compiled for abstract (shape-only) state and batch: no weights are allocated, so a 2.7B report
    runs on a laptop. `batch` counts questions (or LM rows) per micro-batch. An MCQA task's settings
    come from its variant of `mcqa_config` (the checkout's configs/mcqa.py)."""
    import jax

    from biomedlm_jax.models import gpt_config, sharding
    from biomedlm_jax.tasks import mcqa, mcqa_data
    from biomedlm_jax.training import configlib, state, trainer
    from biomedlm_jax.training import task as tasks

    if task not in MEMORY_TASKS:
        raise SystemExit(f"--task={task}: choose from {sorted(MEMORY_TASKS)}")
    base_cfg = gpt_config.get_config(variant, n_positions=max(gpt_config.VARIANTS[variant].get("n_positions", 1024), seq),
                                    dtype=dtype, remat_policy=remat, scan_layers=scan_layers,
                                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    if task == "lm":
        config = configlib.train_config()
    elif not os.path.exists(mcqa_config):
        raise SystemExit(f"--mcqa_config={mcqa_config} not found: pass the checkout's configs/mcqa.py")
    else:
        config = configlib.load_config_file(mcqa_config, task)
    config.seq_len, config.grad_accum_steps, config.global_batch_size = seq, grad_accum, batch * grad_accum
    config.lora.rank, config.lora.targets, config.lora.base_dtype = lora_rank, lora_targets, base_dtype
    config.optimizer.mu_dtype = config.optimizer.nu_dtype = "" if moments == "float32" else moments
    cfg = trainer.with_lora(base_cfg, config)
    if task == "lm":
        task_obj = tasks.LMTask(config)
    else:
        task_obj = mcqa.MCQATask(config, n_options=MEMORY_TASKS[task])
        added = sum(len(t) for t in mcqa_data.TASK_TOKENS[task_obj.head])  # none is in a GPT-2-style base vocab
        cfg = cfg.replace(vocab_size=base_cfg.vocab_size + added)
    model = task_obj.model(cfg)
    tx, _ = trainer.make_optimizer(config)
    mesh_shape = tuple(int(x) for x in mesh.split(","))
    m = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    rules = sharding.DEFAULT_RULES
    plan = state.LoraPlan(  # only a LoRA run masks the base's embedding rows and stores them in base_dtype
        cfg, task_obj.backbone, base_cfg.vocab_size if lora_rank and task != "lm" else None,
        base_dtype if lora_rank else None)
    p_step, abstract, shardings, plan = trainer.train_step_program(model, tx, task_obj, plan, m, rules)
    batch_abstract = state.abstract_batch(task_obj, grad_accum, batch, state.batch_sharding(m, rules))
    t0 = time.perf_counter()
    with jax.set_mesh(m), __import__("flax").linen.logical_axis_rules(rules):
        options = _CPU_MEMORY_COMPILER_OPTIONS if jax.default_backend() == "cpu" and not cpu_as_is else None
        compiled = p_step.lower(abstract, batch_abstract).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(ma, f"{n}_size_in_bytes")) for n in ("argument", "output", "alias", "temp"))
    trainable_n, total_n = plan.counts(abstract["params"])
    return {"kind": "memory", "impl": "ours", "model": variant, "task": task, "batch": batch, "seq": seq,
            "tokens_per_s": None,
            "options": MEMORY_TASKS[task], "lora_rank": lora_rank, "lora_targets": lora_targets if lora_rank else None,
            "mesh": list(mesh_shape), "dtype": dtype, "remat": remat, "scan_layers": scan_layers,
            "moments": moments, "base_dtype": base_dtype if lora_rank else cfg.param_dtype, "grad_accum": grad_accum,
            "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "peak_bytes": arg + out - alias + temp, "peak_gb": round((arg + out - alias + temp) / 1e9, 2),
            "trainable_params": trainable_n, "total_params": total_n, "compile_s": round(compile_s, 1),
            "backend": jax.default_backend(), "compiler_options": options}
