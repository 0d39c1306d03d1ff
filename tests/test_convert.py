"""convert CLI and the orbax layout: hf <-> orbax round trips, training-state workdirs, bad input."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, make_hf_model, torch_logits

from biomedlm_jax.core import errors
from biomedlm_jax.data.tokenizer import load_tokenizer
from biomedlm_jax.formats import checkpoint, hf
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config
from biomedlm_jax.workflows import convert

CFG = dict(vocab_size=50257, n_positions=16, n_embd=32, n_layer=2, n_head=4, scale_attn_by_inverse_layer_idx=True)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "biomedlm_jax.convert", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


@pytest.mark.slow
def test_cli_round_trip_hf_orbax_hf(tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch_model = make_hf_model(tmp_path / "hf", **CFG)
    for name in ("encoder.json", "vocab.bpe"):  # tokenizer files travel with the weights
        shutil.copy(REPO / "data" / "gpt2_tokenizer" / name, tmp_path / "hf" / name)
    ids = np.random.default_rng(0).integers(0, 50257, (2, 16))
    ref = torch_logits(torch_model, ids)

    r = run_cli(f"--from=hf:{tmp_path / 'hf'}", f"--to=orbax:{tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    assert checkpoint.latest_step(str(tmp_path / "run")) == 0
    model, params = checkpoint.load_model(str(tmp_path / "run"))
    np.testing.assert_allclose(model.apply({"params": params}, ids), ref, atol=1e-4)

    r = run_cli(f"--from=orbax:{tmp_path / 'run'}", f"--to=hf:{tmp_path / 'export'}")
    assert r.returncode == 0, r.stderr
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "export"))
    np.testing.assert_allclose(torch_logits(back, ids), ref, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    gpt2 = load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))
    assert tok("thrombocytopenia")["input_ids"] == gpt2.encode("thrombocytopenia").ids


@pytest.mark.slow
def test_existing_outputs_are_never_overwritten(tmp_path):
    make_hf_model(tmp_path / "hf", **CFG)
    assert run_cli(f"--from=hf:{tmp_path / 'hf'}", f"--to=orbax:{tmp_path / 'run'}").returncode == 0
    r = run_cli(f"--from=hf:{tmp_path / 'hf'}", f"--to=orbax:{tmp_path / 'run'}")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert checkpoint.latest_step(str(tmp_path / "run")) == 0

    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    r = run_cli(f"--from=orbax:{tmp_path / 'run'}", f"--to=hf:{tmp_path / 'hf'}")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert run_cli(f"--from=orbax:{tmp_path / 'run'}", f"--to=hf:{tmp_path / 'hf'}", "--overwrite").returncode == 0


def test_bad_locations(tmp_path):
    r = run_cli("--from=pt:/x", f"--to=hf:{tmp_path}")
    assert r.returncode != 0 and "expected hf:DIR or orbax:WORKDIR" in r.stderr
    r = run_cli(f"--from=orbax:{tmp_path / 'empty'}", f"--to=hf:{tmp_path / 'out'}")
    assert r.returncode == 1 and "not a biomedlm_jax workdir" in r.stderr
    assert not (tmp_path / "out").exists()


def save_training_state(workdir, cfg, params, step):
    """What a trainer writes: params plus optimizer state and step in one orbax 'state' item."""
    mngr = checkpoint.manager(str(workdir))
    state = {"params": params, "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}, "step": np.int32(step)}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(checkpoint.model_meta(cfg))))
    mngr.wait_until_finished()
    mngr.close()


@pytest.mark.slow
def test_training_workdir_latest_or_chosen_step(tmp_path):
    cfg = gpt_config.get_config("tiny", vocab_size=64, n_positions=16, scan_layers=True)
    model = M.GPT(cfg)
    p3, p7 = (M.init_params(model, jax.random.PRNGKey(s)) for s in (3, 7))
    save_training_state(tmp_path / "run", cfg, p3, 3)
    save_training_state(tmp_path / "run", cfg, p7, 7)
    ids = np.random.default_rng(0).integers(0, 64, (2, 16))

    latest, params = checkpoint.load_model(str(tmp_path / "run"))
    assert latest.config == cfg
    np.testing.assert_array_equal(latest.apply({"params": params}, ids), model.apply({"params": p7}, ids))
    # Layout conversion on load: a scan-trained run read as per-layer params (what HF export needs).
    plain, params3 = checkpoint.load_model(str(tmp_path / "run"), step=3, scan_layers=False)
    assert "h_1" in params3
    np.testing.assert_allclose(plain.apply({"params": params3}, ids), model.apply({"params": p3}, ids), atol=1e-6)

    convert.convert(f"orbax:{tmp_path / 'run'}", f"hf:{tmp_path / 'hf'}", step=3)
    m_hf, p_hf = hf.load_pretrained(str(tmp_path / "hf"))
    np.testing.assert_allclose(m_hf.apply({"params": p_hf}, ids), model.apply({"params": p3}, ids), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 5"):
        checkpoint.load_model(str(tmp_path / "run"), step=5)


def test_restoring_into_another_shape_names_the_tensor(tmp_path):
    cfg = gpt_config.get_config("tiny", vocab_size=64, n_positions=16)
    params = M.init_params(M.GPT(cfg), jax.random.PRNGKey(0))
    save_training_state(tmp_path / "run", cfg.replace(d_ff=100), params, 1)  # meta disagrees with weights
    with pytest.raises(errors.CheckpointError, match=r"\['h_0'\]\['mlp'\]\['c_fc'\]\['bias'\] has shape \(256,\) on disk, the model expects \(100,\)"):
        checkpoint.load_model(str(tmp_path / "run"))
