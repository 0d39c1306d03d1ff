"""Multiple-choice QA fine-tuning configs: `python -m biomedlm_jax.finetune_mcqa
--config=configs/mcqa.py:TASK --workdir=DIR --config.init_from=hf:/path/to/BioMedLM`.

Each variant reproduces one row of the BioMedLM paper's results table, with the head BioMedLM's
`finetune/` code used for it:

| variant | head | paper row (BioMedLM 2.7B) | data keys to point at the official files |
|---|---|---|---|
| medqa | choice: pair (`question[SEP]`, `" {option}[SEP]"`), Linear(d, 1) | MedQA (USMLE, 4 options) 50.3 | data.train / data.dev = phrases_no_exclude_{train,dev}.jsonl |
| medqa+medmcqa | choice, trained on MedQA plus MedMCQA items (`data.extra_train`) | MedQA 54.7 (with MedMCQA data) | as medqa, and data.extra_train = medmcqa=train.json |
| medmcqa | choice | MedMCQA 57.3 (dev) | data.train = train.json (original release), data.dev = dev.json |
| mmlu_medical | choice | MMLU medical genetics 69.0 (test) | data.train = an MMLU-format training file, data.dev = a folder:test |
| pubmedqa | seqcls: pair (context, question), Linear(d, 3, no bias) over maybe/no/yes | PubMedQA 74.4 (test) | data.train / data.dev = ori_pqal.json:train / :dev |
| bioasq | seqcls over no/yes | BioASQ 95.7 | data.train / data.dev = BioASQ task-b JSON (not redistributable) |

Every data key also takes the `*_hf` JSON-lines files BioMedLM's preprocessing scripts write
(`medqa_usmle_hf/train.json`, `pubmedqa_hf/dev.json`, ...); they are recognised by their keys.

Inputs are BioMedLM's token for token (`mcqa` module docstring): the same segments, the same added
tokens and ids, `[PAD]` padding, labels sorted alphabetically, and `data.truncation = "biomedlm"`,
what `tokenizer(..., truncation=True)` does (`longest_first` from the right). `"left"` cuts the first
segment (the context, or the question) from the left instead, so the question and option survive.
`data.append_eos` is off, as in BioMedLM's published PubMedQA command (its `gpt2_append_eos_tok`).

Only PubMedQA ships with this repository (`data/pubmedqa`), so it is the only variant whose data keys
have defaults. The others need `--config.data.train=PATH` (and `data.dev`, or a seeded carve of the
training file with `data.carve_dev_fraction`); the error names the file to pass and where to get it.

Hyper-parameters: sequence 512, warmup over half the steps, linear decay to 0, AdamW (0.9, 0.999) and
no weight decay follow BioMedLM's published fine-tuning commands (finetune/README.md in
stanford-crfm/BioMedLM; HF Trainer defaults otherwise). The learning rate (2e-5), batch (32) and length
(300 steps) are ours: those scripts leave them as placeholders. `pubmedqa-tiny` is the CPU demo: the
demo's tiny pretrained model on the shipped PubMedQA split.

Where these defaults still differ from BioMedLM's published commands, and why:
  * lr, batch, steps: placeholders there ({lr}, {grad_accum}, {num_epochs}), so ours (above).
  * PubMedQA's sequence length: a placeholder there ({seq_len}; its script's default is 128); 512 here,
    the value its MedQA command fixes, so a PubMedQA context (~300 tokens) is rarely cut.
  * PubMedQA's train/dev split: BioMedLM read BLURB's `pqal_fold0` files; `ori_pqal.json:train|dev` is a
    seeded, label-stratified 450/50 split of the same 500 non-test questions (BLURB's sizes, not its
    fold). Pass BioMedLM's `pubmedqa_hf/{train,dev}.json` as data.train / data.dev to use its fold.
  * Checkpoint kept: the best dev accuracy (evaluated every eval_every_steps) in WORKDIR/best;
    BioMedLM's commands use `--save_strategy no` and report the final model. The final step is
    in WORKDIR/checkpoints as well.
  * New embedding rows for the added tokens start at the mean of the old rows (transformers' current
    resize_token_embeddings default); BioMedLM's transformers version drew them at random. The rows
    for [PAD] / [CLS] never enter a pooled position; only [SEP]'s starting point differs.

LoRA variants (`TASK-lora`, e.g. `medqa-lora`, `pubmedqa-tiny-lora`; not in BioMedLM, which fine-tuned
every weight): rank 16 adapters (alpha 32, dropout 0.05) on all four projections, the frozen base in
bfloat16, and the head plus the added tokens' embedding rows trained (biomedlm_jax/models/lora.py). Learning
rate 2e-4, the usual tenfold of full fine-tuning's for LoRA; 4 questions per micro-batch
(grad_accum_steps 8 for the batch of 32, sized for one device: with N devices use 8 / N) and full
remat. `python -m biomedlm_jax.bench memory` reports what a variant needs (docs/finetuning_memory.md).

Full fine-tuning on one 40 GB GPU: `--config.optimizer.mu_dtype=bfloat16
--config.optimizer.nu_dtype=bfloat16 --config.model.remat_policy=full --config.grad_accum_steps=32`
(bf16 Adam moments, 1 question per micro-batch); same doc.
"""
import os

