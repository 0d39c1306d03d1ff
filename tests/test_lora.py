"""LoRA on the shared trainer: step 0 is the base model, only adapters (and a task's new parameters)
train, the merged export equals the adapted forward, and low-precision Adam moments."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from test_mcqa import synthetic_items
from test_train import make_config

from biomedlm_jax.formats import checkpoint
from biomedlm_jax.models import lora
from biomedlm_jax.models.gpt import GPT
from biomedlm_jax.models.gpt_config import GPTConfig, get_config
from biomedlm_jax.tasks import mcqa
from biomedlm_jax.tasks.mcqa import MCQAModel
from biomedlm_jax.training import configlib, trainer

GPT2 = str(REPO / "data" / "gpt2_tokenizer")


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(jax.device_get(tree)).items()}


def raw_params(workdir, model_cls=GPT, **model_kw):
    """The stored params of the latest step as the run's own model has them (adapters not merged)."""
    step, meta = checkpoint.read_meta(str(workdir))
    cfg = GPTConfig(**meta["model"])
    model = model_cls(cfg, **model_kw)
    args = (jnp.ones((1, 1, 8), jnp.int32), jnp.ones((1, 1, 8), bool)) if model_cls is MCQAModel else (jnp.ones((1, 8), jnp.int32),)
    abstract = checkpoint.place(jax.eval_shape(lambda: flax.linen.unbox(model.init(jax.random.PRNGKey(0), *args)["params"])))
    reader = checkpoint.reader(str(workdir))
    if meta.get("lora_base"):  # the step holds the trainable params; the frozen ones come from the base
        return cfg, checkpoint.restore_lora_run(reader, step, meta, cfg, abstract, str(workdir))
    return cfg, checkpoint.restore_params(reader, step, abstract, meta, str(workdir))


def step_bytes(workdir, step):
    return sum(f.stat().st_size for f in (workdir / "checkpoints" / str(step)).rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_corpus):
    """A 2-step tiny LM run: the base model the LoRA runs start from."""
    workdir = tmp_path_factory.mktemp("base")
    c = make_config(small_corpus, num_train_steps=2, mesh_shape=(1, 1, 1))
    trainer.train_and_evaluate(c, str(workdir), devices=jax.devices()[:1])
    return workdir


def lora_config(small_corpus, base_run, **overrides):
    settings = {"init_from": f"orbax:{base_run}", "num_train_steps": 4, "mesh_shape": (1, 1, 1), "lora.rank": 4,
                "lora.alpha": 8.0, **overrides}
    return make_config(small_corpus, **settings)


def test_lora_step0_is_the_base_model():
    cfg = get_config("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    base = flax.linen.unbox(GPT(cfg).init(jax.random.PRNGKey(0), ids)["params"])
    cl = cfg.replace(lora_rank=8, lora_alpha=16.0)
    adapted = flax.linen.unbox(GPT(cl).init(jax.random.PRNGKey(2), ids)["params"])
    adapted = lora.join(base, adapted)  # the base weights (they win) next to freshly initialised adapters
    names = [k for k in flat(adapted) if k.endswith(("lora_a", "lora_b"))]
    assert len(names) == 2 * 4 * cfg.n_layer
    np.testing.assert_array_equal(GPT(cfg).apply({"params": base}, ids), GPT(cl).apply({"params": adapted}, ids))
    only_qkv = cfg.replace(lora_rank=4, lora_targets=("qkv",))
    p = flax.linen.unbox(GPT(only_qkv).init(jax.random.PRNGKey(0), ids)["params"])
    assert {k for k in flat(p) if "lora" in k} == {f"h_{i}/attn/c_attn/lora_{x}" for i in range(2) for x in "ab"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_corpus, base_run):
    """A 4-step LoRA run (rank 4, all four targets) on one device from `base_run`: (workdir, summary)."""
    workdir = tmp_path_factory.mktemp("lora")
    return workdir, trainer.train_and_evaluate(lora_config(small_corpus, base_run), str(workdir), devices=jax.devices()[:1])


@pytest.mark.slow
def test_only_adapters_train_and_the_merged_export_equals_the_adapted_forward(lora_run, base_run):
    tmp_path, s = lora_run
    # rank 4 on c_attn (64 -> 3x64), attn c_proj (64 -> 64), c_fc (64 -> 256), mlp c_proj (256 -> 64), 2 layers
    assert s["trainable_params"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    base = flat(checkpoint.load_model(str(base_run))[1])
    cfg, raw = raw_params(tmp_path)
    got = flat(raw)
    for k, v in got.items():
        if k.endswith("lora_b"):
            assert np.abs(v).max() > 0, k  # trained away from zero
        elif not k.endswith("lora_a"):
            np.testing.assert_array_equal(v, base[k], err_msg=k)  # frozen, bit for bit
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 24), 0, cfg.vocab_size)
    adapted = GPT(cfg).apply({"params": raw}, ids)
    model, merged = checkpoint.load_model(str(tmp_path))  # what convert / evaluate / generate read
    assert model.config.lora_rank == 0 and not any("lora" in k for k in flat(merged))
    np.testing.assert_allclose(model.apply({"params": merged}, ids), adapted, atol=1e-5, rtol=0)
    assert not np.allclose(GPT(cfg.replace(lora_rank=0)).apply({"params": checkpoint.load_model(str(base_run))[1]}, ids),
                           adapted, atol=1e-4)


