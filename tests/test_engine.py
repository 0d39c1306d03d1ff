"""The continuous-batching engine: the same tokens as `generate.generate` for each prompt alone,
whatever the slot count, refills, budgets, EOS, n-gram bans or stop strings; the JetStream-style API."""
import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from biomedlm_jax.inference import engine as E
from biomedlm_jax.inference import scheduler as S
from biomedlm_jax.inference import generate as G
from biomedlm_jax.inference import sampling
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config

V = 211


def tiny(scan=False, **kw):
    cfg = gpt_config.get_config("tiny", vocab_size=V, n_positions=96, scan_layers=scan, **kw)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(0))


def prompts_of(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V - 1, int(rng.integers(1, 40))).tolist() for _ in range(n)]


def alone(model, params, prompt, cfg, budget=None):
    cfg = cfg if budget is None else sampling.SamplingConfig(**{**cfg.__dict__, "max_new_tokens": budget})
    return G.generate(model, params, [prompt], jax.random.PRNGKey(0), cfg)[0]


@pytest.mark.parametrize("scan,ngram,layout", [(False, 0, "heads_major"), (True, 3, "heads_major"),
                                               (False, 3, "seq_major"), (True, 0, "seq_major")])
def test_greedy_outputs_equal_generate_alone_with_refills_budgets_and_eos(scan, ngram, layout):
    """Both KV cache layouts (seq_major is TPU's), plain and scanned layers."""
    model, params = tiny(scan, kv_cache_layout=layout)
    prompts = prompts_of(11)
    probe = sampling.SamplingConfig(max_new_tokens=20, temperature=0.0, no_repeat_ngram_size=ngram)
    eos = alone(model, params, prompts[0], probe)[5]  # a token greedy decoding does produce
    cfg = sampling.SamplingConfig(max_new_tokens=20, temperature=0.0, no_repeat_ngram_size=ngram, eos_id=eos, pad_id=0)
    budgets = [20, 3, 17, 1, 20, 9, 0, 14, 20, 2, 6]
    outs = E.generate_all(model, params, prompts, cfg, slots=3, steps_per_sync=4, bucket=16, max_new_tokens=budgets)
    for p, b, o in zip(prompts, budgets, outs):  # greedy is prefix-consistent: budget b = the first b of 20
        assert o == alone(model, params, p, cfg)[:b], (p, b)
    assert any(o and o[-1] == eos and len(o) < b for o, b in zip(outs, budgets))  # EOS ended some early


def test_sampled_outputs_do_not_depend_on_slot_count_or_neighbours():
    model, params = tiny()
    prompts = prompts_of(6, seed=1)
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20)
    keys = [jax.random.PRNGKey(100 + i) for i in range(len(prompts))]
    runs = []
    for slots in (1, 4):
        eng = E.Engine(model, params, cfg, slots=slots, max_prompt_len=40)
        runs.append(eng.run([E.Request(p, key=k) for p, k in zip(prompts, keys)]))
    assert runs[0] == runs[1]
    eng = E.Engine(model, params, cfg, slots=4, max_prompt_len=40)
    alone_first = eng.run([E.Request(prompts[0], key=keys[0])])[0]
    assert alone_first == runs[0][0]
    assert len({tuple(r) for r in runs[0]}) > 1  # and they are samples, not one repeated answer


def test_stop_strings_free_the_slot_and_keep_the_greedy_prefix():
    model, params = tiny()
    prompt = prompts_of(1, seed=2)[0]
    cfg = sampling.SamplingConfig(max_new_tokens=30, temperature=0.0)
    full = alone(model, params, prompt, cfg)
    detok = lambda ids: " ".join(f"t{t}" for t in ids)  # noqa: E731 - a stand-in tokenizer: one word per id
    stop = f"t{full[6]}"
    first_hit = next(i for i in range(len(full)) if stop in detok(full[: i + 1]))
    eng = E.Engine(model, params, cfg, slots=2, max_prompt_len=40, steps_per_sync=4, detokenize=detok)
    out = eng.run([E.Request(prompt, stop=(stop,)), E.Request(prompt)])
    assert out[1] == full
    # stops within the sync window after the stop string appears; what it kept is the greedy prefix
    assert first_hit < len(out[0]) <= first_hit + 4 and out[0] == full[: len(out[0])]
    with pytest.raises(ValueError, match="stop strings but the engine has no detokenize"):
        E.Engine(model, params, cfg, slots=1, max_prompt_len=40).run([E.Request(prompt, stop=("x",))])


