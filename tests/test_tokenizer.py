"""Domain tokenizer training (BioMedLM's recipe) and the tokenizer comparison (paper's RQ2)."""
import json
import subprocess
import sys

import pytest
from conftest import REPO

from biomedlm_jax.data import readers
from biomedlm_jax.data import tokenizer as T

ABSTRACTS = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"
GPT2 = REPO / "data" / "gpt2_tokenizer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.tokenizer", "train", f"--input={ABSTRACTS}",
                        "--vocab_size=4000", f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "trained on 1,692 documents" in r.stdout
    return out


def texts(n=200):
    return [t for _, t in readers.read_documents([str(ABSTRACTS)])][:n]


def test_trained_tokenizer_recipe_and_round_trip(trained):
    tok = T.load_tokenizer(str(trained))
    assert tok.get_vocab_size() == 4000
    assert tok.token_to_id(T.EOS_TOKEN) == 3999  # last id, as GPT-2 (50256) and BioMedLM (28895)
    samples = texts() + ["IL-6 and TNF-α raised β-amyloid by 2·5‰ in 45 µg/kg — naïve mice (p < 0.05) 🧬"]
    for s in samples:
        assert tok.decode(tok.encode(s).ids) == s
    # no prefix space: a leading word encodes differently from the same word mid-sentence
    assert tok.encode("cancer").ids != tok.encode(" cancer").ids
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (trained / name).exists()


def test_transformers_gpt2_tokenizer_fast_agrees(trained):
    from transformers import GPT2TokenizerFast

    ours = T.load_tokenizer(str(trained))
    hf_tok = GPT2TokenizerFast.from_pretrained(str(trained))
    # (transformers 5.24's GPT2TokenizerFast(vocab_file=, merges_file=) constructor encodes to []; see
    # JAX_NOTES. from_pretrained(dir) is the supported path, and a dir with only the two files works too.)
    import shutil
    pair_dir = trained.parent / "pair_only"
    pair_dir.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(trained / name, pair_dir / name)
    hf_pair = GPT2TokenizerFast.from_pretrained(str(pair_dir))
    assert hf_tok.eos_token_id == ours.token_to_id(T.EOS_TOKEN)
    for s in texts(100):
        want = ours.encode(s).ids
        assert hf_tok.encode(s) == want
        assert hf_pair.encode(s) == want


def test_gpt2_files_agree_with_transformers(tmp_path):
    import shutil

    from transformers import GPT2TokenizerFast

    shutil.copy(GPT2 / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2 / "vocab.bpe", tmp_path / "merges.txt")
    hf_tok = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    ours = T.load_tokenizer(str(GPT2))
    for s in texts(100) + ["Greek: α-synuclein, β2-microglobulin; units: 5 µm"]:
        assert ours.encode(s).ids == hf_tok.encode(s)


def test_compare_cli_prints_table_and_writes_json(trained, tmp_path):
    out = tmp_path / "cmp.json"
    held = tmp_path / "held.jsonl"
    held.write_text("".join(ABSTRACTS.read_text(encoding="utf-8").splitlines(True)[-50:]), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.tokenizer", "compare", f"--tokenizer=pubmed={trained}",
                        f"--tokenizer=gpt2={GPT2}", f"--input={held}", f"--out={out}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tokens_per_word" in r.stdout and "thrombocytopenia" in r.stdout
    res = json.loads(out.read_text())
    a, b = res["tokenizers"]["pubmed"], res["tokenizers"]["gpt2"]
    assert res["documents"] == 50
    for m in (a, b):
        assert m["tokens_per_word"] == pytest.approx(m["tokens"] / res["words"])
        assert m["chars_per_token"] == pytest.approx(res["characters"] / m["tokens"])
        assert 0 <= m["share_words_3plus_pieces"] <= 1
    # GPT-2 splits "thrombin" as th|rom|bin (the paper's example); pieces reassemble the word
    assert [p.strip() for p in b["terms"]["thrombin"]] == ["th", "rom", "bin"]
    assert "".join(a["terms"]["pharmacokinetics"]).strip() == "pharmacokinetics"


def test_sample_is_the_lowest_id_hashes_whatever_the_file_order(tmp_path):
    """`tokenizer train --sample_docs=N`: the same N documents (and so the same tokenizer) however the
    corpus is ordered or split into files; they are the N ids that hash lowest."""
    import hashlib

    docs = list(readers.read_documents([str(ABSTRACTS)]))
    sample = T.sample_documents(iter(docs), 100)
    assert sample == T.sample_documents(reversed(docs), 100) and len({d for d, _ in sample}) == 100
    key = {d: hashlib.blake2b(d.encode(), digest_size=8).digest() for d, _ in docs}
    kept = {d for d, _ in sample}
    assert max(key[d] for d in kept) < min(key[d] for d, _ in docs if d not in kept)
    with pytest.raises(ValueError, match="sample size must be positive"):
        T.sample_documents(iter(docs), 0)
    lines = ABSTRACTS.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "b.jsonl").write_text("".join(lines[:900]), encoding="utf-8")  # the corpus in two files,
    (tmp_path / "a.jsonl").write_text("".join(reversed(lines[900:])), encoding="utf-8")  # in another order
    outs = []
    for i, spec in enumerate((str(ABSTRACTS), f"{tmp_path}/*.jsonl")):
        out = tmp_path / f"tok{i}"
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.tokenizer", "train", f"--input={spec}",
                            "--vocab_size=2000", "--sample_docs=300", f"--out={out}"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "trained on a sample of 300 of 1,692 documents" in r.stdout, r.stderr
        outs.append([(out / f).read_text(encoding="utf-8") for f in ("vocab.json", "merges.txt")])
    assert outs[0] == outs[1]
