"""KV-cache generation: exact cache, HF parity, sampling semantics, one compile per bucket, CLI."""
import json
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, sharded_init

from biomedlm_jax.formats import hf, loading
from biomedlm_jax.inference import generate as G
from biomedlm_jax.inference import sampling
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config, sharding

V = 211  # small vocab; eos = last id, as GPT-2 / BioMedLM


def tiny(scan=False, **kw):
    cfg = gpt_config.get_config("tiny", vocab_size=V, n_positions=64, scan_layers=scan, embd_pdrop=0.0, attn_pdrop=0.0,
                       resid_pdrop=0.0, **kw)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(0))


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_cached_logits_equal_full_forward_every_step_left_padded(scan):
    model, params = tiny(scan)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, n).tolist() for n in (12, 5, 9)]  # full sequences (prompt + continuation)
    prompt_lens = [4, 2, 6]
    ids, mask = sampling.left_pad([s[:p] for s, p in zip(seqs, prompt_lens)], bucket=8, pad_id=0)
    P, steps = ids.shape[1], 6
    logits, cache, kv_mask, head = G.prefill(model, params, jnp.asarray(ids), jnp.asarray(mask), P + steps)
    pos = mask.sum(-1)
    width = max(len(s) for s in seqs)  # one compiled full forward over right-padded rows (causal)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    decode = jax.jit(lambda p, *args: model.apply({"params": p}, *args, method=M.GPT.decode))
    for t in range(steps):
        for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
            n = p + t
            if n > len(s):
                continue
            full = forward(params, jnp.asarray([s[:n] + [0] * (width - n)]))[0, n - 1]
            np.testing.assert_allclose(logits[b], full, atol=1e-5, rtol=1e-5)
        nxt = np.array([s[min(p + t, len(s) - 1)] for s, p in zip(seqs, prompt_lens)], np.int32)
        kv_mask = kv_mask.at[:, P + t].set(True)
        out, cache = decode(params, jnp.asarray(nxt)[:, None], kv_mask, jnp.asarray(pos + t)[:, None], cache,
                            jnp.int32(P + t), head)  # the transposed head, as generate
        logits = out[:, 0]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("hfgen")
    torch_model = make_hf_model(d, n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=V,
                                bos_token_id=V - 1, eos_token_id=V - 1)
    model, params = hf.load_pretrained(str(d))
    return torch_model, model, params


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_matches_transformers_generate(hf_pair, ngram):
    import torch

    torch_model, model, params = hf_pair
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, V - 1, n).tolist() for n in (7, 3, 11)]
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0, no_repeat_ngram_size=ngram, eos_id=V - 1, pad_id=V - 1)
    ours = G.generate(model, params, prompts, jax.random.PRNGKey(0), cfg, bucket=16)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, num_beams=1,
                                       no_repeat_ngram_size=ngram or None, pad_token_id=V - 1, eos_token_id=V - 1)
        assert o == ref[0, len(p):].tolist()


@pytest.mark.slow
def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model, params = tiny()
    prompts = [[5, 6, 7], [9]]
    sample = sampling.SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.9)
    a = G.generate(model, params, prompts, jax.random.PRNGKey(3), sample)
    b = G.generate(model, params, prompts, jax.random.PRNGKey(3), sample)
    c = G.generate(model, params, prompts, jax.random.PRNGKey(4), sample)
    assert a == b and a != c
    greedy = G.generate(model, params, prompts, jax.random.PRNGKey(0), sampling.SamplingConfig(max_new_tokens=8, temperature=0.0))
    top1 = G.generate(model, params, prompts, jax.random.PRNGKey(5), sampling.SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=1))
    assert top1 == greedy
    many = G.generate(model, params, [[5, 6, 7]], jax.random.PRNGKey(3), sample, num_return_sequences=4)
    assert len(many) == 4 and len({tuple(m) for m in many}) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: np.isfinite(np.asarray(sampling.top_p_filter(logits, p))) & (np.asarray(sampling.top_p_filter(logits, p)) > -1e29)  # noqa: E731
    assert kept(0.8).tolist() == [[True, True, False, False]]
    assert kept(0.81).tolist() == [[True, True, True, False]]
    assert kept(0.3).tolist() == [[True, False, False, False]]
    assert np.asarray(sampling.top_k_filter(logits, 2) > -1e29).tolist() == [[True, True, False, False]]


