"""Pretraining loop: learning, sharding equivalence, accumulation, resume, preemption, NaN guard, errors."""
import glob
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, multi_device_env

from biomedlm_jax.core import errors
from biomedlm_jax.data import input_pipeline
from biomedlm_jax.formats import checkpoint, hf
from biomedlm_jax.models import gpt as model_lib
from biomedlm_jax.models import sharding
from biomedlm_jax.training import checkpoints, configlib, metrics, task, trainer
from biomedlm_jax.training import state as train_state
from biomedlm_jax.workflows import convert

ABSTRACTS = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"


def load_config_module():
    spec = importlib.util.spec_from_file_location("pretrain_config", REPO / "configs" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_config_file_matches_module():
    c = configlib.load_config_file(str(REPO / "configs" / "pretrain.py"), "gpt2-small")
    assert c == load_config_module().get_config("gpt2-small") and c.is_locked


def make_config(corpus, **overrides):
    c = load_config_module().get_config("tiny")
    c.data.train_files = corpus
    c.seq_len = 32
    c.global_batch_size = 8
    c.num_train_steps = 6
    c.warmup_steps = 2
    c.learning_rate = 3e-3
    c.log_every_steps = 1
    c.eval_every_steps = 100
    c.eval_batches = 2
    c.checkpoint_every_steps = 2
    c.progress_bar = False
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def train_losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir, "train")]


def final_params(workdir):
    _, params = checkpoint.load_model(str(workdir))
    return jax.device_get(params)


# ----------------------------------------------------------------------------------------------------


def test_config_is_locked_and_variants_build():
    mod = load_config_module()
    for variant in ("tiny", "gpt2-small", "biomedlm-2.7b"):
        c = mod.get_config(variant)
        with pytest.raises(AttributeError):
            c.learning_rte = 1.0  # typo'd key
        with pytest.raises(AttributeError):
            c.model.n_layers = 3
        cfg = trainer.model_config(c)
        assert cfg.n_positions >= c.seq_len
    big = mod.get_config("biomedlm-2.7b")
    assert (big.global_batch_size, big.seq_len, big.learning_rate, big.optimizer.weight_decay) == (1024, 1024, 1.6e-4, 1.6e-5)
    assert big.optimizer.decay_mode == "composer" and trainer.model_config(big).dtype == "bfloat16"
    assert big.num_train_steps * big.global_batch_size * big.seq_len == pytest.approx(300e9, rel=1e-5)


