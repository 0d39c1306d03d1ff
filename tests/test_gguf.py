"""GGUF export (convert --to=gguf:FILE) run in llama.cpp through llama-cpp-python: same logits, same
greedy tokens, the run's own tokenizer, and clear refusals."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import llama_side
from conftest import REPO, textgen_files
from isolation import run_isolated

from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.formats import gguf as gguf_export
from biomedlm_jax.formats import loading
from biomedlm_jax.inference import generate
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config
from biomedlm_jax.tasks import mcqa, seq2seq
from biomedlm_jax.training import configlib, trainer
from biomedlm_jax.workflows import convert as workflows_convert

GPT2 = str(REPO / "data" / "gpt2_tokenizer")
TEXT = "Metformin is first-line therapy for type 2 diabetes mellitus (T2DM); 500 mg twice daily."


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(GPT2)


def greedy(model, params, prompt, new, eos=None):
    cfg = generate.SamplingConfig(max_new_tokens=new, temperature=0.0, eos_id=eos)
    return generate.generate(model, params, [prompt], jax.random.PRNGKey(0), cfg)[0]


@pytest.mark.parametrize("variant", [dict(), dict(scale_attn_by_inverse_layer_idx=True, scan_layers=True),
                                     dict(scale_attn_weights=False, n_head=2)])
def test_llama_cpp_logits_match_ours(tmp_path, tok, variant):
    """F32 and F16 files give our logits at every position (BioMedLM's 1/(layer+1) attention scaling
    and unscaled attention folded into q); Q8_0 agrees on the top token at >= 90% of positions."""
    cfg = gpt_config.get_config("tiny", **variant)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(1))
    ids = tok.encode(TEXT).ids
    ids = ids + greedy(model, params, ids, 24)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))[0]
    for ftype, atol in (("F32", 1e-3), ("F16", 5e-3), ("Q8_0", None)):
        path = gguf_export.write_gguf(cfg, params, tok, str(tmp_path / f"m-{ftype}.gguf"), ftype)
        theirs = run_isolated(llama_side.logits, path, ids)  # a llama.cpp crash fails this test only
        assert theirs.shape == ours.shape
        if atol is not None:
            np.testing.assert_allclose(theirs, ours, atol=atol, err_msg=ftype)
        else:
            agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
            assert agree >= 0.9, agree


def test_the_attention_fold_is_what_makes_a_biomedlm_model_match(tmp_path, tok):
    """BioMedLM divides attention scores by layer + 1. With large q/k weights (peaked attention, unlike a
    random init's near-uniform one) the exported file matches our logits, and a file exported as if
    the model had no such scaling does not: the match test above would catch a dropped fold. The file
    also carries output.weight (the tied head) and F32 position embeddings, as llama.cpp writes GPT-2."""
    import gguf

    cfg = gpt_config.get_config("tiny", scale_attn_by_inverse_layer_idx=True, n_layer=3)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(4))
    for i in range(cfg.n_layer):  # q and k weights x8: scores x64, attention far from uniform
        attn = params[f"h_{i}"]["attn"]["c_attn"]
        attn["kernel"] = attn["kernel"].at[:, :2].multiply(8.0)
    ids = tok.encode(TEXT).ids
    ours = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))[0]
    path = gguf_export.write_gguf(cfg, params, tok, str(tmp_path / "fold.gguf"), "F16")
    good = run_isolated(llama_side.logits, path, ids)
    np.testing.assert_allclose(good, ours, atol=5e-3)
    unfolded = gguf_export.write_gguf(cfg.replace(scale_attn_by_inverse_layer_idx=False), params, tok,
                                      str(tmp_path / "nofold.gguf"), "F16")
    bad = run_isolated(llama_side.logits, unfolded, ids)
    assert np.abs(bad - ours).max() > 10 * 5e-3, np.abs(bad - ours).max()  # fails the check above 10x over
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert tensors["position_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output.weight"].tensor_type == tensors["token_embd.weight"].tensor_type
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), np.asarray(tensors["token_embd.weight"].data))


def test_tokenizer_travels_with_the_file(tmp_path, tok):
    """llama.cpp tokenizes with the file's own vocabulary and merges like `tokenizers` does (no
    fingerprinting), keeps added tokens whole, and pads the vocabulary to the embedding's rows."""
    import gguf

    tok = T.load_tokenizer(GPT2)
    seq2seq.add_layout_tokens(tok)  # [PAD] 50257, <|startoftext|> 50258, as BioMedLM's fine-tuning adds
    cfg = gpt_config.get_config("tiny", vocab_size=50304)  # padded past the tokenizer's 50259
    model = M.GPT(cfg)
    path = gguf_export.write_gguf(cfg, M.init_params(model, jax.random.PRNGKey(0)), tok, str(tmp_path / "m.gguf"))
    texts = [TEXT, "  Two  spaces\tand\nnewlines\n\n", "Ünïcödé: β-lactamase, 37 °C, IL-6→STAT3 🧬",
             "Question: what is BRCA1?<|startoftext|>It is a gene.<|endoftext|>"]
    theirs = run_isolated(llama_side.tokenizer_view, path, texts, [tok.encode(t).ids for t in texts])
    for text, ids, back in zip(texts, theirs["ids"], theirs["texts"]):
        assert ids == tok.encode(text).ids, text
        assert back == text
    assert theirs["n_vocab"] == 50304 and theirs["eos"] == 50256
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.padding_token_id"]
    assert int(field.parts[field.data[0]][0]) == 50257
    types = reader.fields["tokenizer.ggml.token_type"]
    kinds = [int(types.parts[i][0]) for i in types.data]
    assert kinds[50256] == kinds[50257] == kinds[50258] == gguf.TokenType.CONTROL
    assert kinds[50259:] == [gguf.TokenType.UNUSED] * (50304 - 50259) and kinds[0] == gguf.TokenType.NORMAL