def test_no_repeat_ngram_bans_the_completing_token():
    tokens = jnp.asarray([[1, 2, 3, 1, 2, 0]])
    valid = jnp.asarray([[True] * 5 + [False]])
    out = sampling.ban_repeated_ngrams(jnp.zeros((1, 8)), tokens, valid, 5, 3)
    assert np.asarray(out[0] < -1e29).nonzero()[0].tolist() == [3]
    out = sampling.ban_repeated_ngrams(jnp.zeros((1, 8)), tokens, valid, 5, 2)  # bigrams after "2": (2,3)
    assert np.asarray(out[0] < -1e29).nonzero()[0].tolist() == [3]


def test_one_compile_per_bucket(monkeypatch):
    model, params = tiny()
    decode = jax.jit(chex.assert_max_traces(G._decode_loop, n=1), static_argnames=("model", "cfg", "streaming"))
    monkeypatch.setattr(G, "_decode", decode)
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=0.0)
    for n in (3, 10, 16, 1):  # all inside the 16-token bucket
        G.generate(model, params, [list(range(1, n + 1)), [4, 4]], jax.random.PRNGKey(0), cfg, bucket=16)
    with pytest.raises(AssertionError):  # a longer bucket is a new shape: a second trace
        G.generate(model, params, [list(range(1, 20))], jax.random.PRNGKey(0), cfg, bucket=16)


@pytest.mark.slow
def test_sharded_params_and_bf16():
    model, params = tiny(scan=True)
    prompts = [[3, 4, 5, 6], [7, 8]]
    cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0)
    want = G.generate(model, params, prompts, jax.random.PRNGKey(0), cfg, bucket=8)
    mesh = sharding.make_mesh((2, 2, 2))
    sparams, _ = sharded_init(model, jnp.zeros((1, 8), jnp.int32), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        got = G.generate(model, sparams, prompts, jax.random.PRNGKey(0), cfg, bucket=8)
    assert got == want
    bf16 = M.GPT(model.config.replace(dtype="bfloat16"))
    out = G.generate(bf16, params, prompts, jax.random.PRNGKey(0), cfg, bucket=8)
    assert [len(o) for o in out] == [6, 6]


def test_stops_at_eos_and_pads_finished_rows():
    model, params = tiny()
    cfg0 = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0)
    first = G.generate(model, params, [[5, 6]], jax.random.PRNGKey(0), cfg0)[0]
    eos = first[2]  # make the third greedy token the EOS
    out = G.generate(model, params, [[5, 6], [9, 9, 9]], jax.random.PRNGKey(0),
                     sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, eos_id=eos, pad_id=0))
    assert out[0] == first[: first.index(eos) + 1]


@pytest.mark.slow
def test_cli_batch_jsonl_and_streaming_prompt(hf_pair, tmp_path):
    from conftest import REPO

    from biomedlm_jax.data import tokenizer as T

    _, model, params = hf_pair
    gpt2 = T.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))
    cfg = model.config.replace(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
    m2 = M.GPT(cfg)
    p2 = M.init_params(m2, jax.random.PRNGKey(2))
    hf.save_pretrained(m2, p2, str(tmp_path / "ckpt"), tokenizer=gpt2)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "Metformin is", "id": 1}) + "\n" + json.dumps({"prompt": "The patient"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.generate", f"--init_from=hf:{tmp_path / 'ckpt'}",
                        f"--input={inp}", f"--output={tmp_path / 'out.jsonl'}", "--max_new_tokens=5", "--temperature=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["id"] == 1 and isinstance(rows[0]["completion"], str) and len(rows) == 2
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.generate", f"--init_from=hf:{tmp_path / 'ckpt'}",
                        "--prompt=Metformin is", "--max_new_tokens=5", "--temperature=0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = gpt2.encode("Metformin is").ids
    want = G.generate(m2, p2, [ids], jax.random.PRNGKey(0), sampling.SamplingConfig(max_new_tokens=5, temperature=0.0, eos_id=50256))[0]
    assert r.stdout.strip() == ("Metformin is" + gpt2.decode([t for t in want if t != 50256])).strip()
    assert rows[0]["completion"] == gpt2.decode([t for t in want if t != 50256])
    # --dtype=bfloat16 loads the weights in bf16 too: no fp32 copy is read (or cast) per decoded token
    m16, p16, _ = loading.load_for_inference(f"hf:{tmp_path / 'ckpt'}", "bfloat16")
    assert m16.config.dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype("bfloat16")}


def test_greedy_helper_equals_argmax_with_ties():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0], [-2.0, -3.0, -1.0, -9.0]])
    assert sampling.greedy(logits).tolist() == np.argmax(np.asarray(logits), -1).tolist() == [1, 0, 2]