def test_unknown_cli_key_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "biomedlm_jax.pretrain", f"--config={REPO}/configs/pretrain.py:tiny",
         f"--workdir={tmp_path}", "--config.learning_rte=1e-3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "learning_rte" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_loss_goes_down_and_step_compiles_once(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=25, eval_every_steps=25, log_every_steps=5, checkpoint_every_steps=25)
    seen = []
    s = trainer.train_and_evaluate(c, str(tmp_path), hooks=[lambda step, m: seen.append((step, m["loss"]))])
    assert s["train_step_traces"] == 1
    assert s["eval_loss"] < s["initial_eval_loss"] - 1.0, s
    rows = metrics.read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25]
    # metrics are fetched from the device once per log row, yet every step reaches the hooks, in order
    assert [step for step, _ in seen] == list(range(1, 26))
    np.testing.assert_allclose(rows[0]["loss"], np.mean([l for _, l in seen[:5]]), rtol=1e-6)
    assert {"loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "skipped_steps"} <= set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert os.listdir(tmp_path / "tensorboard")
    assert checkpoint.latest_step(str(tmp_path)) == 25
    # the workdir is a complete model: the tokenizer is saved beside the checkpoints, and the latest
    # training checkpoint exports to HF with the same logits
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()
    convert.convert(f"orbax:{tmp_path}", f"hf:{tmp_path / 'hf'}")
    model, params = checkpoint.load_model(str(tmp_path))
    model2, params2 = hf.load_pretrained(str(tmp_path / "hf"))
    ids = np.arange(40, dtype=np.int32).reshape(2, 20)
    np.testing.assert_allclose(model2.apply({"params": params2}, ids), model.apply({"params": params}, ids), atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").exists()


@pytest.mark.slow
def test_train_step_traces_once_under_chex(small_corpus):
    c = make_config(small_corpus)
    cfg = trainer.model_config(c)
    model = model_lib.GPT(cfg)
    tx, _ = trainer.make_optimizer(c)
    mesh = sharding.make_mesh((2, 2, 2))
    abstract, shardings = train_state.state_shardings(model, tx, mesh, sharding.DEFAULT_RULES, c.seq_len)
    step_fn = chex.assert_max_traces(trainer.make_train_step(model, tx, deterministic=True), n=1)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        state, _ = train_state.initial_state(c, model, cfg, tx, abstract, shardings, task.LMTask(c))
        jitted = jax.jit(step_fn, in_shardings=(shardings, train_state.batch_sharding(mesh, sharding.DEFAULT_RULES)),
                         out_shardings=(shardings, None), donate_argnums=0)
        rng = np.random.default_rng(0)
        for _ in range(3):
            ids = rng.integers(0, cfg.vocab_size, (1, 8, c.seq_len + 1)).astype(np.int32)
            state, m = jitted(state, {"inputs": ids[..., :-1], "targets": ids[..., 1:]})
    chex.assert_shape(m["loss"], ())
    chex.assert_type(m["loss"], jnp.float32)
    assert int(state["step"]) == 3


@pytest.mark.slow
def test_sharded_equals_single_device(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=3, checkpoint_every_steps=3, mesh_shape=(2, 2, 2))
    trainer.train_and_evaluate(c, str(tmp_path / "mesh"))
    c1 = make_config(small_corpus, num_train_steps=3, checkpoint_every_steps=3, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c1, str(tmp_path / "one"), devices=jax.devices()[:1])
    np.testing.assert_allclose(
        [l for _, l in train_losses(tmp_path / "mesh")], [l for _, l in train_losses(tmp_path / "one")], rtol=1e-5
    )
    chex.assert_trees_all_close(final_params(tmp_path / "mesh"), final_params(tmp_path / "one"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_chunked_loss_trains_like_full_logits_on_a_mesh(tmp_path, small_corpus, monkeypatch, capsys):
    """loss_chunk_size changes memory, not the math: same train/eval losses and params on a 2x2x2 mesh.
    A device whose HBM the logits would crowd (logits_hbm_fraction) gets chunks without asking."""
    common = dict(num_train_steps=3, checkpoint_every_steps=3, eval_every_steps=3, mesh_shape=(2, 2, 2))
    full = trainer.train_and_evaluate(make_config(small_corpus, **common), str(tmp_path / "full"))
    assert "logits in chunks" not in capsys.readouterr().out  # CPU devices report no HBM: never chunked
    monkeypatch.setattr(trainer, "device_hbm_bytes", lambda device: 2 << 20)  # a 2 MiB device
    auto = trainer.train_and_evaluate(make_config(small_corpus, **common), str(tmp_path / "auto"))
    assert "logits in chunks of" in capsys.readouterr().out
    np.testing.assert_allclose(auto["eval_loss"], full["eval_loss"], rtol=1e-5)
    monkeypatch.undo()
    # 12 does not divide seq_len 32: two scanned pieces and a shorter last one
    chunked = trainer.train_and_evaluate(make_config(small_corpus, loss_chunk_size=12, **common), str(tmp_path / "chunk"))
    np.testing.assert_allclose(chunked["eval_loss"], full["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        [l for _, l in train_losses(tmp_path / "chunk")], [l for _, l in train_losses(tmp_path / "full")], rtol=1e-5
    )
    chex.assert_trees_all_close(final_params(tmp_path / "chunk"), final_params(tmp_path / "full"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_chunk_size must be 0 .off. or positive, got -1"):
        trainer.train_and_evaluate(make_config(small_corpus, loss_chunk_size=-1), str(tmp_path / "bad"))


def test_logits_chunk_when_they_would_crowd_the_devices_hbm():
    """2.7B's vocabulary at 16 sequences of 1024 per device: fp32 logits and their gradient are 3.8 GB,
    over 5% of a v4 chip's 34 GB, so 256 positions at a time (0.95 GB); on v5p's 95 GB they stay whole.
    An explicit loss_chunk_size wins; no HBM figure (CPU) or a zero fraction means whole logits."""
    from ml_collections import ConfigDict

    from biomedlm_jax.models.gpt_config import GPTConfig

    mesh = sharding.make_mesh((1, -1, 1))  # 8 devices: 16 sequences each
    cfg = GPTConfig(vocab_size=28896)
    c = make_config("unused", seq_len=1024, global_batch_size=8 * 32, grad_accum_steps=2)
    assert isinstance(c, ConfigDict) and c.logits_hbm_fraction == 0.05
    assert trainer.auto_loss_chunk(c, cfg, mesh, 32 * 2**30) == 256
    assert trainer.auto_loss_chunk(c, cfg, mesh, 95 * 10**9) == 0
    assert trainer.auto_loss_chunk(c, cfg, mesh, None) == 0
    assert trainer.auto_loss_chunk(c, cfg, mesh, 1) == 1  # a chunk of one position at the least
    with c.unlocked():
        c.loss_chunk_size = 100
    assert trainer.auto_loss_chunk(c, cfg, mesh, 32 * 2**30) == 100
    with c.unlocked():
        c.loss_chunk_size, c.logits_hbm_fraction = 0, 0.0
    assert trainer.auto_loss_chunk(c, cfg, mesh, 32 * 2**30) == 0


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch(tmp_path, small_corpus):
    # eps 1e-3 keeps Adam from amplifying float-rounding differences in near-zero gradients.
    common = dict(num_train_steps=2, checkpoint_every_steps=2, mesh_shape=(2, 1, 4), **{"optimizer.eps": 1e-3})
    trainer.train_and_evaluate(make_config(small_corpus, grad_accum_steps=1, **common), str(tmp_path / "big"))
    trainer.train_and_evaluate(make_config(small_corpus, grad_accum_steps=4, **common), str(tmp_path / "acc"))
    np.testing.assert_allclose(
        [l for _, l in train_losses(tmp_path / "big")], [l for _, l in train_losses(tmp_path / "acc")], rtol=1e-5
    )
    chex.assert_trees_all_close(final_params(tmp_path / "big"), final_params(tmp_path / "acc"), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_bit_identical(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=6, checkpoint_every_steps=4)
    handler_before = signal.getsignal(signal.SIGTERM)
    full = trainer.train_and_evaluate(c, str(tmp_path / "full"))
    assert full["step"] == 6 and not full["preempted"]

    def preempt_at_3(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = trainer.train_and_evaluate(c, str(tmp_path / "cut"), hooks=[preempt_at_3])
    assert first["preempted"] and first["step"] == 3
    assert checkpoint.latest_step(str(tmp_path / "cut")) == 3  # saved at the preemption step, not at 4
    second = trainer.train_and_evaluate(c, str(tmp_path / "cut"))
    assert second["start_step"] == 3 and second["step"] == 6 and second["train_step_traces"] == 1
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")  # exact, step by step
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "cut")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is removed afterwards


@pytest.mark.slow
def test_sigkill_mid_run_resumes_bit_identical(tmp_path, small_corpus):
    """A run killed with SIGKILL (no chance to save) resumes from its last complete checkpoint."""
    c = make_config(small_corpus, num_train_steps=8, checkpoint_every_steps=2)
    full = trainer.train_and_evaluate(c, str(tmp_path / "full"))
    workdir = tmp_path / "killed"
    flags = [f"--config.{k}={v}" for k, v in (
        ("data.train_files", small_corpus), ("seq_len", 32), ("global_batch_size", 8), ("num_train_steps", 8),
        ("warmup_steps", 2), ("learning_rate", 3e-3), ("log_every_steps", 1), ("eval_every_steps", 100),
        ("eval_batches", 2), ("checkpoint_every_steps", 2), ("progress_bar", False))]
    proc = subprocess.Popen(
        [sys.executable, "-m", "biomedlm_jax.pretrain", f"--config={REPO}/configs/pretrain.py:tiny",
         f"--workdir={workdir}", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=multi_device_env(),  # the 8 devices of the uninterrupted run above, so the two are bit-identical
    )
    killed_at = None
    try:
        for line in proc.stdout:
            if os.path.exists(workdir / "metrics.jsonl"):
                steps = [r["step"] for r in metrics.read_metrics(str(workdir), "train")]
                if steps and steps[-1] >= 5:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = steps[-1]
                    break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    resumed = trainer.train_and_evaluate(c, str(workdir))
    assert 2 <= resumed["start_step"] <= killed_at
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), final_params(tmp_path / "full"), final_params(workdir))
    assert full["step"] == resumed["step"] == 8


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(small_corpus):
    c = make_config(small_corpus)
    cfg = trainer.model_config(c)
    model = model_lib.GPT(cfg)
    tx, _ = trainer.make_optimizer(c)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    abstract, shardings = train_state.state_shardings(model, tx, mesh, sharding.DEFAULT_RULES, c.seq_len)
    with jax.set_mesh(mesh):
        state, _ = train_state.initial_state(c, model, cfg, tx, abstract, shardings, task.LMTask(c))
        step = jax.jit(trainer.make_train_step(model, tx, deterministic=True))
        ids = np.random.default_rng(0).integers(0, 1000, (1, 4, c.seq_len + 1)).astype(np.int32)
        good = {"inputs": ids[..., :-1], "targets": ids[..., 1:], "weights": np.ones((1, 4, c.seq_len), np.float32)}
        bad = dict(good, weights=good["weights"].copy())
        bad["weights"][0, 1, 3] = np.nan  # an injected NaN batch
        before = jax.device_get(state["params"])
        state, m = step(state, bad)
        assert not np.isfinite(float(m["loss"]))
        assert int(m["nonfinite_consecutive"]) == 1 and int(m["nonfinite_total"]) == 1
        jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state["params"]))
        for _ in range(2):  # (the first good step runs at warmup lr 0: skipped steps do not advance the schedule)
            state, m = step(state, good)
        assert np.isfinite(float(m["loss"]))
        assert int(m["nonfinite_consecutive"]) == 0 and int(m["nonfinite_total"]) == 1
        changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state["params"]))
        assert any(jax.tree.leaves(changed))


@pytest.fixture
def nan_from_step_4(monkeypatch):
    """Every batch from the 4th on carries a NaN loss weight."""
    original = input_pipeline.BatchIterator.__next__

    def poisoned(self):
        batch = original(self)
        weights = np.ones(batch["targets"].shape, np.float32)
        if self.position > 3 * self.global_batch:  # steps 4 onwards
            weights[..., 0] = np.nan
        return dict(batch, weights=weights)

    monkeypatch.setattr(input_pipeline.BatchIterator, "__next__", poisoned)


@pytest.mark.slow
def test_run_stops_after_consecutive_nonfinite_steps(tmp_path, small_corpus, nan_from_step_4):
    c = make_config(small_corpus, num_train_steps=20, checkpoint_every_steps=2, **{"optimizer.max_consecutive_nonfinite": 3})
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        trainer.train_and_evaluate(c, str(tmp_path))
    # steps 4-6 were skipped and the run stopped at 6 without saving: the last checkpoint is step 4's
    assert checkpoint.latest_step(str(tmp_path)) == 4
    rows = metrics.read_metrics(str(tmp_path), "train")
    assert rows[-1]["step"] == 5 and rows[-1]["loss"] is None and rows[-1]["skipped_steps"] == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_params(tmp_path)))


@pytest.mark.slow
def test_nonfinite_stop_between_log_steps_names_the_step(tmp_path, small_corpus, nan_from_step_4):
    """Metrics reach the host every 4 steps here; the stop still names step 6, the third skip in a row."""
    c = make_config(small_corpus, num_train_steps=20, log_every_steps=4, checkpoint_every_steps=10,
                    **{"optimizer.max_consecutive_nonfinite": 3})
    with pytest.raises(FloatingPointError, match="stopping at step 6: 3 consecutive steps"):
        trainer.train_and_evaluate(c, str(tmp_path))
    assert checkpoint.latest_step(str(tmp_path)) is None
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path), "train")] == [4]


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path, small_corpus):
    c = make_config(small_corpus, num_train_steps=2, mesh_shape=(8, 1, 1))
    trainer.train_and_evaluate(c, str(tmp_path))
    cfg = trainer.model_config(c)
    model = model_lib.GPT(cfg)
    tx, _ = trainer.make_optimizer(c)
    values = {}
    for shape in ((8, 1, 1), (1, 2, 4)):
        mesh = sharding.make_mesh(shape)
        abstract, shardings = train_state.state_shardings(model, tx, mesh, sharding.DEFAULT_RULES, c.seq_len)
        mngr = checkpoint.manager(str(tmp_path))
        state, meta = checkpoints.restore_checkpoint(mngr, str(tmp_path), 2, abstract)
        assert meta["data"]["position"] == 2 * c.global_batch_size
        jax.tree.map(lambda x, s: assert_sharding(x, s), state, shardings)
        values[shape] = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, values[(8, 1, 1)], values[(1, 2, 4)])
    # on 2x4 fsdp x tensor the QKV kernel (d, 3, heads, head_dim) really is split: 1/8 per device
    qkv = state["params"]["h_0"]["attn"]["c_attn"]["kernel"]
    assert qkv.addressable_shards[0].data.size * 8 == qkv.size


