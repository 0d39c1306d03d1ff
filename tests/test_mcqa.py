"""MCQA: loaders and their errors, both heads, embedding resize, learning end to end, eval harness, zero-shot."""
import collections
import json
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from biomedlm_jax.core import errors
from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.formats import checkpoint, hf
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt as model_lib
from biomedlm_jax.models import gpt_config
from biomedlm_jax.tasks import mcqa, mcqa_data
from biomedlm_jax.training import configlib
from biomedlm_jax.training import trainer as train

SHARED = REPO.parent / "shared" / "data"
PUBMEDQA = REPO / "data" / "pubmedqa" / "ori_pqal.json"
GPT2 = str(REPO / "data" / "gpt2_tokenizer")
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")


def answer_counts(items):
    return dict(collections.Counter(i.options[i.answer] if i.options[0] in ("maybe", "no") else i.answer for i in items))


def test_pubmedqa_counts_and_splits_match_source():
    items = mcqa_data.load_pubmedqa(str(PUBMEDQA))
    assert len(items) == 1000 and answer_counts(items) == {"yes": 552, "no": 338, "maybe": 110}
    test = mcqa_data.load_pubmedqa(str(PUBMEDQA), "test")
    assert len(test) == 500 and answer_counts(test) == {"yes": 276, "no": 169, "maybe": 55}
    train, dev = mcqa_data.load_pubmedqa(str(PUBMEDQA), "train"), mcqa_data.load_pubmedqa(str(PUBMEDQA), "dev")
    assert (len(train), len(dev)) == (450, 50)
    assert not {i.id for i in train} & {i.id for i in dev} and not {i.id for i in dev} & {i.id for i in test}
    assert items[0].options == ("maybe", "no", "yes") and items[0].context


@needs_shared
def test_medmcqa_medqa_mmlu_counts_match_source():
    a = mcqa_data.load_medmcqa(str(SHARED / "medmcqa" / "dev_4183.jsonl"))
    assert len(a) == 4183 and answer_counts(a) == {0: 1348, 1: 1085, 2: 925, 3: 825}
    assert a[0].options[0].startswith("Impulse through")  # "A. " prefix removed
    b = mcqa_data.load_medmcqa(str(SHARED / "medmcqa" / "dev_subset2816_with_ids.jsonl"))
    assert len(b) == 2816
    q = mcqa_data.load_medqa(str(SHARED / "medqa_usmle" / "us_4options_test.jsonl"))
    assert len(q) == 1273 and answer_counts(q) == {0: 353, 1: 309, 2: 346, 3: 265}
    m = mcqa_data.load_mmlu(str(SHARED / "mmlu_medical" / "final_release_hf_format"), "test")
    assert len(m) == 1089 and collections.Counter(i.subject for i in m)["professional_medicine"] == 272
    orig = mcqa_data.load_mmlu(str(SHARED / "mmlu_medical" / "hendrycks_test_2020-09"), "val")  # letter answers, no header
    assert len(orig) == 14 + 29 + 16 + 22 + 11 + 31


