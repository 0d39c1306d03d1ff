"""Seq2seq fine-tuning configs (answer-only loss): `python -m biomedlm_jax.finetune_seq2seq
--config=configs/seq2seq.py:VARIANT --workdir=DIR --config.init_from=hf:DIR|orbax:WORKDIR`.

Variants
  medquad  BioMedLM 2.7B on MedQuAD consumer-health QA (the paper's generation use case). Set
           `init_from=hf:/path/to/BioMedLM` and `data.path` to a MedQuAD checkout (the default is the
           CDC folder shipped in data/medquad). From BioMedLM's textgen fine-tuning command
           (finetune/README.md in stanford-crfm/BioMedLM): warmup over half the steps, linear decay to
           0, no weight decay, AdamW (0.9, 0.999), bf16. Ours (not published): sequence 1024, batch 32,
           lr 2e-5, and 420 steps = 3 passes over the ~4.5k training pairs of the seven answer-bearing
           MedQuAD folders (5,588 pairs).
  tiny     The tiny model on the shipped CDC sample, for CPU runs, tests and `make demo`. Use
           `init_from=orbax:demo_out/pretrain` (or set `data.tokenizer` for a random init).

Data keys (`data.*`): format (medquad | jsonl | textgen), path, layout, split_seed / dev_fraction /
test_fraction (document-level split), on_error (raise | skip), max_examples (0 = all), and for the
end-of-run generation eval generate_examples, max_new_tokens, no_repeat_ngram_size (BioMedLM's
generation used 6). The tokenizer comes from `init_from` unless `data.tokenizer` is set.

Row layout (`data.layout`): textgen data (`<split>.source` / `<split>.target`) defaults to BioMedLM's
own, token for token: `source <|startoftext|> target <|endoftext|>`, `[PAD]` and `<|startoftext|>`
added to the tokenizer, source and target cut at max_source_length / max_target_length (510, its
defaults), loss on the target and EOS. MedQuAD and JSONL default to the "template" layout
(`prompt_template` + `answer_prefix` + answer + EOS): BioMedLM published no MedQuAD preprocessing,
and a "Question: ... Answer:" prompt lets the plain pretrained LM answer before any fine-tuning. Set
`data.layout=biomedlm` to train them in BioMedLM's layout instead.
"""
import os

from biomedlm_jax.training import configlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDQUAD_SAMPLE = os.path.join(REPO, "data", "medquad")


def get_config(arg=None):
    variant = arg or "medquad"
    c = configlib.train_config()
    c.data.task = "seq2seq"
    c.data.format = "medquad"
    c.data.path = MEDQUAD_SAMPLE
    c.data.layout = ""  # "" = biomedlm for textgen data, template otherwise | biomedlm | template
    c.data.max_source_length = 510  # biomedlm layout (BioMedLM's defaults)
    c.data.max_target_length = 510
    c.data.prompt_template = "Question: {question}\nAnswer:"
    c.data.answer_prefix = " "
    c.data.split_seed = 0
    c.data.dev_fraction = 0.1
    c.data.test_fraction = 0.1
    c.data.on_error = "raise"
    c.data.max_examples = 0
    c.data.pack = False  # several examples per row, attention kept inside each example
    c.data.generate_examples = 32
    c.data.max_new_tokens = 128
    c.data.no_repeat_ngram_size = 6
    c.optimizer.decay_mode = "composer"
    c.optimizer.weight_decay = 0.0
    c.keep_checkpoints = 1
    if variant == "medquad":
        c.model = configlib.model_section(
            "biomedlm-2.7b", dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"
        )
        configlib.biomedlm_finetune_schedule(c)  # BioMedLM's textgen command
        c.seq_len = 1024
        c.global_batch_size = 32
        c.num_train_steps = 420
        c.learning_rate = 2e-5
        c.mesh_shape = (1, -1, 1)
        c.log_every_steps = 10
        c.eval_every_steps = 100
        c.checkpoint_every_steps = 100
    elif variant == "tiny":
        c.model = configlib.model_section("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        c.seq_len = 127  # rows of 128 tokens fit the tiny model's 128 positions
        c.global_batch_size = 8
        c.num_train_steps = 100
        c.warmup_steps = 10
        c.learning_rate = 1e-3
        c.eval_every_steps = 50
        c.checkpoint_every_steps = 50
        c.data.generate_examples = 8
        c.data.max_new_tokens = 48
    else:
        raise ValueError(f"unknown seq2seq variant {variant!r}; choose medquad or tiny")
    c.lock()
    return c
