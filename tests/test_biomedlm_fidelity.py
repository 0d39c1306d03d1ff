"""Inputs equal to BioMedLM's own fine-tuning code, token for token.

The reference side re-runs BioMedLM's preprocessing (github stanford-crfm/BioMedLM, `finetune/`) with
`transformers`' tokenizer, called exactly as its scripts call it:

  * `seqcls/preprocess_blurb_seqcls.py` builds {"sentence1": question, "sentence2": context, "label"}
    and `seqcls/run_seqcls_gpt.py` encodes `tokenizer(contexts, questions, padding="max_length",
    max_length=L, truncation=True)` after adding [PAD] and four plain tokens;
  * `mc/preprocess_medqa.py` builds {"sent1": question, "sent2": "", "ending0".., "label"} and
    `mc/run_multiple_choice.py` encodes `tokenizer([sent1 + sep] * n, [f"{sent2} {ending}" + sep],
    truncation=True, max_length=L)` after adding [PAD], [CLS], [SEP].

BioMedLM published no preprocessing for MedMCQA and MMLU; they get MedQA's (question in sent1).
Our side is `mcqa_data.load_task_file` + `mcqa_data.encode` with the defaults. Rows are short, so truncation
happens in most items.
"""
import json

import numpy as np
import pytest
from conftest import REPO, SEQCLS_EXTRA, biomedlm_hf_tokenizer, gpt2_hf_files

from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.tasks import mcqa_data

SHARED = REPO.parent / "shared" / "data"
PUBMEDQA = REPO / "data" / "pubmedqa" / "ori_pqal.json"
MEDQA = SHARED / "medqa_usmle" / "us_4options_test.jsonl"
MEDMCQA = SHARED / "medmcqa" / "dev_4183.jsonl"
MMLU = SHARED / "mmlu_medical" / "final_release_hf_format" / "test"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
N = 120  # items per task