from biomedlm_jax.training import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBMEDQA = os.path.join(REPO, "data", "pubmedqa", "ori_pqal.json")

DEFAULT_FILES = {  # task -> (train, dev, carve_dev_fraction); "" = not shipped, the user passes the path
    "pubmedqa": (f"{PUBMEDQA}:train", f"{PUBMEDQA}:dev", 0.0),
    "medqa": ("", "", 0.0),
    "medmcqa": ("", "", 0.0),
    "mmlu_medical": ("", "", 0.0),
    "bioasq": ("", "", 0.0),
}


def get_config(arg=None):
    variant = arg or "pubmedqa"
    lora = variant.endswith("-lora")
    variant = variant.removesuffix("-lora")
    task, extra_train = variant.removesuffix("-tiny"), ""
    if task == "medqa+medmcqa":  # the paper's MedQA row with extra MedMCQA training data (54.7)
        task, extra_train = "medqa", "medmcqa="  # the MedMCQA file is the user's: medmcqa=PATH
    if task not in DEFAULT_FILES:
        raise ValueError(f"unknown MCQA variant {variant!r}; choose from {sorted(DEFAULT_FILES)}, medqa+medmcqa, "
                         "TASK-tiny, each optionally with -lora")
    c = configlib.train_config()
    c.data.task = "mcqa"
    c.data.mcqa_task = task
    c.data.train, c.data.dev, c.data.carve_dev_fraction = DEFAULT_FILES[task]
    c.data.extra_train = extra_train  # "TASK=PATH[:SPLIT],...": more training items for the same head (never dev)
    c.data.truncation = "biomedlm"  # longest_first from the right, as truncation=True | "left"
    c.data.append_eos = False  # seqcls: BioMedLM's gpt2_append_eos_tok, off in its published command
    c.optimizer.weight_decay = 0.0
    c.keep_checkpoints = 1
    if variant.endswith("-tiny"):
        c.model = configlib.model_section("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        c.seq_len = 128
        c.global_batch_size = 8
        c.num_train_steps = 120  # ~2 epochs of the 449 PubMedQA training items
        c.warmup_steps = 10
        c.learning_rate = 1e-3
        c.log_every_steps = 10
        c.eval_every_steps = 40
        c.checkpoint_every_steps = 40
    else:
        c.model = configlib.model_section(
            "biomedlm-2.7b", dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"
        )
        configlib.biomedlm_finetune_schedule(c)
        c.optimizer.decay_mode = "optax"
        c.seq_len = 512  # BioMedLM's max_seq_length for MedQA
        # Not published (left as {lr} / {epochs} / {grad_accum} there), so ours: lr 2e-5, batch 32, 300 steps.
        c.global_batch_size = 32
        c.num_train_steps = 300
        c.learning_rate = 2e-5
        c.mesh_shape = (1, -1, 1)
        c.log_every_steps = 10
        c.eval_every_steps = 50
        c.checkpoint_every_steps = 50
    if lora:  # one modest GPU: see the LoRA section of the docstring
        c.lora.rank, c.lora.alpha, c.lora.dropout = 16, 32.0, 0.05
        c.lora.targets = "qkv,attn_out,mlp_in,mlp_out"
        c.lora.base_dtype = "bfloat16"
        c.learning_rate = 2e-4 if not variant.endswith("-tiny") else 3e-3
        if not variant.endswith("-tiny"):
            c.grad_accum_steps = 8  # 4 questions per micro-batch on one device
            c.model.remat_policy = "full"
    c.lock()
    return c