def test_prefill_insert_generate_by_hand():
    """The engine API: prefill a batch, insert rows into chosen slots, step, free."""
    model, params = tiny()
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
    eng = E.Engine(model, params, cfg, slots=4, max_prompt_len=40, steps_per_sync=12)
    a, b = prompts_of(2, seed=3)
    state = eng.init_state()
    prefix = eng.prefill([a, b])
    assert prefix.lengths == (len(a), len(b)) and prefix.logits.shape == (2, V)
    state = eng.insert(prefix, state, slot=2, prompt=a, row=0)
    state = eng.insert(prefix, state, slot=0, prompt=b, row=1, max_new_tokens=5)
    state, toks, emitted, lp = eng.generate(state)
    assert lp == {}
    toks, emitted = np.asarray(toks), np.asarray(emitted)
    assert toks[emitted[:, 2], 2].tolist() == alone(model, params, a, cfg)
    assert toks[emitted[:, 0], 0].tolist() == alone(model, params, b, cfg, 5)
    assert not emitted[:, 1].any() and not emitted[:, 3].any()
    assert not np.asarray(state["active"]).any()
    with pytest.raises(ValueError, match="exceeds the engine's max_prompt_len=40"):
        eng.prefill([[1] * 41])
    with pytest.raises(ValueError, match="exceeds n_positions=96"):
        E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=60), max_prompt_len=40)


@pytest.mark.slow
def test_generate_input_writes_engine_completions_in_order(tmp_path):
    """generate --input: one completion per line in input order, equal to generate() on each prompt."""
    from conftest import REPO

    from biomedlm_jax.data import tokenizer as T
    from biomedlm_jax.formats import hf

    gpt2 = T.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))
    cfg = gpt_config.get_config("tiny", vocab_size=50257)
    model = M.GPT(cfg)
    params = M.init_params(model, jax.random.PRNGKey(2))
    hf.save_pretrained(model, params, str(tmp_path / "ckpt"), tokenizer=gpt2)
    texts = ["Metformin is", "The patient presented with a three-day history of fever, cough and", "BRCA1", "Aspirin"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    r = subprocess.run([sys.executable, "-m", "biomedlm_jax.generate", f"--init_from=hf:{tmp_path / 'ckpt'}",
                        f"--input={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'out.jsonl'}", "--batch_size=2",
                        "--max_new_tokens=9", "--temperature=0", "--quantize=none"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["n"] for row in rows] == [0, 1, 2, 3]
    scfg = sampling.SamplingConfig(max_new_tokens=9, temperature=0.0, eos_id=50256)
    for row, text in zip(rows, texts):
        want = alone(model, params, gpt2.encode(text).ids, scfg)
        assert row["completion"] == gpt2.decode([t for t in want if t != 50256])


def test_requests_arriving_at_random_compile_a_bounded_set_of_programs():
    """200 requests with random prompt lengths, budgets and sampling, admitted a few at a time as slots
    free (as a server admits them): at most buckets x (log2(slots)+1) prefills, one insert per bucket,
    one decode step and one free compile, counted from the jit caches."""
    model, params = tiny(d_model=32)  # a config no other test compiles, so every program here is new
    slots, bucket, max_len = 4, 16, 80
    cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0)
    eng = E.Engine(model, params, cfg, slots=slots, max_len=max_len, bucket=bucket, steps_per_sync=4)
    rng = np.random.default_rng(7)
    before = E.compiled_programs()
    sched, pending, done = S.Scheduler(eng), list(range(200)), {}
    reqs = {}
    for n in pending:
        budget = int(rng.integers(0, 13))
        reqs[n] = E.Request(rng.integers(0, V - 1, int(rng.integers(1, max_len - budget + 1))).tolist(), budget,
                            key=jax.random.key(n), temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.integers(0, 5)))
    while pending or sched.busy():
        take = min(len(pending), int(rng.integers(0, sched.free_slots() + 1)) or (0 if sched.busy() else 1))
        batch, pending = [(n, reqs[n]) for n in pending[:take]], pending[take:]
        updates = sched.admit(batch) + (sched.step() if sched.busy() else [])
        for u in updates:
            if u.done:
                done[u.handle] = u.output
        if rng.random() < 0.05 and sched.busy():  # a client goes away
            gone = next(o[0] for o in sched.owner if o is not None)
            assert sched.cancel(gone) and not sched.cancel(gone)
            done[gone] = None
    after = E.compiled_programs()
    grew = {k: after[k] - before[k] for k in after}
    buckets = -(-max_len // bucket)
    assert len(done) == 200
    assert all(o is None or len(o) == reqs[n].max_new_tokens for n, o in done.items() if reqs[n].temperature == 0)
    assert 1 < grew["prefill"] <= buckets * (slots.bit_length()) and 1 < grew["insert"] <= buckets, grew
    assert grew["generate"] == 1 and grew["free"] <= 1, grew


def test_the_ring_wraps_many_times_and_outputs_stay_greedy():
    """One slot, a 16-column cache: 8 requests in a row write 64 columns, four trips round the ring."""
    model, params = tiny()
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0)
    eng = E.Engine(model, params, cfg, slots=1, max_prompt_len=8, bucket=8, steps_per_sync=3)
    assert eng.cache_len == 16
    prompts = [p[:8] for p in prompts_of(8, seed=4)]
    sched, outs = S.Scheduler(eng), {}
    for n, p in enumerate(prompts):
        sched.admit([(n, E.Request(p))])
        while sched.busy():
            outs.update({u.handle: u.output for u in sched.step() if u.done})
    assert int(sched.state["t"]) >= 4 * eng.cache_len
    assert [outs[n] for n in range(8)] == [alone(model, params, p, cfg) for p in prompts]