@pytest.mark.slow
def test_lora_resume_is_bit_identical_and_bf16_base_and_moments(tmp_path, small_corpus, base_run):
    over = {"lora.base_dtype": "bfloat16", "optimizer.mu_dtype": "bfloat16", "optimizer.nu_dtype": "bfloat16"}
    trainer.train_and_evaluate(lora_config(small_corpus, base_run, **over), str(tmp_path / "full"), devices=jax.devices()[:1])
    c2 = lora_config(small_corpus, base_run, **over, num_train_steps=2)
    trainer.train_and_evaluate(c2, str(tmp_path / "resumed"), devices=jax.devices()[:1])
    s = trainer.train_and_evaluate(lora_config(small_corpus, base_run, **over), str(tmp_path / "resumed"),
                                 devices=jax.devices()[:1])
    assert s["start_step"] == 2 and np.isfinite(s["train_loss"])
    a, b = flat(raw_params(tmp_path / "full")[1]), flat(raw_params(tmp_path / "resumed")[1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # what is stored: the adapters (fp32) and their moments (bf16), and a reference to the base
    reader = checkpoint.reader(str(tmp_path / "full"))
    tree = reader.item_metadata(4)["state"]
    tree = getattr(tree, "tree", tree)
    dtypes = {"/".join(str(getattr(p, "key", p)) for p in path): str(m.dtype)
              for path, m in jax.tree_util.tree_leaves_with_path(tree["params"], is_leaf=lambda x: hasattr(x, "dtype"))}
    assert dtypes["h_0/attn/c_attn/lora_a"] == "float32" and all(k.endswith(("lora_a", "lora_b")) for k in dtypes)
    ref = checkpoint.read_meta(str(tmp_path / "full"))[1]["lora_base"]
    assert ref["init_from"] == f"orbax:{base_run}" and ref["step"] == 2 and len(ref["sha256"]) == 64
    assert ref["dtype"] == "bfloat16"
    assert step_bytes(tmp_path / "full", 4) * 5 < step_bytes(base_run, 2)  # the base is not in it
    moments = [str(m.dtype) for path, m in jax.tree_util.tree_leaves_with_path(tree["opt_state"], is_leaf=lambda x: hasattr(x, "dtype"))
               if len(m.shape) >= 2]
    assert moments and set(moments) == {"bfloat16"} and len(moments) == 2 * 2 * 4 * 2  # mu, nu x A, B x 4 x 2 layers


@pytest.mark.slow
def test_a_changed_base_is_refused(tmp_path, small_corpus, base_run):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    c = lora_config(small_corpus, base, num_train_steps=2)
    trainer.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    # the base's weights change under the run (here: its latest step is replaced by other weights)
    data = sorted(f for f in (base / "checkpoints" / "2" / "state").rglob("*") if f.is_file() and f.stat().st_size > 1000)
    raw = bytearray(data[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data[0].write_bytes(bytes(raw))
    c4 = lora_config(small_corpus, base, num_train_steps=4)
    with pytest.raises(Exception, match=r"trained on the base orbax:.*/base .*but init_from is now"):
        trainer.train_and_evaluate(c4, str(tmp_path / "run"), devices=jax.devices()[:1])
    with pytest.raises(Exception, match=r"the LoRA run's base orbax:.*/base \(step 2\) changed under it"):
        checkpoint.load_model(str(tmp_path / "run"))


@pytest.mark.slow
def test_lora_on_a_2x2x2_mesh_equals_one_device(tmp_path, small_corpus, base_run, lora_run):
    one_dir, one = lora_run
    mesh = trainer.train_and_evaluate(lora_config(small_corpus, base_run, mesh_shape=(2, 2, 2)), str(tmp_path / "mesh"))
    assert one["train_loss"] == pytest.approx(mesh["train_loss"], rel=1e-5)
    a, b = flat(raw_params(one_dir)[1]), flat(raw_params(tmp_path / "mesh")[1])
    # The mesh reduces each gradient in another fp32 order. Adam divides by sqrt(nu), so an element whose
    # gradient is near zero can move ~1e-3 of a step (lr 3e-3) differently (seen: 3.7e-6 on one of 1,024
    # elements). A sharding bug moves whole tensors by O(lr): atol 3e-5 is 1% of one step.
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=3e-5, rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_lora_mcqa_trains_adapters_head_and_only_the_added_embedding_rows(tmp_path, base_run):
    synthetic_items(tmp_path / "train.jsonl", 64, 0)
    synthetic_items(tmp_path / "dev.jsonl", 16, 1)
    c = configlib.load_config_file(str(REPO / "configs" / "mcqa.py"), "medqa-tiny")
    c.init_from, c.data.train, c.data.dev, c.data.carve_dev_fraction = f"orbax:{base_run}", str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl"), 0.0
    c.seq_len, c.global_batch_size, c.num_train_steps, c.warmup_steps = 24, 8, 3, 1
    c.eval_every_steps, c.checkpoint_every_steps, c.progress_bar, c.mesh_shape = 3, 3, False, (1, 1, 1)
    c.lora.rank = 4
    c.optimizer.weight_decay = 0.1  # decay must not move the frozen rows either
    trainer.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1], task=mcqa.MCQATask(c))
    base = flat(checkpoint.load_model(str(base_run))[1])
    meta = checkpoint.read_meta(str(tmp_path / "run"))[1]
    cfg, raw = raw_params(tmp_path / "run", MCQAModel, head=meta["mcqa"]["head"], num_labels=meta["mcqa"]["num_labels"])
    got = flat(raw)
    n_base = base["wte/embedding"].shape[0]
    wte = got["transformer/wte/embedding"]
    assert wte.shape[0] == n_base + 3  # [PAD], [CLS], [SEP]
    np.testing.assert_array_equal(wte[:n_base], base["wte/embedding"])
    init_rows = np.repeat(base["wte/embedding"].mean(0, keepdims=True), 3, 0)
    assert not np.allclose(wte[n_base:], init_rows)  # the added rows trained
    for k, v in got.items():
        if k.startswith("transformer/") and not k.endswith(("lora_a", "lora_b", "wte/embedding")):
            np.testing.assert_array_equal(v, base[k[len("transformer/"):]], err_msg=k)
    assert "score/kernel" in got
    # the classifier (best/ checkpoint) loads merged, and scores as the adapted model does
    clf = mcqa.load_classifier(f"orbax:{tmp_path / 'run'}")
    assert clf.model.config.lora_rank == 0 and not any("lora" in k for k in flat(clf.params))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (2, 4, 24)))
    mask = jnp.ones(ids.shape, bool)
    adapted = MCQAModel(cfg, meta["mcqa"]["head"], meta["mcqa"]["num_labels"]).apply({"params": raw}, ids, mask)
    np.testing.assert_allclose(clf.model.apply({"params": clf.params}, ids, mask), adapted, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_peft_export_loads_in_torch_peft_with_our_logits_and_imports_back(tmp_path, small_corpus):
    torch = pytest.importorskip("torch")
    from conftest import gpt2_hf_files, make_hf_model
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    make_hf_model(base, n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)
    gpt2_hf_files(base)  # its tokenizer: GPT-2's
    c = make_config(small_corpus, init_from=f"hf:{base}", num_train_steps=4, mesh_shape=(1, 1, 1), seq_len=32,
                    **{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "qkv,attn_out,mlp_in,mlp_out",
                       "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0})
    trainer.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1])
    from biomedlm_jax.workflows import convert

    convert.convert(f"orbax:{tmp_path / 'run'}", f"peft:{tmp_path / 'peft'}")
    cfg_json = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["base_model_name_or_path"] == str(base)
    ids = np.random.default_rng(0).integers(0, 50257, (2, 20))
    model, merged = checkpoint.load_model(str(tmp_path / "run"))
    ours = np.asarray(model.apply({"params": merged}, jnp.asarray(ids)))
    tm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = tm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # and back: the PEFT adapter as a run's starting adapters (lr 0: nothing moves in one step)
    c2 = make_config(small_corpus, init_from=f"hf:{base}", num_train_steps=1, mesh_shape=(1, 1, 1), seq_len=32,
                     learning_rate=0.0, warmup_steps=0,
                     **{"lora.rank": 4, "lora.alpha": 8.0, "lora.from_peft": str(tmp_path / "peft"),
                        "model.embd_pdrop": 0.0, "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0})
    trainer.train_and_evaluate(c2, str(tmp_path / "run2"), devices=jax.devices()[:1])
    model2, merged2 = checkpoint.load_model(str(tmp_path / "run2"))
    np.testing.assert_allclose(np.asarray(model2.apply({"params": merged2}, jnp.asarray(ids))), ours, atol=1e-5, rtol=0)
    # a rank that is not the adapter's is an error naming the file
    c3 = make_config(small_corpus, init_from=f"hf:{base}", num_train_steps=1, mesh_shape=(1, 1, 1), seq_len=32,
                     **{"lora.rank": 8, "lora.from_peft": str(tmp_path / "peft")})
    with pytest.raises(Exception, match="adapter_config.json: r=4 but the run has lora r=8"):
        trainer.train_and_evaluate(c3, str(tmp_path / "run3"), devices=jax.devices()[:1])
