"""HF interchange: logits parity with transformers' torch GPT2LMHeadModel, both directions, and bad input."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, torch_logits

from biomedlm_jax.core import errors
from biomedlm_jax.formats import hf, hf_config
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config

# Small configs that together exercise every math-changing GPT2Config field.
PARITY_CONFIGS = {
    "gpt2-like": dict(vocab_size=211, n_positions=32, n_embd=48, n_layer=2, n_head=4),
    "biomedlm-like": dict(
        vocab_size=28896, n_positions=24, n_embd=40, n_layer=3, n_head=5, scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True, bos_token_id=28895, eos_token_id=28895, pad_token_id=28895,
    ),
    "n_inner-gelu": dict(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, n_inner=72,
                         activation_function="gelu", layer_norm_epsilon=1e-3),
    "unscaled-relu": dict(vocab_size=97, n_positions=16, n_embd=32, n_layer=3, n_head=8, scale_attn_weights=False,
                          activation_function="relu", scale_attn_by_inverse_layer_idx=True),
    "silu-eps": dict(vocab_size=101, n_positions=20, n_embd=24, n_layer=1, n_head=3, activation_function="silu",
                     layer_norm_epsilon=1e-6),
}


def random_ids(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg["vocab_size"], (batch, cfg["n_positions"]))


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_logits_match_transformers_both_directions(name, tmp_path):
    cfg = PARITY_CONFIGS[name]
    torch_model = make_hf_model(tmp_path / "hf", **cfg)
    ids = random_ids(cfg)
    ref = torch_logits(torch_model, ids)

    for scan in (False, True):
        model, params = hf.load_pretrained(str(tmp_path / "hf"), scan_layers=scan)
        out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
        assert out.dtype == np.float32 and out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)

    # Ours -> HF: transformers loads what we write and computes the same logits.
    from transformers import GPT2LMHeadModel

    hf.save_pretrained(model, params, str(tmp_path / "ours"))
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(torch_logits(reloaded, ids), ref, atol=1e-4, rtol=0)
    for key, value in cfg.items():
        assert getattr(reloaded.config, key) == value


def test_sharded_save_and_load(tmp_path):
    from transformers import GPT2LMHeadModel

    cfg = PARITY_CONFIGS["gpt2-like"]
    torch_model = make_hf_model(tmp_path / "hf", **cfg)
    ids = random_ids(cfg)
    model, params = hf.load_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(model, params, str(tmp_path / "sharded"), max_shard_size="30KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert hf.INDEX_NAME in files and hf.WEIGHTS_NAME not in files
    assert sum(f.startswith("model-") for f in files) > 2
    # transformers reads our index, we read it back (and an HF-written sharded checkpoint below).
    np.testing.assert_allclose(
        torch_logits(GPT2LMHeadModel.from_pretrained(str(tmp_path / "sharded")), ids), torch_logits(torch_model, ids),
        atol=1e-5,
    )
    model2, params2 = hf.load_pretrained(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(model2.apply({"params": params2}, ids), model.apply({"params": params}, ids))

    torch_model.save_pretrained(str(tmp_path / "hf_sharded"), max_shard_size="30KB", safe_serialization=True)
    assert os.path.exists(tmp_path / "hf_sharded" / hf.INDEX_NAME)
    model3, params3 = hf.load_pretrained(str(tmp_path / "hf_sharded"))
    np.testing.assert_allclose(model3.apply({"params": params3}, ids), torch_logits(torch_model, ids), atol=1e-4)

    # Saving again unsharded into the same dir removes the stale shards (they would shadow nothing
    # in HF, but an index left behind would describe files that no longer match).
    hf.save_pretrained(model, params, str(tmp_path / "sharded"))
    assert sorted(os.listdir(tmp_path / "sharded")) == ["config.json", "model.safetensors"]


def test_bf16_compute_and_bf16_checkpoints(tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    cfg = PARITY_CONFIGS["biomedlm-like"]
    torch_model = make_hf_model(tmp_path / "hf", **cfg)
    ids = random_ids(cfg)
    ref = torch_logits(torch_model, ids)
    model, params = hf.load_pretrained(str(tmp_path / "hf"), dtype="bfloat16")
    out = np.asarray(model.apply({"params": params}, ids))
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999

    # A bf16 HF checkpoint (as BioMedLM is often re-saved) loads; our bf16 export loads in transformers.
    torch_model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf_bf16"), safe_serialization=True)
    model16, params16 = hf.load_pretrained(str(tmp_path / "hf_bf16"))
    assert np.abs(np.asarray(model16.apply({"params": params16}, ids)) - ref).max() < 0.05 * np.abs(ref).max()
    hf.save_pretrained(model, params, str(tmp_path / "ours_bf16"), dtype="bfloat16")
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "ours_bf16"), dtype=torch.float32)
    assert np.abs(torch_logits(back, ids) - ref).max() < 0.05 * np.abs(ref).max()


def test_biomedlm_config_maps_to_the_biomedlm_variant():
    """BioMedLM's published config.json (stanford-crfm/BioMedLM) -> the biomedlm-2.7b variant."""
    biomedlm_config = {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.0,
        "bos_token_id": 28895, "embd_pdrop": 0.0, "eos_token_id": 28895, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 2560, "n_head": 20,
        "n_inner": None, "n_layer": 32, "n_positions": 1024, "reorder_and_upcast_attn": True, "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": True, "summary_activation": None,
        "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
        "summary_use_proj": True, "torch_dtype": "float32", "use_cache": False, "vocab_size": 28896,
        "pad_token_id": 28895,
    }
    assert hf_config.config_from_hf(biomedlm_config) == gpt_config.get_config("biomedlm-2.7b")
    assert hf_config.config_from_hf(hf_config.config_to_hf(gpt_config.get_config("biomedlm-2.7b"))) == gpt_config.get_config("biomedlm-2.7b")