def test_per_request_sampling_and_typed_keys_of_any_prng_implementation():
    """Requests in one run sample with their own settings: top_k=1 and a tiny top_p are greedy whatever
    the temperature, a greedy request is greedy beside sampled neighbours; rbg keys work as threefry's do."""
    model, params = tiny()
    prompts = prompts_of(4, seed=5)
    cfg = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0)
    greedy_cfg = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0)
    want = [alone(model, params, p, greedy_cfg) for p in prompts]
    runs = []
    for impl, slots in (("threefry2x32", 4), ("rbg", 4), ("rbg", 4)):
        eng = E.Engine(model, params, cfg, slots=slots, max_prompt_len=40, prng_impl=impl)
        reqs = [E.Request(prompts[0], temperature=0.0), E.Request(prompts[1], top_k=1, temperature=1.5),
                E.Request(prompts[2], top_p=1e-6), E.Request(prompts[3])]
        reqs = [dataclasses.replace(r, key=jax.random.key(10 + i, impl=impl)) for i, r in enumerate(reqs)]
        out = eng.run(reqs)
        assert out[:3] == want[:3], impl
        runs.append(out[3])
    assert runs[1] == runs[2]  # rbg samples repeat for the same requests (not across slot counts: see engine)
    assert runs[0] != want[3] or runs[1] != want[3]  # the untouched request samples
    eng = E.Engine(model, params, cfg, slots=1, max_prompt_len=40, prng_impl="rbg")
    with pytest.raises(ValueError, match="threefry2x32 key; this engine's slots hold rbg keys"):
        eng.run([E.Request(prompts[0], key=jax.random.key(0, impl="threefry2x32"))])


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token():
    model, params = tiny()
    prompt = prompts_of(1, seed=6)[0]
    cfg = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0)
    eng = E.Engine(model, params, cfg, slots=2, max_prompt_len=40, logprobs=3)
    sched = S.Scheduler(eng)
    sched.admit([(0, E.Request(prompt, logprobs=True))])
    toks, lps = [], []
    while sched.busy():
        for u in sched.step():
            toks += u.tokens
            lps += u.logprobs
    ids = jax.numpy.asarray([prompt + toks])
    ref = jax.nn.log_softmax(model.apply({"params": params}, ids).astype("float32"), axis=-1)[0]
    for i, (tok, (lp, top)) in enumerate(zip(toks, lps)):
        row = np.asarray(ref[len(prompt) - 1 + i])
        assert lp == pytest.approx(float(row[tok]), abs=1e-4)
        assert [t for t, _ in top] == np.argsort(-row)[:3].tolist() and top[0][0] == tok  # greedy: the top one
        assert [v for _, v in top] == pytest.approx(np.sort(row)[::-1][:3].tolist(), abs=1e-4)