def test_placeholder_vocabulary_file_loads_and_decodes_like_ours(tmp_path):
    """`bench_inference decode --gguf` exports random-init models with no tokenizer: llama.cpp must load
    that file (it refuses a BPE vocabulary without merges) and decode our greedy tokens."""
    cfg = gpt_config.get_config("tiny", vocab_size=1000)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(2))
    path = gguf_export.write_gguf(cfg, params, None, str(tmp_path / "p.gguf"), "F32")
    prompt = [5, 99, 700, 12]
    assert run_isolated(llama_side.greedy, path, [prompt], 16, n_ctx=64) == [greedy(model, params, prompt, 16)]
    assert run_isolated(llama_side.tokenizer_view, path, [], [])["n_vocab"] == 1000
    with pytest.raises(gguf_export.GGUFExportError, match="needs >= 257 rows"):
        gguf_export.tokenizer_metadata(None, 200)


def test_refusals_name_the_problem(tmp_path, tok):
    from conftest import make_hf_model

    cfg = gpt_config.get_config("tiny", activation="relu")
    model = M.GPT(cfg)
    with pytest.raises(gguf_export.GGUFExportError, match="activation='relu'.*tanh-GELU"):
        gguf_export.write_gguf(cfg, M.init_params(model, jax.random.PRNGKey(0)), tok, str(tmp_path / "x.gguf"))
    assert not list(tmp_path.iterdir())  # nothing half-written
    from tokenizers import normalizers, pre_tokenizers

    cfg = gpt_config.get_config("tiny")
    params = M.init_params(M.GPT(cfg), jax.random.PRNGKey(0))
    spaced = T.load_tokenizer(GPT2)
    spaced.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    normalized = T.load_tokenizer(GPT2)
    normalized.normalizer = normalizers.NFKC()
    for bad, message in ((spaced, "add_prefix_space=True.*adds no leading space"), (normalized, "a normalizer.*NFKC")):
        with pytest.raises(gguf_export.GGUFExportError, match=message):
            gguf_export.write_gguf(cfg, params, bad, str(tmp_path / "x.gguf"))
    assert not list(tmp_path.iterdir())
    make_hf_model(tmp_path / "hf", n_layer=2, n_embd=64, n_head=4, n_positions=64)
    T.save_tokenizer(tok, str(tmp_path / "hf"))
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.convert", f"--from=hf:{tmp_path / 'hf'}", f"--to=gguf:{out}",
                        "--gguf_type=Q8_0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stderr[-2000:]
    for args, message in (([], "already exists; pass --overwrite"), (["--gguf_type=Q4_K"], "choose from F32, F16, Q8_0")):
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.convert", f"--from=hf:{tmp_path / 'hf'}",
                            f"--to=gguf:{out}"] + args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and message in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_finetuned_biomedlm_style_model_generates_the_same_tokens_in_llama_cpp(tmp_path):
    """The acceptance case: a model fine-tuned here in BioMedLM's layout (its added [PAD] and
    <|startoftext|>, a vocabulary grown to 50259, 1/(layer+1) attention scaling) exported with
    `convert --to=gguf:` generates our greedy tokens in llama.cpp at F16; Q8_0 keeps the top token
    at >= 95% of positions. An MCQA classifier is refused."""
    ex = seq2seq.read_medquad(str(REPO / "data" / "medquad"))
    data = textgen_files(tmp_path / "data", ex[:64], ex[64:72])
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "biomedlm_jax.finetune_seq2seq", f"--config={REPO}/configs/seq2seq.py:tiny",
         f"--workdir={run}", f"--config.data.tokenizer={GPT2}", "--config.data.format=textgen",
         f"--config.data.path={data}", "--config.num_train_steps=40", "--config.eval_every_steps=40",
         "--config.checkpoint_every_steps=40", "--config.data.generate_examples=0",
         "--config.data.max_source_length=48", "--config.model.scale_attn_by_inverse_layer_idx=true",
         "--config.progress_bar=false"], capture_output=True, text=True, timeout=900,
        env=dict(os.environ, XLA_FLAGS=""))  # one device, as a user's fine-tune on a laptop
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = {}
    for ftype in ("F16", "Q8_0"):  # what `convert --to=gguf:` runs (its command line: test_refusals_name_the_problem)
        files[ftype] = tmp_path / f"run-{ftype}.gguf"
        workflows_convert.convert(f"orbax:{run}", f"gguf:{files[ftype]}", gguf_type=ftype)
    model, params, tok = loading.load(f"orbax:{run}")
    assert model.config.vocab_size == 50259 and model.config.scale_attn_by_inverse_layer_idx
    eos = tok.token_to_id(T.EOS_TOKEN)
    prompts, ours = [], []
    for e in ex[64:72]:
        prompts.append(tok.encode(e.question).ids[:48] + [tok.token_to_id("<|startoftext|>")])
        ours.append(greedy(model, params, prompts[-1], 32, eos))
    view = run_isolated(llama_side.tokenizer_view, str(files["F16"]), [e.question[:200] + "<|startoftext|>" for e in ex[64:72]], [])
    assert [ids[-1] for ids in view["ids"]] == [p[-1] for p in prompts]  # the added token parsed whole
    theirs = run_isolated(llama_side.greedy, str(files["F16"]), prompts, 32, eos)
    for e, o, t in zip(ex[64:72], ours, theirs):
        assert t == o, (e.question, tok.decode(o), tok.decode(t))
    sequences = [p + o for p, o in zip(prompts, ours)]
    q8 = run_isolated(llama_side.many_logits, str(files["Q8_0"]), sequences)  # Q8_0: what crashed on AMX hosts
    agree = []
    for ids, theirs_logits in zip(sequences, q8):
        ref = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))[0]
        agree.append(theirs_logits.argmax(-1) == ref.argmax(-1))
    share = np.concatenate(agree).mean()
    print(json.dumps({"q8_0_top1_agreement": float(share), "positions": int(np.concatenate(agree).size)}))
    assert share >= 0.95, share

    clf = tmp_path / "clf"
    c = configlib.load_config_file(str(REPO / "configs" / "mcqa.py"), "pubmedqa-tiny")
    c.data.tokenizer, c.num_train_steps, c.eval_every_steps, c.progress_bar, c.seq_len = GPT2, 2, 2, False, 32
    c.mesh_shape = (1, 1, 1)
    trainer.train_and_evaluate(c, str(clf), devices=jax.devices()[:1], task=mcqa.MCQATask(c))
    with pytest.raises(ValueError, match=r"MCQA classifier \(seqcls head\).*--to=hf:DIR"):
        workflows_convert.convert(f"orbax:{clf}", f"gguf:{tmp_path / 'c.gguf'}")
    assert not (tmp_path / "c.gguf").exists()


