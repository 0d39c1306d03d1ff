"""Seq2seq fine-tuning: loaders, document-level splits, answer-only loss, end-to-end with ROUGE-L."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, textgen_files

from biomedlm_jax.core import errors
from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config
from biomedlm_jax.tasks import seq2seq
from biomedlm_jax.training import configlib, losses, metrics

SHARED_MEDQUAD = REPO.parent / "shared" / "data" / "medquad"
GPT2 = str(REPO / "data" / "gpt2_tokenizer")


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(GPT2)


@pytest.mark.skipif(not SHARED_MEDQUAD.exists(), reason="needs ../shared/data/medquad")
def test_medquad_counts_per_folder_and_document_level_splits():
    stats = seq2seq.LoadStats()
    ex = seq2seq.read_medquad(str(SHARED_MEDQUAD), stats)
    per_folder = {}
    for e in ex:
        per_folder[e.source] = per_folder.get(e.source, 0) + 1
    # SOURCE.md: QA pairs per folder, all with non-empty answers
    assert per_folder == {"1_CancerGov_QA": 729, "4_MPlus_Health_Topics_QA": 981, "5_NIDDK_QA": 1192,
                          "6_NINDS_QA": 1088, "7_SeniorHealth_QA": 769, "8_NHLBI_QA_XML": 559, "9_CDC_QA": 270}
    assert len(ex) == 5588 and sum(stats.empty_answers.values()) == 0
    splits = seq2seq.split_by_document(ex, seed=0, dev_fraction=0.1, test_fraction=0.1)
    docs = {k: {e.doc_id for e in v} for k, v in splits.items()}
    assert not docs["train"] & docs["dev"] and not docs["train"] & docs["test"] and not docs["dev"] & docs["test"]
    assert sum(len(v) for v in splits.values()) == 5588
    assert splits == seq2seq.split_by_document(ex, seed=0, dev_fraction=0.1, test_fraction=0.1)
    assert splits != seq2seq.split_by_document(ex, seed=1, dev_fraction=0.1, test_fraction=0.1)


def test_empty_answers_are_skipped_and_counted_bad_xml_named(tmp_path):
    folder = tmp_path / "10_MPlus_ADAM_QA"
    folder.mkdir()
    (folder / "a.xml").write_text(
        '<Document id="1"><QAPairs><QAPair pid="1"><Question qid="1">What is X?</Question><Answer></Answer></QAPair>'
        '<QAPair pid="2"><Question qid="2">How is X treated?</Question><Answer>With rest.</Answer></QAPair>'
        "</QAPairs></Document>", encoding="utf-8")
    stats = seq2seq.LoadStats()
    ex = seq2seq.read_medquad(str(tmp_path), stats)
    assert [(e.question, e.answer) for e in ex] == [("How is X treated?", "With rest.")]
    assert stats.empty_answers == {"10_MPlus_ADAM_QA": 1}
    (folder / "b.xml").write_text("<Document id='2'><QAPairs>\n<QAPair></Document>", encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"b.xml:2: malformed XML"):
        seq2seq.read_medquad(str(tmp_path))
    stats = seq2seq.LoadStats()
    assert len(seq2seq.read_medquad(str(tmp_path), stats, on_error="skip")) == 1 and stats.errors_skipped == 1


def test_jsonl_and_textgen_loaders(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text('{"question": "Q1?", "answer": "A1.", "doc_id": "d1"}\n{"question": "Q2?"}\n{"question": "Q3?",\n',
                 encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"qa.jsonl:2: expected .* got keys \['question'\]"):
        seq2seq.read_qa_jsonl(str(p))
    stats = seq2seq.LoadStats()
    assert [e.doc_id for e in seq2seq.read_qa_jsonl(str(p), stats, on_error="skip")] == ["d1"]
    assert stats.errors_skipped == 2  # the record without an answer and the line that is not JSON
    p.write_text('{"question": "Q1?", "answer": "A1."}\n{"question": "Q3?",\n', encoding="utf-8")
    with pytest.raises(errors.DataError, match=r"qa.jsonl:2: not valid JSON"):
        seq2seq.read_qa_jsonl(str(p))
    (tmp_path / "train.source").write_text("long consumer question one\nquestion two\n")
    (tmp_path / "train.target").write_text("summary one\nsummary two\n")
    ex = seq2seq.read_textgen(str(tmp_path), "train")
    assert [(e.question, e.answer) for e in ex] == [("long consumer question one", "summary one"),
                                                    ("question two", "summary two")]
    (tmp_path / "val.source").write_text("a\nb\n")
    (tmp_path / "val.target").write_text("a\n")
    with pytest.raises(errors.DataError, match="val.source has 2 lines but .*val.target has 1"):
        seq2seq.read_textgen(str(tmp_path), "val")


@pytest.mark.slow
def test_loss_is_on_answer_tokens_only(tok):
    ex = [seq2seq.Example("What causes anemia?", "Low iron. " * 3, "d"), seq2seq.Example("Short?", "Yes.", "e")]
    rows = seq2seq.build_rows(ex, tok, 40, "Question: {question}\nAnswer:", " ")
    eos = tok.token_to_id(T.EOS_TOKEN)
    for i, e in enumerate(ex):
        p = len(tok.encode(f"Question: {e.question}\nAnswer:").ids)
        a = tok.encode(" " + e.answer).ids + [eos]
        assert rows.weights[i, : p - 1].sum() == 0  # targets inside the prompt
        assert rows.weights[i].sum() == len(a)  # every answer token and the EOS
        np.testing.assert_array_equal(rows.rows[i, 1:][rows.weights[i] > 0], a)
    # the loss the trainer computes does not change when prompt targets change
    cfg = gpt_config.get_config("tiny", vocab_size=50257, n_positions=64)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(0))
    inputs, targets = jnp.asarray(rows.rows[:, :-1]), jnp.asarray(rows.rows[:, 1:])
    w = jnp.asarray(rows.weights)

    def loss(params, targets):
        s, c = losses.token_nll_sum(model.apply({"params": params}, inputs), targets, w)
        return s / c

    other = jnp.where(w > 0, targets, (targets + 17) % 50257)
    assert float(loss(params, targets)) == float(loss(params, other))
    g1, g2 = jax.grad(loss)(params, targets), jax.grad(loss)(params, other)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)


def test_long_answers_truncated_from_the_end_and_counted(tok):
    ex = [seq2seq.Example("Q?", "word " * 200, "d")]
    rows = seq2seq.build_rows(ex, tok, 31, "Question: {question}\nAnswer:", " ")
    assert rows.answers_truncated == 1 and rows.prompts_truncated == 0
    assert rows.rows[0, -1] != tok.token_to_id(T.EOS_TOKEN)  # cut: no EOS at the end
    long_q = [seq2seq.Example("why " * 100 + "?", "ok", "d")]
    rows = seq2seq.build_rows(long_q, tok, 31, "Question: {question}\nAnswer:", " ")
    assert rows.prompts_truncated == 1 and rows.weights.sum() == len(tok.encode(" ok").ids) + 1


@pytest.mark.slow
def test_finetune_cli_end_to_end_with_rouge(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "biomedlm_jax.finetune_seq2seq", f"--config={REPO}/configs/seq2seq.py:tiny",
         f"--workdir={tmp_path}", f"--config.data.tokenizer={GPT2}", "--config.num_train_steps=6",
         "--config.eval_every_steps=3", "--config.checkpoint_every_steps=6", "--config.data.generate_examples=2",
         "--config.data.max_new_tokens=8", "--config.progress_bar=false"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[generate] ROUGE-L on 2 dev questions" in r.stdout
    rows = metrics.read_metrics(str(tmp_path), "generate")
    assert len(rows) == 1 and 0.0 <= rows[0]["rougeL"] <= 1.0
    gens = [json.loads(l) for l in (tmp_path / "generations_dev.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and {"question", "answer", "generated"} <= set(gens[0])
    c = configlib.load_config_file(str(REPO / "configs" / "seq2seq.py"), "medquad")
    assert c.data.task == "seq2seq" and c.model.variant == "biomedlm-2.7b" and c.data.no_repeat_ngram_size == 6


def test_rouge_l_matches_hand_computation():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 tokens; P = R = 5/6
    assert seq2seq.rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)


@pytest.mark.slow
def test_packed_rows_give_the_same_loss_and_gradients_as_one_example_per_row(tok):
    ex = [seq2seq.Example(f"Question number {i}?", "Answer " * (i % 5 + 1) + f"end {i}.", str(i)) for i in range(9)]
    plain = seq2seq.build_rows(ex, tok, 63, "Question: {question}\nAnswer:", " ")
    packed = seq2seq.build_rows(ex, tok, 63, "Question: {question}\nAnswer:", " ", pack=True)
    assert len(packed.rows) < len(plain.rows) and packed.weights.sum() == plain.weights.sum()
    assert packed.segments.max() > 1 and (packed.positions[packed.segments == 0] == 0).all()
    cfg = gpt_config.get_config("tiny", vocab_size=50257, n_positions=64)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(0))

    def total(params, r):
        kw = {} if r.segments is None else {"segment_ids": jnp.asarray(r.segments[:, :-1]),
                                            "position_ids": jnp.asarray(r.positions[:, :-1])}
        logits = model.apply({"params": params}, jnp.asarray(r.rows[:, :-1]), **kw)
        return losses.token_nll_sum(logits, jnp.asarray(r.rows[:, 1:]), jnp.asarray(r.weights))[0]

    loss_and_grad = jax.jit(jax.value_and_grad(total), static_argnums=1)  # op by op, this took 20 s
    (l_packed, g_packed), (l_plain, g_plain) = loss_and_grad(params, Rows(packed)), loss_and_grad(params, Rows(plain))
    np.testing.assert_allclose(float(l_packed), float(l_plain), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_packed, g_plain)


class Rows:
    """Hashable by identity, so a row set can be a static argument of jit (its arrays are constants)."""

    def __init__(self, rows):
        self.rows, self.weights, self.segments, self.positions = rows.rows, rows.weights, rows.segments, rows.positions


@pytest.mark.slow
def test_textgen_trains_in_biomedlm_layout_end_to_end(tmp_path):
    """textgen data defaults to BioMedLM's rows: the tokenizer gains [PAD] and <|startoftext|>, the
    vocabulary grows to hold them, and generation starts from `source <|startoftext|>`."""
    ex = seq2seq.read_medquad(str(REPO / "data" / "medquad"))
    data = textgen_files(tmp_path / "data", ex[:40], ex[40:48])
    r = subprocess.run(
        [sys.executable, "-m", "biomedlm_jax.finetune_seq2seq", f"--config={REPO}/configs/seq2seq.py:tiny",
         f"--workdir={tmp_path / 'run'}", f"--config.data.tokenizer={GPT2}", "--config.data.format=textgen",
         f"--config.data.path={data}", "--config.num_train_steps=4", "--config.eval_every_steps=4",
         "--config.checkpoint_every_steps=4", "--config.data.generate_examples=2", "--config.data.max_new_tokens=4",
         "--config.data.max_source_length=48", "--config.progress_bar=false"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "40 train / 8 dev / 0 test examples" in r.stdout and "biomedlm layout" in r.stdout
    from biomedlm_jax.formats import checkpoint

    _, meta = checkpoint.read_meta(str(tmp_path / "run"))
    assert meta["model"]["vocab_size"] == 50259  # GPT-2 + [PAD] + <|startoftext|>
    saved = T.load_tokenizer(checkpoint.tokenizer_dir(str(tmp_path / "run")))
    assert (saved.token_to_id("[PAD]"), saved.token_to_id("<|startoftext|>")) == (50257, 50258)
    assert len((tmp_path / "run" / "generations_dev.jsonl").read_text().splitlines()) == 2