def assert_sharding(x, s):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


@pytest.mark.slow
def test_resume_into_other_model_shape_names_the_tensor(tmp_path, small_corpus):
    trainer.train_and_evaluate(make_config(small_corpus, num_train_steps=2), str(tmp_path))
    with pytest.raises(errors.CheckpointError, match=r"params\[.*has shape"):
        trainer.train_and_evaluate(make_config(small_corpus, num_train_steps=4, **{"model.d_model": 32}), str(tmp_path))


@pytest.mark.slow
def test_changed_data_is_detected_on_resume(tmp_path, small_corpus):
    trainer.train_and_evaluate(make_config(small_corpus, num_train_steps=2), str(tmp_path))
    with pytest.raises(errors.DataError, match="training data changed|other data"):
        trainer.train_and_evaluate(make_config(str(ABSTRACTS), num_train_steps=4), str(tmp_path))


@pytest.mark.slow
def test_init_from_hf_checkpoint(tmp_path, small_corpus):
    from conftest import make_hf_model

    make_hf_model(tmp_path / "hf", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)
    with pytest.raises(ValueError, match="n_layer"):
        trainer.model_config(make_config(small_corpus, init_from=f"hf:{tmp_path / 'hf'}", **{"model.n_layer": 3}))
    # one step whose learning rate is 0 (first warmup step): params must be exactly the HF weights
    c = make_config(small_corpus, num_train_steps=1, warmup_steps=5, init_from=f"hf:{tmp_path / 'hf'}",
                    **{"model.scan_layers": True})
    s = trainer.train_and_evaluate(c, str(tmp_path / "run"))
    assert s["source"].startswith("initialised from HF")
    model, params = checkpoint.load_model(str(tmp_path / "run"), scan_layers=False)
    assert model.config.scan_layers is False and model.config.d_model == 32
    ref = hf.load_params_numpy(str(tmp_path / "hf"), model.config)
    jax.tree.map(np.testing.assert_array_equal, ref, jax.device_get(params))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_processes(workdir, corpus, env_extra=None, flags=(), **config):
    """Two pretraining processes on localhost (4 fake CPU devices each) joined into one 2x2x2 mesh."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", TF_CPP_MIN_LOG_LEVEL="2",
               **(env_extra or {}))
    base = dict(seq_len=32, global_batch_size=8, warmup_steps=2, log_every_steps=1, eval_batches=2,
                progress_bar=False, mesh_shape="(2,2,2)")
    overrides = [f"--config.{k}={v}" for k, v in {"data.train_files": corpus, **base, **config}.items()]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "biomedlm_jax.pretrain", f"--config={REPO}/configs/pretrain.py:tiny",
             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", "--init_timeout_s=60", *flags, *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]


def wait_for_train_rows(workdir, procs, n: int) -> None:
    """Until the running processes have logged `n` train rows (each must still be running)."""
    for _ in range(600):
        rows = metrics.read_metrics(str(workdir), "train") if (workdir / "metrics.jsonl").exists() else []
        if len(rows) >= n:
            return
        assert all(p.poll() is None for p in procs), "a process exited early"
        time.sleep(0.2)


def finish(procs, timeout=300, outputs=None) -> list[dict]:
    """Wait for the processes; each must exit 0. Returns each one's `[done ...]` summary as strings (and
    appends each one's whole output to `outputs` when given)."""
    outs = [] if outputs is None else outputs
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    done = [next(l for l in out.splitlines() if l.startswith("[done")) for out in outs]
    return [dict(kv.split("=", 1) for kv in l.split() if "=" in kv) for l in done]