def test_checkpoint_without_transformer_prefix_and_with_tied_head(tmp_path):
    """GPT2Model-style names (no 'transformer.') and an explicit lm_head equal to wte both load."""
    from safetensors.numpy import load_file, save_file

    cfg = PARITY_CONFIGS["gpt2-like"]
    torch_model = make_hf_model(tmp_path / "hf", **cfg)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["lm_head.weight"] = renamed["wte.weight"].copy()
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))  # old causal-mask buffer
    save_file(renamed, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    model, params = hf.load_pretrained(str(tmp_path / "hf"))
    ids = random_ids(cfg)
    np.testing.assert_allclose(model.apply({"params": params}, ids), torch_logits(torch_model, ids), atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file / tensor, nothing returned half-loaded
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def good_ckpt(tmp_path):
    make_hf_model(tmp_path / "ckpt", perturb=False, **PARITY_CONFIGS["gpt2-like"])
    return tmp_path / "ckpt"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_directory_and_config(tmp_path, good_ckpt):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_pretrained(str(tmp_path / "nope"))
    os.remove(good_ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(str(good_ckpt))


def test_invalid_json_config(good_ckpt):
    (good_ckpt / "config.json").write_text('{"model_type": "gpt2",\n "n_embd": }')
    with pytest.raises(errors.CheckpointError, match=r"config.json: invalid JSON at line 2"):
        hf.load_pretrained(str(good_ckpt))


def test_not_a_gpt2_config(good_ckpt):
    edit_config(good_ckpt, model_type="llama")
    with pytest.raises(errors.CheckpointError, match="model_type='llama' is not a GPT-2 config"):
        hf.load_pretrained(str(good_ckpt))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(activation_function="quick_gelu"), "activation_function='quick_gelu' is not supported"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
        (dict(n_head=5), "not divisible"),
    ],
)
def test_math_changing_fields_are_refused_not_ignored(good_ckpt, changes, message):
    edit_config(good_ckpt, **changes)
    with pytest.raises(errors.CheckpointError, match=message):
        hf.load_pretrained(str(good_ckpt))


def test_wrong_shape_names_file_and_tensor(good_ckpt):
    edit_config(good_ckpt, n_inner=100)  # weights have 4*48 = 192
    with pytest.raises(errors.CheckpointError, match=r"model.safetensors: tensor transformer.h.0.mlp.c_fc.(weight|bias) has shape \((48, )?192,?\), config.json implies"):
        hf.load_pretrained(str(good_ckpt))


def test_missing_and_unexpected_tensors(good_ckpt):
    edit_tensors(good_ckpt, lambda t: t.pop("transformer.h.1.ln_2.bias"))
    with pytest.raises(errors.CheckpointError, match=r"1 tensor\(s\) missing.*h.1.ln_2.bias"):
        hf.load_pretrained(str(good_ckpt))
    edit_tensors(good_ckpt, lambda t: t.update({"transformer.h.1.ln_2.bias": np.zeros(48, np.float32),
                                                "transformer.h.2.ln_1.weight": np.ones(48, np.float32)}))
    with pytest.raises(errors.CheckpointError, match=r"unexpected tensor transformer.h.2.ln_1.weight.*n_layer=2"):
        hf.load_pretrained(str(good_ckpt))


def test_untied_lm_head_is_refused(good_ckpt):
    edit_tensors(good_ckpt, lambda t: t.update({"lm_head.weight": np.zeros((211, 48), np.float32)}))
    with pytest.raises(errors.CheckpointError, match="lm_head.weight differs from wte.weight"):
        hf.load_pretrained(str(good_ckpt))


def test_pickle_checkpoints_are_never_loaded(good_ckpt):
    os.remove(good_ckpt / "model.safetensors")
    (good_ckpt / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(errors.CheckpointError, match="pytorch_model.bin.*Convert.*safe_serialization"):
        hf.load_pretrained(str(good_ckpt))


def test_corrupt_safetensors_and_broken_index(good_ckpt, tmp_path):
    data = (good_ckpt / "model.safetensors").read_bytes()
    (good_ckpt / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(errors.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        hf.load_pretrained(str(good_ckpt))

    sharded = tmp_path / "sharded"
    shutil.copytree(good_ckpt, sharded)
    os.remove(sharded / "model.safetensors")
    (sharded / hf.INDEX_NAME).write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(errors.CheckpointError, match=r"index.json: shard file\(s\) \['model-00001-of-00002.safetensors'\]"):
        hf.load_pretrained(str(sharded))


# ----------------------------------------------------------------------------------------------------
# Tokenizer files next to the weights
# ----------------------------------------------------------------------------------------------------


def test_tokenizers_load_from_every_layout(tmp_path):
    from conftest import REPO
    from transformers import AutoTokenizer, GPT2TokenizerFast

    from biomedlm_jax.data import tokenizer as tok_lib

    gpt2_dir = REPO / "data" / "gpt2_tokenizer"  # OpenAI encoder.json + vocab.bpe
    hf_layout = tmp_path / "hf_layout"
    hf_layout.mkdir()
    shutil.copy(gpt2_dir / "encoder.json", hf_layout / "vocab.json")
    shutil.copy(gpt2_dir / "vocab.bpe", hf_layout / "merges.txt")
    reference = GPT2TokenizerFast.from_pretrained(str(hf_layout))  # transformers' GPT-2 tokenizer

    texts = [json.loads(line)["abstract"] for line in open(REPO / "data/pubmed_abstracts/abstracts.jsonl")][:50]
    texts += ["Acetyltransferase<|endoftext|>thrombocytopenia  \n\t x", " leading space", "ünïcödé ½ 😀 μg/kg"]
    ours = tok_lib.load_tokenizer(str(gpt2_dir))
    for text in texts:
        assert ours.encode(text).ids == reference(text)["input_ids"]
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.token_to_id("<|endoftext|>") == 50256

    tok_lib.save_tokenizer(ours, str(tmp_path / "saved"))
    for path in (tmp_path / "saved", tmp_path / "saved" / "tokenizer.json", hf_layout):
        assert tok_lib.load_tokenizer(str(path)).encode(texts[0]).ids == reference(texts[0])["input_ids"]
    resaved = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert resaved(texts[1])["input_ids"] == reference(texts[1])["input_ids"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tok_lib.load_tokenizer(str(empty))
    (empty / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizers JSON"):
        tok_lib.load_tokenizer(str(empty))


def test_save_pretrained_with_tokenizer_round_trips(tmp_path):
    from conftest import REPO
    from transformers import AutoTokenizer

    from biomedlm_jax.data import tokenizer as tok_lib

    tok = tok_lib.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))
    model = M.GPT(gpt_config.get_config("tiny", n_positions=16))
    params = M.init_params(model, __import__("jax").random.PRNGKey(0))
    hf.save_pretrained(model, params, str(tmp_path / "out"), tokenizer=tok)
    assert hf.load_tokenizer(str(tmp_path / "out")).encode("EGFR T790M").ids == tok.encode("EGFR T790M").ids
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))("EGFR T790M")["input_ids"] == tok.encode("EGFR T790M").ids