@pytest.fixture(scope="module", params=["gpt2", "pubmed-bpe"])
def tokenizer_dir(request, tmp_path_factory):
    """A tokenizer folder both sides load: GPT-2's files, or a small byte-level BPE trained here the way
    BioMedLM trained its own (a domain vocabulary splits the text differently)."""
    out = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        gpt2_hf_files(out)
    else:
        lines = (REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl").read_text().splitlines()[:600]
        texts = [json.loads(line).get("text") or json.loads(line).get("abstract", "") for line in lines]
        T.save_tokenizer(T.train_bpe(texts, vocab_size=3000, show_progress=False), str(out))
    return str(out)


hf_tokenizer = biomedlm_hf_tokenizer


def our_tokenizer(path, head):
    tok = T.load_tokenizer(path)
    mcqa_data.add_task_tokens(tok, head)
    return tok


# ---- BioMedLM's preprocessing scripts, re-run on the raw files -------------------------------------


def pubmedqa_records(path, n):
    data = json.loads(path.read_text())
    out = []
    for pmid, obj in list(data.items())[:n]:
        context = " ".join([c.strip() for c in obj["CONTEXTS"] if c.strip()])
        out.append({"id": pmid, "sentence1": obj["QUESTION"].strip(), "sentence2": context,
                    "label": obj["final_decision"].strip()})
    return out


def medqa_style_records(path, n):
    out = []
    for i, line in enumerate(path.read_text().splitlines()[:n]):
        stmt = json.loads(line)
        if "choices" in stmt:  # MedMCQA's re-export: "A. text" options, 0-based answer
            ends, label = [c[3:] for c in stmt["choices"]], stmt["answer"]
        else:
            ends, label = [stmt["options"][key] for key in "ABCD"], ord(stmt["answer_idx"]) - ord("A")
        out.append({"id": f"test-{i:05d}", "sent1": stmt["question"], "sent2": "", "ending0": ends[0],
                    "ending1": ends[1], "ending2": ends[2], "ending3": ends[3], "label": label})
    return out


def mmlu_records(folder, n):
    import csv

    out = []
    for f in sorted(folder.glob("*_test.csv")):
        with open(f, newline="", encoding="utf-8") as fh:
            for row in list(csv.reader(fh))[1: n // 6 + 2]:
                out.append({"id": f.name, "sent1": row[0], "sent2": "", **{f"ending{i}": row[1 + i] for i in range(4)},
                            "label": int(row[5])})
    return out[:n]


def seqcls_reference(tok, records, max_len, append_eos=False):
    """run_seqcls_gpt.py's preprocess_function (pad_to_max_length defaults to True there)."""
    label_list = sorted({r["label"] for r in records})
    result = tok([r["sentence2"] for r in records], [r["sentence1"] for r in records], padding="max_length",
                 max_length=max_len, truncation=True)
    ids = np.asarray(result["input_ids"])
    if append_eos:  # gpt2_append_eos_tok
        lengths = np.minimum((ids != tok.pad_token_id).sum(-1), max_len - 1)
        ids[np.arange(len(ids)), lengths] = tok.eos_token_id
    return ids, np.asarray([label_list.index(r["label"]) for r in records]), label_list


def choice_reference(tok, records, max_len):
    """run_multiple_choice.py's preprocess_function; the collator then pads with the pad token."""
    n = len([k for k in records[0] if k.startswith("ending")])
    first = [r["sent1"] + tok.sep_token for r in records for _ in range(n)]
    second = [f"{r['sent2']} {r[f'ending{j}']}" + tok.sep_token for r in records for j in range(n)]
    flat = tok(first, second, truncation=True, max_length=max_len)["input_ids"]
    ids = np.full((len(records), n, max_len), tok.pad_token_id)
    for i, row in enumerate(flat):
        ids[i // n, i % n, : len(row)] = row
    return ids, np.asarray([int(r["label"]) for r in records])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- the tests --------------------------------------------------------------------------------------


def test_pubmedqa_inputs_equal_biomedlm(tokenizer_dir, tmp_path):
    max_len = 96  # PubMedQA contexts are ~250 tokens: nearly every item is cut
    ref_tok = hf_tokenizer(tokenizer_dir, "seqcls")
    records = pubmedqa_records(PUBMEDQA, N)
    ref_ids, ref_labels, label_list = seqcls_reference(ref_tok, records, max_len)
    tok = our_tokenizer(tokenizer_dir, "seqcls")
    assert tuple(label_list) == mcqa_data.PUBMEDQA_LABELS
    assert [tok.token_to_id(t) for t in ["[PAD]"] + SEQCLS_EXTRA] == ref_tok.convert_tokens_to_ids(["[PAD]"] + SEQCLS_EXTRA)
    assert tok.get_vocab_size() == len(ref_tok)
    items = mcqa_data.load_task_file("pubmedqa", str(PUBMEDQA))[:N]
    enc = mcqa_data.encode(items, tok, "seqcls", max_len)
    np.testing.assert_array_equal(enc.ids[:, 0], ref_ids)
    np.testing.assert_array_equal(enc.labels, ref_labels)
    assert np.array_equal(enc.mask[:, 0], ref_ids != ref_tok.pad_token_id)
    assert 0 < enc.truncated < N or enc.truncated == N  # counted
    assert enc.truncated == sum(len(ref_tok(r["sentence2"], r["sentence1"])["input_ids"]) > max_len for r in records)
    # BioMedLM's processed file (pubmedqa_hf/*.json) loads as it is and encodes the same
    hf_items = mcqa_data.load_task_file("pubmedqa", write_jsonl(tmp_path / "test.json", records))
    assert [i.id for i in hf_items] == [r["id"] for r in records]
    np.testing.assert_array_equal(mcqa_data.encode(hf_items, tok, "seqcls", max_len).ids, enc.ids)
    # gpt2_append_eos_tok=1: EOS after the text, or over the last token of a full row
    eos_ids, _, _ = seqcls_reference(ref_tok, records, max_len, append_eos=True)
    np.testing.assert_array_equal(mcqa_data.encode(items, tok, "seqcls", max_len, append_eos=True).ids[:, 0], eos_ids)
    short = [i for i, r in enumerate(records) if len(ref_tok(r["sentence2"], r["sentence1"])["input_ids"]) < 400]
    np.testing.assert_array_equal(mcqa_data.encode([items[i] for i in short], tok, "seqcls", 400, append_eos=True).ids[:, 0],
                                  seqcls_reference(ref_tok, [records[i] for i in short], 400, append_eos=True)[0])


@needs_shared
@pytest.mark.parametrize("task,path,max_len", [("medqa", MEDQA, 128), ("medmcqa", MEDMCQA, 24),
                                               ("mmlu_medical", MMLU, 40)])
def test_choice_inputs_equal_biomedlm(tokenizer_dir, tmp_path, task, path, max_len):
    ref_tok = hf_tokenizer(tokenizer_dir, "choice")
    records = mmlu_records(path, N) if task == "mmlu_medical" else medqa_style_records(path, N)
    assert len(records) >= 100
    ref_ids, ref_labels = choice_reference(ref_tok, records, max_len)
    tok = our_tokenizer(tokenizer_dir, "choice")
    assert [tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")] == ref_tok.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]"])
    if task == "mmlu_medical":
        items = [i for f in sorted(path.glob("*_test.csv")) for i in mcqa_data.load_mmlu(str(f))[: N // 6 + 1]][:N]
    else:
        items = mcqa_data.load_task_file(task, str(path))[:N]
    enc = mcqa_data.encode(items, tok, "choice", max_len)
    np.testing.assert_array_equal(enc.ids, ref_ids)
    np.testing.assert_array_equal(enc.labels, ref_labels)
    full = [len(ref_tok(r["sent1"] + "[SEP]", f" {r[f'ending{j}']}[SEP]")["input_ids"]) for r in records for j in range(4)]
    assert 0 < enc.truncated <= N and enc.truncated == sum(max(full[4 * i: 4 * i + 4]) > max_len for i in range(N))
    hf_items = mcqa_data.load_task_file(task, write_jsonl(tmp_path / "test.json", records))
    np.testing.assert_array_equal(mcqa_data.encode(hf_items, tok, "choice", max_len).ids, enc.ids)


def test_left_truncation_keeps_question_and_option():
    tok = our_tokenizer(str(REPO / "data" / "gpt2_tokenizer"), "seqcls")
    items = mcqa_data.load_pubmedqa(str(PUBMEDQA))[:50]
    enc = mcqa_data.encode(items, tok, "seqcls", 64, truncation="left")
    for item, row in zip(items, enc.ids[:, 0]):
        question = tok.encode(item.question).ids
        assert list(row[64 - len(question):]) == question  # the question survives whole, at the end
    assert enc.truncated == 50
    ctok = our_tokenizer(str(REPO / "data" / "gpt2_tokenizer"), "choice")
    item = mcqa_data.MCQItem("1", "A long question " * 20 + "?", ("yes", "no"), 0)
    enc = mcqa_data.encode([item], ctok, "choice", 16, truncation="left")
    sep = ctok.token_to_id("[SEP]")
    assert list(enc.ids[0, 0, -3:]) == [sep] + tok.encode(" yes").ids + [sep] and enc.truncated == 1  # q[SEP] yes[SEP]
    with pytest.raises(ValueError, match="truncation='right'"):
        mcqa_data.encode([item], ctok, "choice", 16, truncation="right")


def test_transformers_tokenizer_state_is_ignored(tmp_path):
    """A tokenizer saved by transformers after a padded call keeps padding/truncation in tokenizer.json."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast.from_pretrained(gpt2_hf_files(tmp_path / "src"))
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok(["Do mitochondria", "play a role?"], padding="max_length", max_length=1024, truncation=True)
    tok.save_pretrained(str(tmp_path / "saved"))
    stored = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert stored["padding"] is not None and stored["truncation"] is not None  # the state is on disk
    ours = T.load_tokenizer(str(tmp_path / "saved"))
    assert ours.encode("Do mitochondria").ids == tok("Do mitochondria")["input_ids"] == [5211, 25387, 7496]
    assert ours.padding is None and ours.truncation is None


def test_textgen_rows_equal_biomedlm(tmp_path):
    """finetune_for_summarization.py + sum_dataset.py (LineByLineSumTextDataset, stream mode): the tokenizer
    gains [PAD] and <|startoftext|>; row = src[:max_source] + [bos] + tgt[:max_target] + [eos]; labels are
    -100 up to and including the bos; the collator pads with [PAD]."""
    from biomedlm_jax.tasks import seq2seq

    examples = seq2seq.read_medquad(str(REPO / "data" / "medquad"))[:N]
    (tmp_path / "train.source").write_text("".join(e.question + "\n" for e in examples), encoding="utf-8")
    (tmp_path / "train.target").write_text("".join(e.answer + "\n" for e in examples), encoding="utf-8")
    max_source, max_target = 12, 40
    from transformers import GPT2TokenizerFast

    ref = GPT2TokenizerFast.from_pretrained(gpt2_hf_files(tmp_path / "gpt2"))
    ref.add_special_tokens({"pad_token": "[PAD]"})
    ref.add_special_tokens({"bos_token": "<|startoftext|>"})
    ref.add_special_tokens({"eos_token": "<|endoftext|>"})
    bos = ref(ref.bos_token, add_special_tokens=False)["input_ids"][0]
    eos = ref(ref.eos_token, add_special_tokens=False)["input_ids"][0]
    sources = (tmp_path / "train.source").read_text(encoding="utf-8").split("\n")[:-1]
    targets = (tmp_path / "train.target").read_text(encoding="utf-8").split("\n")[:-1]
    ref_rows, ref_labels = [], []
    for source_line, tgt_line in zip(sources, targets):
        src = ref(source_line, add_special_tokens=True, truncation=True, max_length=max_source)["input_ids"]
        tgt = ref(tgt_line, add_special_tokens=True, truncation=True, max_length=max_target)["input_ids"]
        sent = src + [bos] + tgt + [eos]
        sep_idx = sent.index(bos) + 1
        ref_rows.append(sent)
        ref_labels.append([-100] * sep_idx + sent[sep_idx:])

    tok = T.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))
    ids = seq2seq.add_layout_tokens(tok)
    assert [ids["[PAD]"], ids["<|startoftext|>"], ids["<|endoftext|>"]] == [ref.pad_token_id, bos, eos]
    data = {"format": "textgen", "path": str(tmp_path), "layout": "", "max_source_length": max_source,
            "max_target_length": max_target}
    import ml_collections

    cfg = ml_collections.ConfigDict(data)
    assert seq2seq.layout(cfg) == "biomedlm"
    items = seq2seq.load_splits(cfg)["train"]
    rows = seq2seq.build_rows(items, tok, 1023, row_layout="biomedlm", max_source=max_source, max_target=max_target)
    assert rows.prompts_truncated > 0 and rows.answers_truncated > 0
    for i, (sent, labels) in enumerate(zip(ref_rows, ref_labels)):
        np.testing.assert_array_equal(rows.rows[i, : len(sent)], sent)
        assert (rows.rows[i, len(sent):] == ref.pad_token_id).all()
        # target j predicts token j + 1: weighted exactly where BioMedLM's shifted labels are not -100
        np.testing.assert_array_equal(rows.weights[i, : len(sent) - 1], np.asarray(labels[1:]) != -100)
        assert rows.weights[i, len(sent) - 1:].sum() == 0
        assert seq2seq.prompt_ids(tok, cfg, items[i]) == sent[: sent.index(bos) + 1]