@needs_shared
def test_extra_train_items_join_training_only(tmp_path):
    """medqa+medmcqa (the paper's 54.7 row): MedMCQA items are added to MedQA's training set; dev is untouched."""
    medqa, medmcqa = str(SHARED / "medqa_usmle" / "us_4options_test.jsonl"), str(SHARED / "medmcqa" / "dev_4183.jsonl")

    def config(variant, **data):
        c = configlib.load_config_file(str(REPO / "configs" / "mcqa.py"), variant)
        with c.unlocked():
            c.data.train, c.data.carve_dev_fraction = medqa, 0.1
            c.data.update(data)
        return c

    with pytest.raises(FileNotFoundError, match="extra_train=medmcqa=PATH with PATH the MedMCQA train.json"):
        mcqa.MCQATask(config("medqa+medmcqa")).items()  # the variant names the file the user must bring
    with_extra = mcqa.MCQATask(config("medqa+medmcqa", extra_train=f"medmcqa={medmcqa}")).items()
    alone = mcqa.MCQATask(config("medqa")).items()
    assert with_extra["dev"] == alone["dev"]
    assert len(with_extra["train"]) == len(alone["train"]) + 4183
    assert with_extra["train"][: len(alone["train"])] == alone["train"]

    def task_with(extra, task="medqa"):
        return mcqa.MCQATask(config(task, extra_train=extra))

    with pytest.raises(ValueError, match="pubmedqa .seqcls head.* cannot train the medqa choice head"):
        task_with(f"pubmedqa={PUBMEDQA}:train").items()
    with pytest.raises(ValueError, match="expected TASK=PATH"):
        task_with("nosuchtask=x.json").items()
    five = tmp_path / "five.jsonl"
    five.write_text(json.dumps({"question": "Q?", "options": dict(zip("ABCDE", "vwxyz")), "answer_idx": "B"}) + "\n")
    with pytest.raises(errors.DataError, match="five.jsonl:1: 5 options; medqa items have \\[4\\]"):
        task_with(f"medqa={five}").items()


