"""The lm-evaluation-harness backend: the same per-request numbers as the harness's own `hf` backend.

Both backends run one random-init GPT-2 (built in torch, saved as safetensors with GPT-2's tokenizer)
through small local tasks of each request type: multiple choice (loglikelihood), rolling perplexity
(loglikelihood_rolling) and generate_until with stop strings.
"""
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from conftest import REPO, gpt2_hf_files, make_hf_model  # noqa: E402

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, initializer_range=0.3)

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/mc.jsonl}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/docs.jsonl}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA/gen.jsonl}
output_type: generate_until
test_split: test
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: [".", "\\n\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = root / "ckpt"
    make_hf_model(ckpt, seed=3, **TINY)
    gpt2_hf_files(ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                                                            "eos_token": "<|endoftext|>", "model_max_length": 128}))
    from biomedlm_jax.tasks import mcqa_data

    items = mcqa_data.load_pubmedqa(str(REPO / "data" / "pubmedqa" / "ori_pqal.json"), "test")[:12]
    data = root / "data"
    data.mkdir()
    with open(data / "mc.jsonl", "w") as f:
        for i in items:
            f.write(json.dumps({"question": i.question, "answer": i.answer,  # one- and several-token continuations
                                "choices": [" yes, it does", " no", " maybe not"] if len(i.question) % 2
                                else ["yes", "no", "maybe"]}) + "\n")
    with open(data / "docs.jsonl", "w") as f:  # documents of 1..3 windows of 128 tokens
        for n, i in enumerate(items[:6]):
            f.write(json.dumps({"text": " ".join([i.context] * (1 + n % 3))}) + "\n")
    with open(data / "gen.jsonl", "w") as f:
        for i in items[:8]:
            f.write(json.dumps({"prompt": f"Question: {i.question}\nAnswer:", "target": "yes"}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.replace("DATA", str(data)))
    return ckpt, tasks


def run(model, model_args, tasks_dir, tasks, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    importlib.import_module("biomedlm_jax.evaluation.harness")  # registers the biomedlm_jax model

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=4, device="cpu",
                                   task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True, **kw)


def by_doc(samples):
    return {s["doc_id"]: s for s in samples}


@pytest.mark.slow
def test_same_numbers_as_the_hf_backend(setup):
    ckpt, tasks = setup
    ours = run("biomedlm_jax", f"init_from=hf:{ckpt}", tasks, ["tiny_mc", "tiny_ppl", "tiny_gen"])
    theirs = run("hf", f"pretrained={ckpt},dtype=float32", tasks, ["tiny_mc", "tiny_ppl", "tiny_gen"])
    # multiple choice: per-request log-likelihoods within 1e-4 and identical is_greedy flags
    a, b = by_doc(ours["samples"]["tiny_mc"]), by_doc(theirs["samples"]["tiny_mc"])
    assert len(a) == 12
    for d in a:
        ours_r = [r[0] for r in a[d]["resps"]]
        theirs_r = [r[0] for r in b[d]["resps"]]
        np.testing.assert_allclose([float(x[0]) for x in ours_r], [float(x[0]) for x in theirs_r], atol=1e-4)
        assert [bool(x[1]) for x in ours_r] == [bool(x[1]) for x in theirs_r]
    # rolling: document totals within 1e-3 (documents of up to three 128-token windows)
    a, b = by_doc(ours["samples"]["tiny_ppl"]), by_doc(theirs["samples"]["tiny_ppl"])
    np.testing.assert_allclose([float(a[d]["resps"][0][0]) for d in sorted(a)],
                               [float(b[d]["resps"][0][0]) for d in sorted(b)], atol=1e-3)
    # generate_until: identical greedy text, cut at the stop strings
    a, b = by_doc(ours["samples"]["tiny_gen"]), by_doc(theirs["samples"]["tiny_gen"])
    assert [a[d]["resps"][0][0] for d in sorted(a)] == [b[d]["resps"][0][0] for d in sorted(b)]
    assert any(a[d]["resps"][0][0] for d in a)  # something was generated
    # so task metrics are identical
    for task in ("tiny_mc", "tiny_gen"):
        assert ours["results"][task] == {k: v for k, v in theirs["results"][task].items()}
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(theirs["results"]["tiny_ppl"][metric], rel=1e-5)


@pytest.mark.slow
def test_same_numbers_with_a_short_max_length(setup):
    """max_length=16: contexts cut from the left, many rolling windows, 4 context tokens left for generation."""
    ckpt, tasks = setup
    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    ours = run("biomedlm_jax", f"init_from=hf:{ckpt},max_length=16", tasks, names, limit=6)
    theirs = run("hf", f"pretrained={ckpt},dtype=float32,max_length=16", tasks, names, limit=6)
    a, b = by_doc(ours["samples"]["tiny_mc"]), by_doc(theirs["samples"]["tiny_mc"])
    for d in a:
        np.testing.assert_allclose([float(r[0][0]) for r in a[d]["resps"]], [float(r[0][0]) for r in b[d]["resps"]],
                                   atol=1e-4)
        assert [bool(r[0][1]) for r in a[d]["resps"]] == [bool(r[0][1]) for r in b[d]["resps"]]
    a, b = by_doc(ours["samples"]["tiny_ppl"]), by_doc(theirs["samples"]["tiny_ppl"])
    np.testing.assert_allclose([float(a[d]["resps"][0][0]) for d in sorted(a)],
                               [float(b[d]["resps"][0][0]) for d in sorted(b)], atol=1e-3)
    a, b = by_doc(ours["samples"]["tiny_gen"]), by_doc(theirs["samples"]["tiny_gen"])
    assert [a[d]["resps"][0][0] for d in sorted(a)] == [b[d]["resps"][0][0] for d in sorted(b)]


@pytest.mark.slow
def test_sampled_generation_is_seeded(setup):
    from lm_eval.api.instance import Instance

    from biomedlm_jax.evaluation import harness

    ckpt, _ = setup
    kw = {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0}
    reqs = [Instance("generate_until", {}, (f"Question {n}: is aspirin an NSAID?\nAnswer:", kw), n) for n in range(3)]
    greedy = [Instance("generate_until", {}, (r.args[0], {"until": ["\n\n"], "max_gen_toks": 10}), 0) for r in reqs]
    one = harness.JaxLM(init_from=f"hf:{ckpt}", batch_size=4, seed=1)
    two = harness.JaxLM(init_from=f"hf:{ckpt}", batch_size=4, seed=2)
    s1 = one.generate_until(reqs, disable_tqdm=True)
    assert s1 == one.generate_until(reqs, disable_tqdm=True)  # same seed, same samples
    assert s1 != two.generate_until(reqs, disable_tqdm=True) and s1 != one.generate_until(greedy, disable_tqdm=True)


def test_requests_of_many_lengths_compile_a_few_shapes(setup):
    from lm_eval.api.instance import Instance

    from biomedlm_jax.evaluation import harness

    ckpt, _ = setup
    lm = harness.JaxLM(init_from=f"hf:{ckpt}", batch_size=4, bucket=32)
    words = "the patient was given aspirin and recovered fully after two weeks of care".split()
    reqs = [Instance("loglikelihood", {}, (" ".join(words[: 1 + n % len(words)]) * (1 + n // 7), " yes"), n)
            for n in range(40)]
    before = harness._TRACES["loglikelihood"]
    lm.loglikelihood(reqs, disable_tqdm=True)
    lengths = {len(lm.tok_encode(r.args[0])) for r in reqs}
    assert len(lengths) > 10 and harness._TRACES["loglikelihood"] - before <= 4  # buckets of 32 up to 128


@pytest.mark.slow
def test_cli_runs_and_writes_the_harness_outputs(setup, tmp_path):
    ckpt, tasks = setup
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.lm_eval", f"--init_from=hf:{ckpt}", "--tasks=tiny_mc",
                        f"--include_path={tasks}", "--batch_size=4", "--limit=5", "--log_samples",
                        f"--output_path={tmp_path / 'out'}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tiny_mc" in r.stdout and "acc" in r.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    samples = list((tmp_path / "out").rglob("samples_tiny_mc_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    assert json.loads(results[0].read_text())["config"]["model"] == "biomedlm_jax"
    assert len(samples[0].read_text().splitlines()) == 5


SHARED = REPO.parent / "shared" / "data"


def test_offline_medical_tasks_use_the_builtin_prompts(monkeypatch):
    """Our local tasks render the same prompts as the harness's built-in tasks of the same name."""
    monkeypatch.chdir(REPO)  # pubmedqa_local's default file is the checkout's data/pubmedqa copy
    from lm_eval.tasks.medmcqa import utils_medmcqa
    from lm_eval.tasks.medqa import preprocess_medqa
    from lm_eval.tasks.pubmedqa import preprocess_pubmedqa

    from biomedlm_jax.evaluation.lm_eval_tasks import utils

    docs = utils.load_pubmedqa()
    assert {k: len(v) for k, v in docs.items()} == {"train": 450, "validation": 50, "test": 500}
    for doc in docs["test"].select(range(20)):
        assert utils.pubmedqa_doc_to_text(doc) == preprocess_pubmedqa.doc_to_text(doc)
    if SHARED.exists():
        medqa = utils.load_medqa(medqa=str(SHARED / "medqa_usmle" / "us_4options_test.jsonl"))["test"]
        assert len(medqa) == 1273
        for doc in medqa.select(range(20)):
            assert utils.medqa_doc_to_text(doc) == preprocess_medqa.doc_to_text(doc)
        medmcqa = utils.load_medmcqa(medmcqa=str(SHARED / "medmcqa" / "dev_4183.jsonl"))["validation"]
        assert len(medmcqa) == 4183 and set(medmcqa["cop"]) == {0, 1, 2, 3}
        for doc in medmcqa.select(range(20)):
            assert utils.medmcqa_doc_to_text(doc) == utils_medmcqa.doc_to_text(doc)
    with pytest.raises(ValueError, match="--metadata='{\"medqa\": \"PATH\"}'"):
        utils.load_medqa()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")
def test_medical_suite_runs_end_to_end_with_limit(setup, monkeypatch):
    monkeypatch.chdir(REPO)  # pubmedqa_local reads the checkout's data/pubmedqa copy by default
    import lm_eval
    from lm_eval.tasks import TaskManager

    from biomedlm_jax.evaluation import harness

    ckpt, _ = setup
    metadata = {"medqa": str(SHARED / "medqa_usmle" / "us_4options_test.jsonl"),
                "medmcqa": str(SHARED / "medmcqa" / "dev_4183.jsonl"),
                "mmlu": str(SHARED / "mmlu_medical" / "final_release_hf_format")}
    out = lm_eval.simple_evaluate(model="biomedlm_jax", model_args=f"init_from=hf:{ckpt}", tasks=["medical_local"],
                                  batch_size=8, limit=4,
                                  task_manager=TaskManager(include_path=harness.TASKS_DIR, metadata=metadata))
    names = {"pubmedqa_local", "medqa_4options_local", "medmcqa_local", "mmlu_anatomy_local",
             "mmlu_professional_medicine_local"}
    assert names <= set(out["results"]) and "medical_local" in out["results"]
    for name in names:
        assert 0.0 <= out["results"][name]["acc,none"] <= 1.0
    # few-shot examples come from MMLU's dev split, as the built-in mmlu tasks take them
    shot = lm_eval.simple_evaluate(model="biomedlm_jax", model_args=f"init_from=hf:{ckpt}",
                                   tasks=["mmlu_medical_genetics_local"], batch_size=8, limit=2, num_fewshot=2,
                                   log_samples=True,
                                   task_manager=TaskManager(include_path=harness.TASKS_DIR, metadata=metadata))
    prompt = shot["samples"]["mmlu_medical_genetics_local"][0]["arguments"][0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about medical genetics.")
    assert prompt.count("\nAnswer:") == 3  # two solved dev questions, then the test question


@pytest.mark.slow
def test_sharded_mesh_gives_the_same_results(setup):
    """mesh_shape shards the weights (fsdp x tensor) for models that do not fit one device."""
    from lm_eval.api.instance import Instance

    from biomedlm_jax.evaluation import harness

    ckpt, _ = setup
    dp = harness.JaxLM(init_from=f"hf:{ckpt}", batch_size=4)
    sharded = harness.JaxLM(init_from=f"hf:{ckpt}", batch_size=4, mesh_shape="1,4,2")
    assert dict(sharded.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    kernel = sharded.params["h_0"]["mlp"]["c_fc"]["kernel"]
    assert len({d for d in kernel.sharding.device_set}) == 8 and kernel.addressable_shards[0].data.shape != kernel.shape
    ll = [Instance("loglikelihood", {}, (f"Aspirin dose number {n} is", " high"), n) for n in range(6)]
    np.testing.assert_allclose([x[0] for x in sharded.loglikelihood(ll, disable_tqdm=True)],
                               [x[0] for x in dp.loglikelihood(ll, disable_tqdm=True)], atol=1e-4)
    gen = [Instance("generate_until", {}, ("Question: what is aspirin?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8}), 0)]
    assert sharded.generate_until(gen, disable_tqdm=True) == dp.generate_until(gen, disable_tqdm=True)
