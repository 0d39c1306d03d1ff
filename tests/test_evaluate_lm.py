"""evaluate_lm: every document token is predicted once; the totals equal a direct forward pass; the CLI."""
import json
import math
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import REPO

from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.evaluation import perplexity
from biomedlm_jax.formats import hf
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config

GPT2 = str(REPO / "data" / "gpt2_tokenizer")
DOCS = [("a", "Metformin lowers hepatic glucose output in type 2 diabetes."),
        ("b", "BRCA1 mutations raise the lifetime risk of breast and ovarian cancer. " * 3),
        ("c", "")]  # an empty document is skipped


@pytest.fixture(scope="module")
def setup():
    tok = T.load_tokenizer(GPT2)
    model = M.GPT(gpt_config.get_config("tiny", n_positions=32))
    params = M.init_params(model, jax.random.PRNGKey(0))
    return model, params, tok


def test_windows_predict_every_token_once():
    ids = list(range(10, 33))  # 23 tokens
    windows = list(perplexity.document_windows(ids, eos_id=0, seq_len=8))
    assert [len(x) for x, _ in windows] == [8, 8, 7]
    assert windows[0][0][0] == 0  # the first real token is predicted from <|endoftext|>
    assert sum((y for _, y in windows), []) == ids
    assert all(x[1:] == y[:-1] for x, y in windows)  # targets are the inputs shifted by one


def direct_nll(model, params, tok, seq_len):
    """Sum of -log p over every document token, window by window with a plain forward pass."""
    eos = tok.token_to_id(T.EOS_TOKEN)
    # one compiled forward pass over a right-padded window (causal: padding after a token changes
    # nothing before it); window by window op by op took seconds
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    total, tokens, nbytes = 0.0, 0, 0
    for _, text in DOCS:
        ids = tok.encode(text).ids
        if not ids:
            continue
        tokens, nbytes = tokens + len(ids), nbytes + len(text.encode())
        seq = [eos] + ids
        for s in range(0, len(ids), seq_len):
            x, y = seq[s : min(s + seq_len, len(ids))], seq[s + 1 : min(s + seq_len, len(ids)) + 1]
            logits = forward(params, np.asarray([x + [0] * (seq_len - len(x))], np.int32))[:, : len(x)]
            total += float(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray([y])).sum())
    return total, tokens, nbytes


@pytest.mark.slow
@pytest.mark.parametrize("seq_len", [32, 7])  # 7: long documents span several windows
def test_totals_equal_a_direct_forward_pass(setup, seq_len):
    model, params, tok = setup
    got = perplexity.evaluate(model, params, tok, DOCS, seq_len=seq_len, batch_size=3)
    total, tokens, nbytes = direct_nll(model, params, tok, seq_len)
    assert (got["documents"], got["tokens"], got["bytes"]) == (2, tokens, nbytes)
    np.testing.assert_allclose(got["loss"] * tokens, total, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], total / math.log(2) / nbytes, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], math.exp(got["loss"]), rtol=1e-9)
    with pytest.raises(ValueError, match="exceeds the model's n_positions=32"):
        perplexity.evaluate(model, params, tok, DOCS, seq_len=64)


def test_cli_writes_json(setup, tmp_path):
    model, params, tok = setup
    hf.save_pretrained(model, params, str(tmp_path / "ckpt"), tokenizer=tok)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"pmid": i, "text": t}) + "\n" for i, t in DOCS), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_lm", f"--init_from=hf:{tmp_path / 'ckpt'}",
                        f"--input={docs}", f"--out={tmp_path / 'r.json'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    want = perplexity.evaluate(model, params, tok, DOCS)
    assert result["tokens"] == want["tokens"] and result["seq_len"] == 32
    np.testing.assert_allclose(result["bits_per_byte"], want["bits_per_byte"], rtol=1e-5)
    assert "bits/byte" in r.stdout
