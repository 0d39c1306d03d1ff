"""int8 weight-only quantization (Qwix PTQ): what is stored, how close the model stays, and that every
path that generates or scores takes --quantize=int8."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.formats import hf
from biomedlm_jax.inference import engine, generate
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config, quantize
from biomedlm_jax.tasks import mcqa, mcqa_data

GPT2 = str(REPO / "data" / "gpt2_tokenizer")


def tiny(**kw):
    cfg = gpt_config.get_config("tiny", **kw)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(0))


def test_kernels_are_int8_per_output_channel_with_their_logical_axes():
    from qwix._src.providers.ptq import WithAux

    model, params = tiny()
    qmodel, qparams = quantize.quantize(model, params, "int8")
    assert isinstance(qmodel, M.GPT) and qmodel.config == model.config
    k = qparams["h_0"]["attn"]["c_attn"]["kernel"]
    assert isinstance(k, WithAux) and k.array.qvalue.dtype == jnp.int8 and k.array.qvalue.shape == (64, 3, 4, 16)
    assert k.array.scale.shape == (1, 3, 4, 16)  # one scale per output channel, none across the input axis
    w = np.asarray(params["h_0"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_allclose(np.asarray(k.array.qvalue) * np.asarray(k.array.scale), w,
                               atol=float(np.abs(w).max()) / 127)
    assert qparams["h_0"]["ln_1"]["scale"].dtype == jnp.float32  # LayerNorm, biases and embeddings stay float
    assert qparams["wte"]["embedding"].dtype == jnp.float32
    head = M.transposed_head(qparams, model.config)  # the decode loop's head is int8 too
    assert head.qvalue.dtype == jnp.int8 and head.qvalue.shape == (64, 50257) and head.scale.shape == (1, 50257)
    # the int8 kernels keep the parameter's logical axis names, so the trainer's rules shard them
    boxed = jax.eval_shape(lambda: qmodel.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    spec = nn.get_partition_spec(boxed)["h_0"]["attn"]["c_attn"]["kernel"]
    float_boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    want = nn.get_partition_spec(float_boxed)["h_0"]["attn"]["c_attn"]["kernel"]
    assert tuple(spec.array.qvalue) == tuple(want) and "heads" in tuple(want)
    fp_bytes = quantize.weight_bytes({k: v for k, v in params.items() if k not in ("wte", "wpe")})
    q_bytes = quantize.weight_bytes({k: v for k, v in qparams.items() if k not in ("wte", "wpe", quantize.HEAD_KEY)})
    assert q_bytes < 0.3 * fp_bytes


@pytest.mark.parametrize("scan", [False, True])
def test_int8_logits_stay_close_and_generation_runs_on_int8(scan):
    model, params = tiny(scan_layers=scan)
    qmodel, qparams = quantize.quantize(model, params, "int8")
    assert not qmodel.config.scan_layers and quantize.HEAD_KEY in qparams  # per-layer scales: unstacked
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 50257)
    a = np.asarray(model.apply({"params": params}, ids))
    b = np.asarray(qmodel.apply({"params": qparams}, ids))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    cfg = generate.SamplingConfig(max_new_tokens=6, temperature=0.0)
    prompts = [[5, 6, 7], [9] * 11]
    static = generate.generate(qmodel, qparams, prompts, jax.random.PRNGKey(0), cfg)
    assert static == engine.generate_all(qmodel, qparams, prompts, cfg, slots=2)
    with pytest.raises(ValueError, match="--quantize='int4': choose from int8"):
        quantize.quantize(model, params, "int4")
    assert quantize.quantize(model, params, "none") == (model, params)


@pytest.mark.parametrize("scan", [False, True])
def test_classifier_backbone_int8_head_float(scan):
    from qwix._src.providers.ptq import WithAux

    cfg = gpt_config.get_config("tiny", vocab_size=50258, scan_layers=scan)
    m = mcqa.MCQAModel(cfg, head="choice")
    ids = jax.random.randint(jax.random.PRNGKey(0), (3, 4, 16), 0, 50257)
    mask = jnp.ones(ids.shape, bool)
    params = nn.unbox(m.init(jax.random.PRNGKey(0), ids, mask)["params"])
    clf = mcqa.Classifier(m, params, None, {"head": "choice"})
    q = quantize.quantize_classifier(clf, "int8")
    assert isinstance(q.params["transformer"]["h_1"]["mlp"]["c_fc"]["kernel"], WithAux)
    assert not isinstance(q.params["score"]["kernel"], WithAux)
    a = np.asarray(m.apply({"params": params}, ids, mask))
    b = np.asarray(q.model.apply({"params": q.params}, ids, mask))
    assert a.shape == b.shape == (3, 4) and np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-3
    enc = mcqa_data.Encoded(np.asarray(ids), np.asarray(mask), np.zeros(3, np.int32))
    np.testing.assert_allclose(mcqa.predict(q.model, q.params, enc, 4), b, atol=1e-5)  # evaluate_mcqa's path


@pytest.mark.slow
def test_cli_flags_take_int8(tmp_path):
    """evaluate_lm, evaluate_mcqa --zero_shot and generate take --quantize=int8; the LM costs little."""
    tok = T.load_tokenizer(GPT2)
    model, params = tiny()
    hf.save_pretrained(model, params, str(tmp_path / "ckpt"), tokenizer=tok)
    src = f"--init_from=hf:{tmp_path / 'ckpt'}"
    docs = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"
    res = {}
    for q in ("none", "int8"):
        out = tmp_path / f"lm-{q}.json"
        r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_lm", src, f"--input={docs}", "--max_docs=4",
                            f"--quantize={q}", f"--out={out}"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        res[q] = json.loads(out.read_text())
    assert res["int8"]["quantize"] == "int8" and res["int8"]["tokens"] == res["none"]["tokens"]
    assert abs(res["int8"]["bits_per_byte"] - res["none"]["bits_per_byte"]) < 0.01 * res["none"]["bits_per_byte"]
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.evaluate_mcqa", src, "--zero_shot", "--quantize=int8",
                        f"--tasks=pubmedqa={REPO / 'data' / 'pubmedqa' / 'ori_pqal.json'}", "--max_items=4",
                        f"--out={tmp_path / 'mc.json'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "mc.json").read_text())["pubmedqa"]["items"] == 4
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.generate", src, "--prompt=Metformin is", "--max_new_tokens=4",
                        "--temperature=0", "--quantize=int8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("Metformin is"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.generate", src, "--prompt=x", "--quantize=int4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--quantize='int4': choose from int8" in r.stderr


def test_lm_eval_cli_passes_quantize_to_the_backend(capsys):
    """`python -m biomedlm_jax.lm_eval --quantize=int8` reaches the backend's `quantize` model arg; a
    mode Qwix is not set up for stops at the command line."""
    from biomedlm_jax import lm_eval

    argv = lm_eval.build_argv(["--init_from=hf:/m", "--quantize=int8", "--tasks=pubmedqa_local"])
    model_args = argv[argv.index("--model_args") + 1].split(",")
    assert "quantize=int8" in model_args and argv[-1] == "--tasks=pubmedqa_local"
    assert not any(a.startswith("quantize") for a in lm_eval.build_argv(["--init_from=hf:/m"])[4].split(","))
    with pytest.raises(SystemExit):
        lm_eval.build_argv(["--init_from=hf:/m", "--quantize=int4"])
    assert "--quantize='int4': choose from int8" in capsys.readouterr().err
