"""Fine-tuned classifiers in and out, against torch.

In: a random-init classifier in BioMedLM's own layout (its `finetune/utils/custom_modeling_gpt2.py`
GPT2ForMultipleChoice / GPT2ForSequenceClassification, re-stated below in a few torch lines) or
transformers' GPT2ForSequenceClassification, saved the way `transformers` saves it (tokenizer included,
after a padded call), gives the same per-item logits here as in torch on the inputs BioMedLM builds.
Out: a head fine-tuned here, exported with `convert`, loads in transformers with the same logits.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, biomedlm_hf_tokenizer, gpt2_hf_files

from biomedlm_jax.core import errors
from biomedlm_jax.evaluation import mcqa_eval
from biomedlm_jax.tasks import mcqa, mcqa_data
from biomedlm_jax.training import configlib, trainer
from biomedlm_jax.workflows import convert

PUBMEDQA = REPO / "data" / "pubmedqa" / "ori_pqal.json"
GPT2_FILES = REPO / "data" / "gpt2_tokenizer"
TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)


def hf_tokenizer(head):
    """GPT-2's tokenizer in transformers, with the tokens BioMedLM's script for `head` adds."""
    import tempfile

    return biomedlm_hf_tokenizer(gpt2_hf_files(tempfile.mkdtemp()), head)


def biomedlm_classifier(head, num_labels=3):
    """BioMedLM's fine-tuning classes: GPT2Model + `classifier`, pooled at the last non-pad token."""
    import torch
    from transformers import GPT2Model

    class Classifier(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.transformer = GPT2Model(config)
            self.classifier = torch.nn.Linear(config.n_embd, 1 if head == "choice" else num_labels, bias=head == "choice")

        def forward(self, input_ids):
            shape = input_ids.shape
            flat = input_ids.view(-1, shape[-1])
            mask = flat.ne(self.config.pad_token_id)
            logits = self.classifier(self.transformer(flat, attention_mask=mask.long()).last_hidden_state)
            pooled = logits[torch.arange(flat.shape[0]), mask.sum(-1) - 1]
            return pooled.view(shape[0], -1)

    return Classifier


def perturb(model, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if ("ln" in name or name.endswith("bias")) else 0.02))
    return model.eval()


def save_biomedlm_layout(model, tok, out, architecture, **config):
    """What BioMedLM's Trainer.save_model writes: config.json, safetensors weights, the tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [architecture]
    for k, v in config.items():
        setattr(model.config, k, v)
    model.config.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tok(["a", "b c"], padding="max_length", max_length=64, truncation=True)  # leaves padding state in tokenizer.json
    tok.save_pretrained(str(out))


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).float().numpy()


def pubmedqa_items(n=12):
    return mcqa_data.load_pubmedqa(str(PUBMEDQA), "test")[:n]


def choice_items(n=10):
    words = ["aspirin", "insulin", "heparin", "warfarin", "statin", "metformin"]
    rng = np.random.default_rng(0)
    return [mcqa_data.MCQItem(str(i), f"Which drug is number {i} in the list {' '.join(words)}?",
                         tuple(rng.permutation(words)[:4].tolist()), int(rng.integers(4)), where=f"synthetic:{i}")
            for i in range(n)]


@pytest.fixture(scope="module")
def biomedlm_seqcls(tmp_path_factory):
    from transformers import GPT2Config

    tok = hf_tokenizer("seqcls")
    cfg = GPT2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY)
    model = perturb(biomedlm_classifier("seqcls")(cfg), 0)
    out = tmp_path_factory.mktemp("biomedlm_seqcls")
    save_biomedlm_layout(model, tok, out, "GPT2ForSequenceClassification", num_labels=3,
                         id2label={0: "maybe", 1: "no", 2: "yes"}, label2id={"maybe": 0, "no": 1, "yes": 2})
    return model, tok, out


def test_biomedlm_seqcls_classifier_gives_its_logits_here(biomedlm_seqcls, tmp_path):
    model, tok, out = biomedlm_seqcls
    items = pubmedqa_items()
    ref_ids = tok([i.context for i in items], [i.question for i in items], padding="max_length", max_length=64,
                  truncation=True)["input_ids"]  # run_seqcls_gpt.py
    clf = mcqa.load_classifier(f"hf:{out}")
    assert clf.head["head"] == "seqcls" and clf.head["labels"] == ["maybe", "no", "yes"]
    assert clf.model.config.vocab_size == 50262  # GPT-2 + [PAD] + four added tokens
    enc = mcqa_data.encode(items, clf.tok, "seqcls", 64)  # the saved tokenizer's padding state is ignored
    np.testing.assert_array_equal(enc.ids[:, 0], ref_ids)
    ours = mcqa.predict(clf.model, clf.params, enc)
    np.testing.assert_allclose(ours, torch_logits(model, ref_ids), atol=1e-4, rtol=1e-4)
    res = mcqa_eval.evaluate({"pubmedqa": f"{PUBMEDQA}:test"}, init_from=f"hf:{out}", max_items=12, seq_len=64,
                                 progress=False, predictions=str(tmp_path / "pred.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [i.id for i in items]
    np.testing.assert_allclose([r["logits"] for r in rows], ours, atol=1e-5)
    assert res["pubmedqa"]["accuracy"] == pytest.approx(np.mean([r["pred"] == r["label"] for r in rows]))


@pytest.mark.slow
def test_finetune_continues_a_biomedlm_classifier(biomedlm_seqcls, tmp_path):
    """finetune_mcqa --config.init_from=hf:DIR starts from the classifier's head, not a fresh one."""
    import torch

    model, tok, out = biomedlm_seqcls
    c = configlib.load_config_file(str(REPO / "configs" / "mcqa.py"), "pubmedqa-tiny")
    c.init_from, c.seq_len, c.num_train_steps, c.eval_every_steps = f"hf:{out}", 64, 1, 1
    c.progress_bar, c.mesh_shape, c.model.variant = False, (1, 1, 1), ""
    s = trainer.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1], task=mcqa.MCQATask(c))
    dev = mcqa_data.load_pubmedqa(str(PUBMEDQA), "dev")
    ids = tok([i.context for i in dev], [i.question for i in dev], padding="max_length", max_length=64,
              truncation=True)["input_ids"]
    logits = torch.tensor(torch_logits(model, ids))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([i.answer for i in dev])).item()
    assert s["initial_eval_loss"] == pytest.approx(loss, abs=1e-4)
    assert s["initial_accuracy"] == pytest.approx(float((logits.argmax(-1).numpy() == [i.answer for i in dev]).mean()))