def corrupt(workdir, step):
    """Flip bytes in the middle of every data file of the step's state (tensorstore's CRC-32C of the
    OCDBT index or the digest saved with the step then fails on read)."""
    files = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files
    for f in files:
        data = bytearray(open(f, "rb").read())
        for i in range(len(data) // 2, min(len(data) // 2 + 16, len(data))):
            data[i] ^= 0xFF
        open(f, "wb").write(bytes(data))


@pytest.mark.slow
def test_two_processes_on_localhost_agree_and_fall_back_together(tmp_path, small_corpus):
    """Two processes compute what one process on 8 devices does. Resumed past a damaged step 4, both fail
    to restore it, agree on it, process 0 alone moves it aside, and both go on from step 2 to the end,
    saving the final step; their output has the one-line report and no traceback."""
    run = dict(eval_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=3)
    losses = [float(d["train_loss"]) for d in finish(start_two_processes(tmp_path / "mp", small_corpus,
                                                                         num_train_steps=4, **run))]
    assert losses[0] == losses[1]
    # the same global computation in one process on 8 devices
    single = trainer.train_and_evaluate(make_config(small_corpus, num_train_steps=4, mesh_shape=(2, 2, 2), **run),
                                        str(tmp_path / "sp"))
    np.testing.assert_allclose(losses[0], single["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(
        [l for _, l in train_losses(tmp_path / "mp")], [l for _, l in train_losses(tmp_path / "sp")], rtol=1e-5
    )
    assert checkpoint.latest_step(str(tmp_path / "mp")) == 4
    corrupt(tmp_path / "mp", 4)
    outputs = []
    resumed = finish(start_two_processes(tmp_path / "mp", small_corpus, num_train_steps=6, **run), timeout=180,
                     outputs=outputs)
    assert all(d["start_step"] == "2" and d["step"] == "6" and d["last_checkpoint"] == "6" for d in resumed), resumed
    (moved,) = os.listdir(tmp_path / "mp" / checkpoint.QUARANTINE_DIR)  # moved once, by process 0
    assert moved.startswith("4-") and "CRC-32C" in (tmp_path / "mp" / checkpoint.QUARANTINE_DIR / moved / "REASON.txt").read_text()
    assert checkpoint.latest_step(str(tmp_path / "mp")) == 6
    for out in outputs:
        assert "resuming from step 2" in out and "Traceback" not in out and "Exception ignored" not in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("sync_service", [True, False])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, small_corpus, sync_service):
    """A preemption notice reaching one process only: both save the same step and exit cleanly. JAX's
    preemption sync manager picks the step (no per-step collective in the loop); with
    jax_enable_preemption_service off, an all-gather of the flags after each step does.

    With the sync service, the job then goes on: the rerun resumes from that step; SIGKILL to one of its
    processes makes the other exit non-zero within about --heartbeat_timeout_s, naming the lost task,
    instead of waiting in a collective; a rerun of both resumes from the last complete checkpoint."""
    workdir = tmp_path / "mp"
    long_run = dict(num_train_steps=100_000, eval_every_steps=100_000, checkpoint_every_steps=100_000)
    env = {"JAX_ENABLE_PREEMPTION_SERVICE": str(sync_service).lower()}
    procs = start_two_processes(workdir, small_corpus, env, **long_run)
    try:
        wait_for_train_rows(workdir, procs, 3)
        procs[1].send_signal(signal.SIGTERM)  # the non-coordinator process only
    except BaseException:
        for p in procs:
            p.kill()
        raise
    done = finish(procs)
    stopped = {d["step"] for d in done}
    assert len(stopped) == 1 and all(d["preempted"] == "True" for d in done), done
    step = int(stopped.pop())
    assert 3 <= step < 100_000 and checkpoint.latest_step(str(workdir)) == step
    if not sync_service:
        return  # what follows does not depend on how the step was agreed; it runs once

    # the rerun resumes from `step`; one of its processes is lost
    run = dict(long_run, checkpoint_every_steps=4)
    procs = start_two_processes(workdir, small_corpus, env, flags=["--heartbeat_timeout_s=10"], **run)
    try:
        wait_for_train_rows(workdir, procs, step + 6)
        procs[1].kill()
        lost_at = time.monotonic()
        out = procs[0].communicate(timeout=120)[0]
        detected_s = time.monotonic() - lost_at
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert f"resumed from step {step}" in out, out[-3000:]
    assert procs[0].returncode != 0 and detected_s < 45, (procs[0].returncode, detected_s)
    assert "The following tasks are unhealthy (stopped sending heartbeats):\n1" in out
    last = checkpoint.latest_step(str(workdir))
    assert last is not None and last > step and last % 4 == 0
    resumed = finish(start_two_processes(workdir, small_corpus, env, **dict(run, num_train_steps=last + 2)))
    assert all(d["start_step"] == str(last) and d["step"] == str(last + 2) for d in resumed), resumed


def test_trainer_imports_no_task_module_and_names_a_missing_one():
    code = ("import sys, biomedlm_jax.training.trainer, biomedlm_jax.data.input_pipeline; "
            "print(sorted(m for m in sys.modules if m in ('biomedlm_jax.tasks.mcqa', 'biomedlm_jax.tasks.seq2seq')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
    c = load_config_module().get_config("tiny")
    c.data.task = "qa-from-mars"
    with pytest.raises(ValueError, match="data.task='qa-from-mars'.*pass this config's task"):
        task.for_config(c)