SAPPHIRE_RAPIDS_FLAGS = ("flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep avx512f avx512dq avx512_bf16 avx512_vnni "
                         "amx_bf16 avx512_fp16 amx_tile amx_int8 arch_lbr\n")
EPYC_FLAGS = "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep avx2 avx512f avx512dq avx512_bf16 avx512_vnni\n"


def test_llama_cpp_extra_buffers_are_off_where_amx_is_reported(tmp_path):
    """Issue 44: Q8_0 files segfault in llama.cpp's AMX matmul (llama.cpp issue 20824) unless its extra
    buffer types are off. The loader turns them off when the CPU's flags (or the llama.cpp build)
    report AMX, keeps llama.cpp's default elsewhere, and takes an explicit setting either way; the
    setting reaches llama.cpp (its load log considers a preferred extra buffer type only when on)."""
    for name, text, amx in (("spr", "processor\t: 0\n" + SAPPHIRE_RAPIDS_FLAGS, True), ("epyc", EPYC_FLAGS, False)):
        (tmp_path / name).write_text(text)
        assert gguf_export.cpu_has_amx(str(tmp_path / name)) is amx
    assert gguf_export.cpu_has_amx(str(tmp_path / "absent")) is False
    with pytest.raises(ValueError, match="extra_bufts='yes': choose from auto, on, off"):
        gguf_export.extra_bufts_setting("yes")
    cfg = gpt_config.get_config("tiny", vocab_size=1000)
    path = gguf_export.write_gguf(cfg, M.init_params(M.GPT(cfg), jax.random.PRNGKey(0)), None, str(tmp_path / "q.gguf"), "Q8_0")
    assert run_isolated(llama_side.loaded_extra_bufts, path, None, True) is False  # an AMX host
    assert run_isolated(llama_side.loaded_extra_bufts, path, True, True) is True  # turned back on there
    assert run_isolated(llama_side.loaded_extra_bufts, path, "off", False) is False
    here = run_isolated(llama_side.loaded_extra_bufts, path)  # this host, as it is
    assert here is not (gguf_export.cpu_has_amx() or run_isolated(llama_side.build_reports_amx))
    assert "preferred buffer type" in run_isolated(llama_side.load_log, path, True)
    assert "preferred buffer type" not in run_isolated(llama_side.load_log, path, False)