@pytest.mark.parametrize("layout", ["heads_major", "seq_major"])
def test_on_a_mesh_the_state_stays_pinned_and_donation_holds(layout):
    """With a mesh, the decode state's slots live on the data axes through prefill, insert, generate and
    free (each program returns it with the shardings it was donated with, so XLA reuses its buffers:
    no 'donated buffers were not usable' warning), and greedy outputs do not change."""
    import warnings

    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    from biomedlm_jax.models import sharding

    model, params = tiny(kv_cache_layout=layout)
    cfg = sampling.SamplingConfig(max_new_tokens=10, temperature=0.0)
    prompts = prompts_of(5, seed=8)
    mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
    with pytest.raises(ValueError, match="slots=6 must be a multiple of the mesh's data ways \\(4\\)"):
        E.Engine(model, params, cfg, slots=6, max_prompt_len=40, mesh=mesh)
    # the weights sharded as the lm-eval backend and the trainer shard them (FSDP over embed, heads over tensor)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.ones((1, 8), "int32"))["params"])
        specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, sharding.DEFAULT_RULES)
    placed = jax.device_put(params, sharding.fit_shardings(sharding.values(boxed), specs))
    eng = E.Engine(model, placed, cfg, slots=4, max_prompt_len=40, steps_per_sync=3, mesh=mesh)
    sched = S.Scheduler(eng)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = {}
        pending = list(enumerate(prompts))
        while pending or sched.busy():
            take, pending = pending[: sched.free_slots()], pending[sched.free_slots():]
            sched.admit([(n, E.Request(p)) for n, p in take])
            outs.update({u.handle: u.output for u in sched.step() if u.done})
            for name in ("kv_mask", "active", "logits", "history", "keys", "temperature"):
                assert sched.state[name].sharding.spec == P(("data", "fsdp")), (name, sched.state[name].sharding)
            assert sched.state["t"].sharding.spec == P()
            rows = P(None, ("data", "fsdp")) if layout == "seq_major" else P(("data", "fsdp"))  # slot-major rows
            assert sched.state["cache"][0]["k"].sharding.spec == rows
        sched.admit([(99, E.Request(prompts[0]))])
        assert sched.cancel(99)  # free keeps it pinned too
        assert sched.state["active"].sharding.spec == P(("data", "fsdp"))
    assert not [w for w in caught if "donated" in str(w.message)], [str(w.message) for w in caught]
    assert [outs[n] for n in range(5)] == [alone(model, params, p, cfg) for p in prompts]


@pytest.mark.parametrize("scan,layout", [(False, "heads_major"), (True, "heads_major"), (True, "seq_major")])
def test_the_decode_loop_updates_the_donated_kv_cache_in_place(scan, layout):
    """The decode loop writes each step's keys/values into the donated cache: its temporaries stay a
    small fraction of the cache. With scan_layers the cache was the layer scan's per-layer input and
    output, and scan outputs are new buffers: the loop's temporaries were one more whole KV cache (1.2x
    here, the 5.4 GB of issue 42 on a v5e chip). Now a scanned layer reads its rows of the stacked
    cache and the new columns are written once after the scan: what remains is one layer's rows."""
    from biomedlm_jax.planning import programs, report

    cfg = gpt_config.get_config("tiny", vocab_size=V, n_positions=512, n_layer=32, d_model=64, n_head=4,
                                scan_layers=scan, dtype="float32", kv_cache_layout=layout)
    prog = programs.decode_program(cfg, jax.devices()[0], slots=8, max_prompt_len=448, max_new_tokens=64)
    mem = report.memory(prog.lowered.compile())
    kv = report.weight_bytes(prog.kv_cache)
    assert kv > 30e6 and mem["alias_bytes"] >= kv  # the cache is donated (its output aliases its input)
    assert mem["temp_bytes"] <= 0.1 * kv, (mem["temp_bytes"] / kv, mem)