def test_transformers_seqcls_with_its_own_label_order(tmp_path):
    """transformers' GPT2ForSequenceClassification (`score.weight`), labels in a non-alphabetical order:
    our per-item logits come out in the task's label order."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = hf_tokenizer("seqcls")
    labels = ["yes", "no", "maybe"]
    cfg = GPT2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=3,
                     id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)}, **TINY)
    model = perturb(GPT2ForSequenceClassification(cfg), 1)
    model.save_pretrained(str(tmp_path / "clf"))
    tok.save_pretrained(str(tmp_path / "clf"))
    items = pubmedqa_items(8)
    ids = tok([i.context for i in items], [i.question for i in items], padding="max_length", max_length=48,
              truncation=True, return_tensors="pt")["input_ids"]
    import torch

    with torch.no_grad():
        ref = model(ids).logits.numpy()[:, [labels.index(lab) for lab in mcqa_data.PUBMEDQA_LABELS]]
    mcqa_eval.evaluate({"pubmedqa": f"{PUBMEDQA}:test"}, init_from=f"hf:{tmp_path / 'clf'}", max_items=8,
                           seq_len=48, progress=False, predictions=str(tmp_path / "p.jsonl"))
    ours = [json.loads(line)["logits"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_biomedlm_choice_classifier_gives_its_logits_here(tmp_path):
    from transformers import GPT2Config

    tok = hf_tokenizer("choice")
    cfg = GPT2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **TINY)
    model = perturb(biomedlm_classifier("choice")(cfg), 2)
    save_biomedlm_layout(model, tok, tmp_path / "clf", "GPT2ForMultipleChoice")
    items = choice_items()
    first = [i.question + "[SEP]" for i in items for _ in range(4)]
    second = [f" {o}[SEP]" for i in items for o in i.options]
    flat = tok(first, second, truncation=True, max_length=24, padding="max_length")["input_ids"]  # run_multiple_choice.py
    ref_ids = np.asarray(flat).reshape(len(items), 4, 24)
    clf = mcqa.load_classifier(f"hf:{tmp_path / 'clf'}")
    assert clf.head["head"] == "choice"
    enc = mcqa_data.encode(items, clf.tok, "choice", 24)
    np.testing.assert_array_equal(enc.ids, ref_ids)
    assert enc.truncated > 0
    np.testing.assert_allclose(mcqa.predict(clf.model, clf.params, enc), torch_logits(model, ref_ids),
                               atol=1e-4, rtol=1e-4)


def test_plain_lm_is_not_a_classifier_and_bad_heads_are_named(tmp_path):
    from conftest import make_hf_model

    make_hf_model(tmp_path / "lm", **TINY)
    with pytest.raises(mcqa.NotAClassifier, match="without a classifier head; score it with --zero_shot"):
        mcqa.load_classifier(f"hf:{tmp_path / 'lm'}")
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    cfg["architectures"] = ["GPT2ForSequenceClassification"]
    (tmp_path / "lm" / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(errors.CheckpointError, match="names a seqcls classifier but the weights hold no classifier.weight"):
        mcqa.load_classifier(f"hf:{tmp_path / 'lm'}")


def finetune(tmp_path, variant, data_file=None, *extra):
    args = [sys.executable, "-m", "biomedlm_jax.finetune_mcqa", f"--config={REPO}/configs/mcqa.py:{variant}",
            f"--workdir={tmp_path}", f"--config.data.tokenizer={GPT2_FILES}", "--config.num_train_steps=4",
            "--config.eval_every_steps=2", "--config.progress_bar=false", "--config.seq_len=32"]
    if data_file:
        args += [f"--config.data.train={data_file}", "--config.data.carve_dev_fraction=0.3"]
    r = subprocess.run(args + list(extra), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_exported_seqcls_head_loads_in_transformers_with_our_logits(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    finetune(tmp_path / "run", "pubmedqa-tiny")
    convert.convert(f"orbax:{tmp_path / 'run'}", f"hf:{tmp_path / 'hf'}")
    clf = mcqa.load_classifier(f"orbax:{tmp_path / 'run'}")  # the best checkpoint, as convert used
    items = pubmedqa_items(10)
    ours = mcqa.predict(clf.model, clf.params, mcqa_data.encode(items, clf.tok, "seqcls", 32))
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert model.config.id2label == {0: "maybe", 1: "no", 2: "yes"} and tok.pad_token == "[PAD]"
    batch = tok([i.context for i in items], [i.question for i in items], truncation=True, max_length=32,
                padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # and back in: the export is itself a classifier we load
    back = mcqa.load_classifier(f"hf:{tmp_path / 'hf'}")
    np.testing.assert_allclose(mcqa.predict(back.model, back.params, mcqa_data.encode(items, back.tok, "seqcls", 32)),
                               ours, atol=1e-6)


@pytest.mark.slow
def test_a_bf16_trained_classifier_scores_in_fp32_like_its_export(tmp_path):
    """evaluate_mcqa --dtype=float32: a run trained with bf16 compute is scored in fp32, and its logits are
    then its fp32 HF export's (in its own bf16, they are not)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    finetune(tmp_path / "run", "pubmedqa-tiny", None, "--config.model.dtype=bfloat16")
    convert.convert(f"orbax:{tmp_path / 'run'}", f"hf:{tmp_path / 'hf'}")
    logits = {}
    for dtype in ("float32", None):
        pred = tmp_path / f"pred-{dtype}.jsonl"
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_mcqa", f"--workdir={tmp_path / 'run'}",
                            f"--tasks=pubmedqa={PUBMEDQA}:test", "--max_items=12", "--seq_len=32",
                            f"--predictions={pred}", f"--out={tmp_path / 'res.json'}"]
                           + ([f"--dtype={dtype}"] if dtype else []), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        logits[dtype] = np.asarray([json.loads(line)["logits"] for line in pred.read_text().splitlines()])
    items = mcqa_data.load_pubmedqa(str(PUBMEDQA), "test")[:12]
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    batch = tok([i.context for i in items], [i.question for i in items], truncation=True, max_length=32,
                padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits.numpy()
    np.testing.assert_allclose(logits["float32"], theirs, atol=1e-4, rtol=1e-4)
    assert np.abs(logits[None] - theirs).max() > 1e-4  # in the run's own bf16 compute they are not


@pytest.mark.slow
def test_exported_choice_head_loads_with_biomedlm_class(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GPT2Config

    data = tmp_path / "items.jsonl"
    with open(data, "w") as f:
        for item in choice_items(30):
            f.write(json.dumps({"question": item.question, "options": dict(zip("ABCD", item.options)),
                                "answer_idx": "ABCD"[item.answer]}) + "\n")
    finetune(tmp_path / "run", "medqa-tiny", str(data), "--config.model.scan_layers=true")  # stacked layers export too
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.convert", f"--from=orbax:{tmp_path / 'run'}",
                        f"--to=hf:{tmp_path / 'hf'}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # docs/mcqa.md: BioMedLM's GPT2ForMultipleChoice layout, loaded in a few torch lines
    config = GPT2Config.from_pretrained(str(tmp_path / "hf"))
    assert config.architectures == ["GPT2ForMultipleChoice"] and config.pad_token_id == 50257
    model = biomedlm_classifier("choice")(config)
    model.load_state_dict(load_file(str(tmp_path / "hf" / "model.safetensors")), strict=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    items = choice_items(6)
    flat = tok([i.question + tok.sep_token for i in items for _ in range(4)],
               [f" {o}{tok.sep_token}" for i in items for o in i.options], truncation=True, max_length=32,
               padding="max_length")["input_ids"]
    clf = mcqa.load_classifier(f"orbax:{tmp_path / 'run'}")
    enc = mcqa_data.encode(items, clf.tok, "choice", 32)
    np.testing.assert_array_equal(enc.ids, np.asarray(flat).reshape(6, 4, 32))
    np.testing.assert_allclose(mcqa.predict(clf.model, clf.params, enc), torch_logits(model.eval(), enc.ids),
                               atol=1e-4, rtol=1e-4)