def test_original_medmcqa_layout_and_bioasq(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text(json.dumps({"id": "u1", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 3}) + "\n")
    (item,) = mcqa_data.load_medmcqa(str(p))
    assert item.answer == 2 and item.options == ("a", "b", "c", "d") and item.id == "u1"
    b = tmp_path / "bioasq.json"
    b.write_text(json.dumps({"questions": [
        {"id": "1", "type": "yesno", "body": "Is TP53 a tumour suppressor?", "exact_answer": "yes",
         "snippets": [{"text": "TP53 encodes p53."}, {"text": "p53 suppresses tumours."}]},
        {"id": "2", "type": "factoid", "body": "Which gene?", "exact_answer": [["TP53"]]},
        {"id": "3", "type": "yesno", "body": "Is water a protein?", "exact_answer": "no", "snippets": []},
    ]}))
    items = mcqa_data.load_bioasq(str(b))
    assert [(i.id, i.options[i.answer]) for i in items] == [("1", "yes"), ("3", "no")]
    assert items[0].context == "TP53 encodes p53. p53 suppresses tumours."


@pytest.mark.parametrize("record,message", [
    ({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c"}, "answer_idx": "A"}, "3 options, expected 4"),
    ({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "E"}, "answer 'E' is not one of"),
    ({"question": "  ", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}, "empty question"),
    ({"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}, "bad MedMCQA record"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    p = tmp_path / "x.jsonl"
    good = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"}
    p.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(errors.DataError, match=rf"x.jsonl:2: .*{message}"):
        mcqa_data.load_medmcqa(str(p))
    p.write_text("not json\n")
    with pytest.raises(errors.DataError, match=r"x.jsonl:1: not valid JSON"):
        mcqa_data.load_medqa(str(p))


def test_out_of_range_answers_and_wrong_files(tmp_path):
    p = tmp_path / "dev.json"
    p.write_text(json.dumps({"question": "Q?", "choices": ["A. a", "B. b", "C. c", "D. d"], "answer": 4}) + "\n")
    with pytest.raises(errors.DataError, match=r"dev.json:1: answer 4 is out of range"):
        mcqa_data.load_medmcqa(str(p))
    csvf = tmp_path / "anatomy_test.csv"
    csvf.write_text("q,a,b,c\n")
    with pytest.raises(errors.DataError, match=r"anatomy_test.csv:1: 4 columns"):
        mcqa_data.load_mmlu(str(csvf))
    with pytest.raises(errors.DataError, match=r"expected an object keyed by PMID"):
        (tmp_path / "p.json").write_text("[1, 2]")
        mcqa_data.load_pubmedqa(str(tmp_path / "p.json"))


def tiny_model(head, num_labels=1, vocab=97):
    cfg = gpt_config.get_config("tiny", vocab_size=vocab, n_positions=32, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    model = mcqa.MCQAModel(cfg, head, num_labels)
    ids = jnp.ones((2, 3 if head == "choice" else 1, 16), jnp.int32)
    params = jax.tree.map(jnp.asarray, __import__("flax").linen.unbox(model.init(jax.random.PRNGKey(0), ids, ids > 0)["params"]))
    return model, params


@pytest.mark.slow
def test_heads_shapes_and_last_real_token():
    model, params = tiny_model("choice")
    assert params["score"]["kernel"].shape == (64, 1) and params["score"]["bias"].shape == (1,)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, (2, 3, 16)).astype(np.int32)
    lengths = np.array([[5, 9, 16], [1, 12, 7]])
    mask = np.arange(16)[None, None] < lengths[..., None]
    scores = model.apply({"params": params}, ids, mask)
    assert scores.shape == (2, 3) and scores.dtype == jnp.float32
    other = np.where(mask, ids, (ids + 13) % 97)  # change only the padding: scores must not move
    np.testing.assert_allclose(model.apply({"params": params}, other, mask), scores, atol=1e-6)
    ids2 = ids.copy()
    ids2[0, 0, 4] = (ids2[0, 0, 4] + 1) % 97  # change the last real token of one option
    changed = np.asarray(model.apply({"params": params}, ids2, mask) != scores)
    assert changed[0, 0] and changed.sum() == 1
    seq, sparams = tiny_model("seqcls", 3)
    assert "bias" not in sparams["score"] and sparams["score"]["kernel"].shape == (64, 3)
    assert seq.apply({"params": sparams}, ids[:, :1], mask[:, :1]).shape == (2, 3)


def test_added_tokens_resize_embeddings_and_survive_save_pretrained(tmp_path):
    tok = T.load_tokenizer(GPT2)
    ids = mcqa_data.add_task_tokens(tok, "choice")
    assert list(ids.values()) == [50257, 50258, 50259] and tok.get_vocab_size() == 50260
    assert mcqa_data.add_task_tokens(tok, "choice") == ids  # idempotent (resumed runs)
    seq = T.load_tokenizer(GPT2)
    assert list(mcqa_data.add_task_tokens(seq, "seqcls").values()) == list(range(50257, 50262))
    cfg = gpt_config.get_config("tiny", n_positions=32)
    params = M.init_params(M.GPT(cfg), jax.random.PRNGKey(0))
    grown = model_lib.resize_embeddings(params, 50260)
    old, new = np.asarray(params["wte"]["embedding"]), np.asarray(grown["wte"]["embedding"])
    np.testing.assert_array_equal(new[:50257], old)
    np.testing.assert_allclose(new[50257:], np.repeat(old.mean(0, keepdims=True), 3, 0), rtol=1e-6)
    big = M.GPT(cfg.replace(vocab_size=50260))
    hf.save_pretrained(big, grown, str(tmp_path / "hf"), tokenizer=tok)
    model2, params2 = hf.load_pretrained(str(tmp_path / "hf"))
    assert model2.config.vocab_size == 50260
    np.testing.assert_array_equal(np.asarray(params2["wte"]["embedding"]), new)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).convert_tokens_to_ids("[SEP]") == 50259


def test_accuracy_and_majority_baseline_on_known_predictions():
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    assert mcqa_data.accuracy(scores, np.array([1, 0, 1, 1])) == 0.75
    items = [mcqa_data.MCQItem(str(i), "q", ("a", "b", "c"), a) for i, a in enumerate([1, 1, 2, 0])]
    assert mcqa_data.majority_baseline(items, items) == 0.5


def synthetic_items(path, n, seed):
    """The correct option is the one word that also appears in the question."""
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "garden", "silver", "forest",
             "candle", "mirror", "desert", "button", "castle", "dragon", "feather", "harbor", "island"]
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            opts = r.sample(words, 4)
            ans = r.randrange(4)
            q = [r.choice([w for w in words if w not in opts]), opts[ans]]
            r.shuffle(q)
            f.write(json.dumps({"question": f"Which word appears in: {' '.join(q)}?",
                                "options": dict(zip("ABCD", opts)), "answer_idx": "ABCD"[ans]}) + "\n")


@pytest.mark.slow
def test_choice_head_learns_a_synthetic_task(tmp_path):
    synthetic_items(tmp_path / "train.jsonl", 2000, 0)
    synthetic_items(tmp_path / "dev.jsonl", 200, 1)
    c = configlib.load_config_file(str(REPO / "configs" / "mcqa.py"), "medqa-tiny")
    c.data.tokenizer, c.data.train, c.data.dev, c.data.carve_dev_fraction = GPT2, str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"), 0.0
    c.seq_len, c.global_batch_size, c.num_train_steps, c.learning_rate, c.warmup_steps = 24, 32, 600, 3e-3, 20
    c.eval_every_steps, c.checkpoint_every_steps, c.progress_bar, c.mesh_shape = 100, 600, False, (1, 1, 1)
    s = train.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1], task=mcqa.MCQATask(c))
    # What the choice head guarantees is learning far above chance (0.25; one standard deviation of a
    # chance-level score on 200 items is 0.03), not a figure tuned on one host. Matching the option to a
    # question word is learnt in a sudden step whose timing varies with the seed and the CPU's rounding:
    # at 300 steps the best accuracy was 0.66-0.93 over four seeds on an AMD EPYC and 0.85 on an AMX
    # Xeon (issue 44), so the old 0.9 bound failed on both. At 600 steps (the schedule's learning rate
    # stays higher for longer) it was 0.975-1.0 over seeds 0, 2, 4 and 5 on the EPYC (2026-12-06), and
    # 0.7, 15 standard deviations above chance, leaves a margin of 0.27 below every run measured.
    assert s["best_accuracy"] >= 0.7, s
    # the harness reads the best checkpoint and reproduces its dev accuracy
    from biomedlm_jax.evaluation import mcqa_eval

    res = mcqa_eval.evaluate({"medqa": str(tmp_path / "dev.jsonl")}, workdir=str(tmp_path / "run"), progress=False)
    assert res["medqa"]["accuracy"] == pytest.approx(s["best_accuracy"])
    assert "| medqa | dev.jsonl | 200 |" in mcqa_eval.results_table(res)


@pytest.mark.slow
def test_finetune_pubmedqa_cli_best_checkpoint_and_eval_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.finetune_mcqa", f"--config={REPO}/configs/mcqa.py:pubmedqa-tiny",
                        f"--workdir={tmp_path}", f"--config.data.tokenizer={GPT2}", "--config.num_train_steps=6",
                        "--config.eval_every_steps=3", "--config.progress_bar=false", "--config.seq_len=64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[mcqa] pubmedqa (seqcls head): 450 train / 50 dev" in r.stdout
    assert checkpoint.latest_step(str(tmp_path / "best")) in (3, 6)
    synthetic_items(tmp_path / "medqa.jsonl", 5, 0)
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_mcqa", f"--workdir={tmp_path}",
                        f"--tasks=pubmedqa,medqa={tmp_path / 'medqa.jsonl'}", "--max_items=40",
                        f"--out={tmp_path / 'res.json'}", f"--predictions={tmp_path / 'pred.jsonl'}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["pubmedqa"]["items"] == 40 and 0 <= res["pubmedqa"]["accuracy"] <= 1
    assert "skipped" in res["medqa"]  # a seqcls head does not answer 4-option questions
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    test_ids = [i.id for i in mcqa_data.load_pubmedqa(str(PUBMEDQA), "test")[:40]]
    assert [r["id"] for r in rows] == test_ids and {r["task"] for r in rows} == {"pubmedqa"}  # PMIDs, in file order
    assert all(len(r["logits"]) == 3 and r["pred"] == int(np.argmax(r["logits"])) for r in rows)
    assert np.mean([r["pred"] == r["label"] for r in rows]) == pytest.approx(res["pubmedqa"]["accuracy"])
    assert "| pubmedqa | ori_pqal.json:test | 40 |" in r.stdout and "74.4" in r.stdout
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_mcqa", f"--workdir={tmp_path}", "--tasks=medqa"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "medqa has no file shipped with this repository; pass medqa=PATH" in r.stderr


@pytest.mark.slow
def test_zero_shot_prefers_the_continuation_the_lm_learned(tmp_path):
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w") as f:
        for i in range(300):
            f.write(json.dumps({"id": str(i), "text": "Aspirin irreversibly inhibits cyclooxygenase enzymes."}) + "\n")
    from test_train import make_config

    c = make_config(str(corpus), num_train_steps=40, checkpoint_every_steps=40, seq_len=32, mesh_shape=(1, 1, 1))
    train.train_and_evaluate(c, str(tmp_path / "lm"), devices=jax.devices()[:1])
    model, params = checkpoint.load_model(str(tmp_path / "lm"))
    tok = T.load_tokenizer(GPT2)
    item = mcqa_data.MCQItem("1", "Aspirin irreversibly inhibits", ("thrombin receptors.", "cyclooxygenase enzymes.",
                                                                 "sodium channels."), 1)
    scores = mcqa.zero_shot_scores(model, params, tok, [item], template="{context}{question}", max_len=32)
    assert scores.shape == (1, 3) and int(scores.argmax()) == 1


def test_option_counts_are_checked_per_record_for_zero_shot_and_heads(tmp_path):
    """A MedQA file with one 3-option record: an error naming file:line, not a numpy reshape error."""
    p = tmp_path / "medqa.jsonl"
    four = {"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"}
    three = {"question": "Q3?", "options": {"A": "a", "B": "b", "C": "c"}, "answer_idx": "A"}
    p.write_text("".join(json.dumps(r) + "\n" for r in (four, three, four)))
    items = mcqa_data.load_task_file("medqa", str(p))
    match = r"medqa.jsonl:2: 3 options, but the other items have 4"
    with pytest.raises(errors.DataError, match=match):
        mcqa.zero_shot_scores(None, None, T.load_tokenizer(GPT2), items)
    tok = T.load_tokenizer(GPT2)
    mcqa_data.add_task_tokens(tok, "choice")
    with pytest.raises(errors.DataError, match=match):
        mcqa_data.encode(items, tok, "choice", 32)


def test_biomedlm_hf_files_load_and_bad_records_name_file_and_line(tmp_path):
    def write(name, *records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(tmp_path / name)

    mc = {"id": "train-00000", "sent1": "Which?", "sent2": "", "ending0": "a", "ending1": "b", "ending2": "c", "label": 2}
    (item,) = mcqa_data.load_task_file("medmcqa", write("mc.json", mc))
    assert (item.id, item.question, item.options, item.answer, item.header) == ("train-00000", "Which?", ("a", "b", "c"), 2, "")
    sc = {"id": "12345", "sentence1": "Is TP53 a tumour suppressor?", "sentence2": "TP53 encodes p53.", "label": "yes"}
    (item,) = mcqa_data.load_task_file("bioasq", write("bioasq_hf.json", sc))  # BioASQ: hand-written records
    assert (item.id, item.context, item.options[item.answer]) == ("12345", "TP53 encodes p53.", "yes")
    cases = [
        ("medqa", [mc, {k: v for k, v in mc.items() if k != "label"}], r"bad.json:2: not a BioMedLM multiple-choice record"),
        ("medqa", [mc, dict(mc, label="x")], r"bad.json:2: label 'x' is not an option index"),
        ("medqa", [mc, dict(mc, label=5)], r"bad.json:2: answer 5 is out of range for 3 options"),
        ("pubmedqa", [sc, dict(sc, label="perhaps")], r"bad.json:2: label 'perhaps' is not one of \['maybe', 'no', 'yes'\]"),
        ("pubmedqa", [sc, {"sentence2": "c", "label": "no"}], r"bad.json:2: not a BioMedLM sequence-classification"),
        ("medqa", [sc], r"BioMedLM seqcls records do not fit the medqa task's choice head"),
    ]
    for task, records, message in cases:
        with pytest.raises(errors.DataError, match=message):
            mcqa_data.load_task_file(task, write("bad.json", *records))
