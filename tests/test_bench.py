"""The benchmark CLI prints one JSON line per measurement with the documented keys."""
import json
import subprocess
import sys

import pytest

REQUIRED = {"kind", "impl", "model", "batch", "seq", "tokens_per_s"}  # the keys every row has, for collection


def bench_rows(*args, timeout=300) -> list[dict]:
    """The JSON rows `python -m biomedlm_jax.bench ARGS` prints (it must exit 0)."""
    from conftest import REPO

    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.bench", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


def test_pipeline_benchmark_prints_a_json_row():
    row = bench_rows("pipeline", "--seq=64", "--batch=4", "--steps=20", timeout=120)[-1]
    assert REQUIRED <= set(row)
    assert (row["kind"], row["impl"], row["batch"], row["seq"]) == ("pipeline", "numpy", 4, 64)
    assert row["tokens_per_s"] > 0


def test_pipeline_benchmark_does_not_import_tensorflow():
    code = ("import sys; import biomedlm_jax.bench, biomedlm_jax.training.trainer, biomedlm_jax.data.input_pipeline; "
            "from biomedlm_jax.benchmarks import speed; speed.bench_pipeline(32, 2, 3); "
            "assert 'tensorflow' not in sys.modules, 'TF imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_generate_benchmark_rows_with_peer():
    rows = bench_rows("generate", "--model=tiny", "--batch=2", "--prompt=8", "--new=8", "--peer")
    assert [row["impl"] for row in rows] == ["ours", "hf-torch"]
    assert all(REQUIRED <= set(row) and row["kind"] == "generate" and row["tokens_per_s"] > 0 for row in rows)
    assert rows[0]["seq"] == 16 and rows[0]["model"] == "tiny"
    assert rows[0]["speedup_vs_hf"] > 0


@pytest.mark.slow
def test_train_benchmark_rows_with_peer():
    rows = bench_rows("train", "--model=tiny", "--batch=2", "--seq=16", "--steps=2", "--peer", "--peak_flops=1e11")
    assert [row["impl"] for row in rows] == ["ours", "hf-torch"]
    ours = rows[0]
    assert all(REQUIRED <= set(row) for row in rows)
    assert ours["kind"] == "train" and ours["tokens_per_s"] > 0 and ours["compile_s"] > 0 and ours["step_ms"] > 0
    assert 0 < ours["mfu"] and ours["flops_per_token"] > 0 and ours["speedup_vs_hf"] > 0 and ours["temp_bytes"] > 0


@pytest.mark.slow
def test_train_benchmark_loss_chunk_reports_less_scratch_memory():
    """--loss_chunk trades the (batch, seq, vocab) logits for one chunk's: XLA's buffer assignment shrinks."""
    rows = {}
    for chunk in (0, 4):
        rows[chunk] = bench_rows("train", "--model=tiny", "--batch=4", "--seq=32", "--steps=1", f"--loss_chunk={chunk}",
                                 "--vocab=1000")[0]
    assert rows[4]["loss_chunk"] == 4 and rows[4]["temp_bytes"] < rows[0]["temp_bytes"]
    assert rows[0]["vocab"] == rows[4]["vocab"] == 1000  # --vocab overrides the variant's
    assert abs(rows[4]["loss"] - rows[0]["loss"]) < 1e-4


def test_tokenize_benchmark_row(tmp_path):
    from conftest import REPO

    src = REPO / "data" / "pubmed_abstracts" / "abstracts.jsonl"
    small = tmp_path / "a.jsonl"
    small.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:50]), encoding="utf-8")
    row = bench_rows("tokenize", f"--input={small}", "--seq=128", timeout=120)[-1]
    assert REQUIRED <= set(row) and row["kind"] == "tokenize" and row["documents"] == 50
    assert row["tokens"] > 0 and row["tokens_per_s"] > 0


@pytest.mark.slow
def test_memory_report_for_the_tiny_model_full_and_lora():
    """The real train step compiled for abstract inputs: LoRA (bf16 frozen base, moments only for the
    adapters, head and new embedding rows) needs fewer argument bytes than full fine-tuning."""
    rows = {}
    for rank in (0, 4):
        rows[rank] = bench_rows("memory", "--model=tiny", "--task=medqa", "--seq=32", "--batch=2", f"--lora_rank={rank}",
                                "--no_scan")[-1]
    full, lo = rows[0], rows[4]
    for row in rows.values():
        assert REQUIRED <= set(row) and row["kind"] == "memory" and row["options"] == 4 and row["task"] == "medqa"
        assert row["peak_bytes"] == row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"] > 0
    assert full["trainable_params"] == full["total_params"] and lo["trainable_params"] < lo["total_params"]
    assert lo["total_params"] > full["total_params"]  # + adapters
    assert lo["argument_bytes"] < full["argument_bytes"]


