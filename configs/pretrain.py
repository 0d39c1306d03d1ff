"""Pretraining configs: `python -m biomedlm_jax.pretrain --config=configs/pretrain.py:VARIANT --workdir=DIR`.

Variants
  tiny           2-layer GPT on the abstracts shipped in data/ (GPT-2 tokenizer); a CPU run of ~1 minute.
  gpt2-small     124M GPT-2 with nanoGPT's recipe (lr 6e-4, 2k warmup, cosine to 10%, wd 0.1, b2 0.95,
                 ~0.5M-token batches); point `data.train_files` at your corpus.
  biomedlm-2.7b  BioMedLM's published recipe, from the model card (huggingface.co/stanford-crfm/BioMedLM,
                 "Training Details") and the paper (Bolton et al. 2024, arXiv:2403.18421):
                 32 layers x 2560, 20 heads, vocab 28,896, sequence 1024, global batch 1024 sequences,
                 300B tokens (= 286,102 steps of 1,048,576 tokens, ~8.7 passes over 34.6B tokens),
                 Decoupled AdamW (Composer semantics, see training/optim.py) with lr 1.6e-4 and weight decay
                 1.6e-5, bf16 compute with fp32 params and optimizer state, FSDP.
                 Not published, so chosen here: b1/b2/eps 0.9/0.95/1e-8, linear warmup over 1% of the
                 steps, cosine decay to 10% of the peak, global-norm clipping at 1.0, no dropout.
                 Needs `data.tokenizer` = the BioMedLM tokenizer (or `init_from=hf:DIR` holding one).

Every key can be overridden: `--config.learning_rate=3e-4 --config.model.n_layer=4`. The config is
locked, so a misspelled key is an error. `model` fields left None come from `model.variant` (or, with
`init_from`, from that checkpoint).
"""
import os

from biomedlm_jax.training import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_ABSTRACTS = os.path.join(REPO, "data", "pubmed_abstracts", "abstracts.jsonl")
GPT2_TOKENIZER = os.path.join(REPO, "data", "gpt2_tokenizer")


def get_config(arg=None):
    variant = arg or "tiny"
    c = configlib.train_config(SAMPLE_ABSTRACTS, GPT2_TOKENIZER)
    if variant == "tiny":
        c.model = configlib.model_section("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    elif variant == "gpt2-small":
        c.model = configlib.model_section(
            "gpt2-small", dtype="bfloat16", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0
        )
        c.seq_len = 1024
        c.global_batch_size = 512
        c.grad_accum_steps = 4
        c.num_train_steps = 600_000
        c.warmup_steps = 2_000
        c.learning_rate = 6e-4
        c.optimizer.decay_mode = "optax"
        c.optimizer.weight_decay = 0.1
        c.log_every_steps = 100
        c.eval_every_steps = 2_000
        c.eval_batches = 50
        c.checkpoint_every_steps = 2_000
    elif variant == "biomedlm-2.7b":
        c.model = configlib.model_section(
            "biomedlm-2.7b", dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"
        )
        c.seq_len = 1024
        c.global_batch_size = 1024
        c.grad_accum_steps = 1  # raise it when 1024 sequences do not fit the slice in one step
        c.num_train_steps = 286_102  # 300e9 tokens / (1024 * 1024)
        c.warmup_steps = 2_861  # 1% (not published)
        c.learning_rate = 1.6e-4
        c.optimizer.decay_mode = "composer"
        c.optimizer.weight_decay = 1.6e-5
        c.mesh_shape = (1, -1, 1)  # FSDP over all devices, as BioMedLM trained (PyTorch FSDP)
        c.log_every_steps = 50
        c.eval_every_steps = 2_000
        c.eval_batches = 50
        c.checkpoint_every_steps = 1_000
        c.data.tokenizer = ""
    else:
        raise ValueError(f"unknown pretrain variant {variant!r}; choose tiny, gpt2-small or biomedlm-2.7b")
    c.lock()
    return c