@pytest.mark.slow
def test_matrix_generate_rows_carry_the_decode_roofline_and_goals(tmp_path):
    """`bench matrix` rows: ours and the HF peer per row, appended to OUT/bench.jsonl; decode rows say
    the bytes one step must read and, given a bandwidth, the roofline and the fraction of it reached."""
    rows = bench_rows("matrix", f"--out={tmp_path}", "--scale=small", "--only=generate", "--bandwidth=2e10")
    assert rows == [json.loads(l) for l in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(row["name"], row["impl"]) for row in rows] == [
        ("generate-tiny-b1", "ours"), ("generate-tiny-b1", "hf-torch"),
        ("generate-tiny-b4", "ours"), ("generate-tiny-b4", "hf-torch")]
    for ours in rows[0], rows[2]:
        assert REQUIRED <= set(ours) and set(ours["goal"]) == {"speedup_vs_hf"}
        assert ours["goal_met"] is (ours["speedup_vs_hf"] >= ours["goal"]["speedup_vs_hf"])
        assert ours["bytes_per_step"] == ours["weight_bytes"] + ours["kv_bytes_per_step"]
        assert ours["roofline_tokens_per_s"] == ours["batch"] * 2e10 / ours["bytes_per_step"]
        assert 0 < ours["roofline_fraction"] == ours["tokens_per_s"] / ours["roofline_tokens_per_s"]
    # tiny (fp32): wte 50257 x 64 + the layers' weights; the position table is not read per step
    assert 13_000_000 < rows[0]["weight_bytes"] < 13_400_000
    assert rows[2]["kv_bytes_per_step"] == 4 * rows[0]["kv_bytes_per_step"]  # batch 4 reads 4 caches


def test_goal_check_needs_every_bound_and_a_measured_value():
    from biomedlm_jax.benchmarks import matrix

    goal = {"tokens_per_s": 550, "roofline_fraction": 0.6}
    assert matrix.goal_met({"tokens_per_s": 600, "roofline_fraction": 0.61}, goal) is True
    assert matrix.goal_met({"tokens_per_s": 600, "roofline_fraction": 0.59}, goal) is False  # one bound missed
    assert matrix.goal_met({"tokens_per_s": 549.9, "roofline_fraction": 0.9}, goal) is False
    assert matrix.goal_met({"tokens_per_s": 600}, goal) is None  # not measured: unknown, not met
    assert matrix.goal_met({"tokens_per_s": 600, "roofline_fraction": None}, goal) is None


def test_decode_roofline_counts_weights_once_and_the_filled_cache():
    import jax

    from biomedlm_jax.benchmarks import speed
    from biomedlm_jax.models import gpt_config

    cfg = gpt_config.get_config("tiny", dtype="bfloat16")
    params = {"wte": {"embedding": jax.ShapeDtypeStruct((10, 64), "bfloat16")},
              "wpe": {"embedding": jax.ShapeDtypeStruct((128, 64), "bfloat16")}}
    roof = speed.decode_roofline(params, cfg, batch=2, prompt=4, new=3, bandwidth=1e9)
    assert roof["weight_bytes"] == 10 * 64 * 2  # wpe left out
    assert roof["kv_bytes_per_step"] == 2 * cfg.n_layer * 2 * (4 + 2) * 64 * 2  # K and V, 6 slots on average
    assert roof["roofline_tokens_per_s"] == 2 * 1e9 / roof["bytes_per_step"]
    assert "roofline_tokens_per_s" not in speed.decode_roofline(params, cfg, 2, 4, 3, None)


def test_bandwidth_table_tells_the_h100_pcie_from_the_sxm():
    from types import SimpleNamespace

    from biomedlm_jax.training import metrics

    kind = lambda k: SimpleNamespace(device_kind=k)  # noqa: E731
    assert metrics.peak_bandwidth_per_device(kind("NVIDIA H100 PCIe")) == 2.0e12
    assert metrics.peak_bandwidth_per_device(kind("NVIDIA H100 80GB HBM3")) == 3.35e12
    assert metrics.peak_bandwidth_per_device(kind("NVIDIA H200")) == 4.8e12
    assert metrics.peak_bandwidth_per_device(kind("cpu")) is None
    assert metrics.peak_flops_per_device(kind("NVIDIA H200")) == 989e12


@pytest.mark.slow
def test_matrix_engine_and_int8_rows_at_small_scale(tmp_path):
    """The GPU matrix's continuous-batching and int8 rows, at tiny shapes on CPU: the engine row says
    its outputs equal static batching's and its speed-ups; the int8 row its bytes per step."""
    rows = bench_rows("matrix", f"--out={tmp_path}", "--scale=small", "--only=engine,decode", "--bandwidth=2e10")
    assert [(row["name"], row["impl"]) for row in rows] == [
        ("engine-tiny-s4", "ours-engine"), ("engine-tiny-s4", "ours-static"), ("engine-tiny-s4", "hf-static"),
        ("decode-tiny-b1-int8", "ours-fp32"), ("decode-tiny-b1-int8", "ours-int8")]
    engine, fp32, int8 = rows[0], rows[3], rows[4]
    assert engine["identical_to_static"] is True and engine["speedup_vs_static"] > 0 and engine["speedup_vs_hf"] > 0
    assert engine["goal_met"] is (engine["speedup_vs_static"] >= 0.0)
    assert 0 < engine["useful_tokens"] <= rows[1]["slot_steps"]  # static batches pay for idle rows
    # int8 kernels and head: a quarter of the fp32 bytes, plus the scales and the float biases/norms
    assert int8["weight_bytes"] < 0.3 * fp32["weight_bytes"] and int8["tokens_per_s"] > 0
    assert int8["roofline_fraction"] == int8["tokens_per_s"] / int8["roofline_tokens_per_s"]
