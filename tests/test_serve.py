"""The OpenAI-compatible server: the official `openai` client gets the same greedy answers as offline
generation, plain and streamed; many concurrent clients share one engine; a client that goes away
frees its slot; a full queue answers 429; each class of bad input gets its 400 naming the field."""
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import jax
import numpy as np
import openai
import pytest
from conftest import REPO

from biomedlm_jax.benchmarks.serving import free_port
from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.inference import engine as E
from biomedlm_jax.inference import scheduler as S
from biomedlm_jax.inference import generate as G
from biomedlm_jax.inference import sampling
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config
from biomedlm_jax.serving import api, server
from biomedlm_jax.serving.batcher import Batcher, Job
from biomedlm_jax.serving.choice import Choice

EOS = 50256
TEXTS = ["Metformin is", "The patient presented with a three-day history of fever, cough and", "BRCA1",
         "Aspirin irreversibly inhibits", "In a randomized controlled trial of 120 adults with type 2 diabetes, "
         "the addition of"]


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = gpt_config.get_config("tiny", vocab_size=50257, n_positions=512)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def served(tiny_lm, tok):
    model, params = tiny_lm
    srv = server.Server(model, params, tok, model_name="tiny", eos_id=EOS, slots=4, bucket=16, steps_per_sync=2,
                        max_queue=64, max_tokens_limit=480, warmup=False)  # warm-up: test_serve_ops
    with srv.serving() as url:
        yield srv, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    srv.close()


def offline(tiny_lm, tok, text, n):
    model, params = tiny_lm
    cfg = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=EOS)
    ids = G.generate(model, params, [tok.encode(text).ids], jax.random.PRNGKey(0), cfg)[0]
    return tok.decode([t for t in ids if t != EOS])


def test_openai_client_plain_and_streamed_equal_offline_greedy_generation(served, tiny_lm, tok):
    srv, url, client = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    want = [offline(tiny_lm, tok, t, 12) for t in TEXTS]
    r = client.completions.create(model="tiny", prompt=TEXTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == want
    assert {c.finish_reason for c in r.choices} == {"length"}
    assert r.usage.completion_tokens == 12 * len(TEXTS)
    assert r.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in TEXTS)
    streamed = ["" for _ in TEXTS]
    finish = {}
    for chunk in client.completions.create(model="tiny", prompt=TEXTS, max_tokens=12, temperature=0, stream=True):
        c = chunk.choices[0]
        streamed[c.index] += c.text
        if c.finish_reason:
            finish[c.index] = c.finish_reason
    assert streamed == want and finish == {i: "length" for i in range(len(TEXTS))}
    # token ids as the prompt, and logprobs: the top alternatives start with the (greedy) chosen token
    ids = tok.encode(TEXTS[0]).ids
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want[0][: len(r.choices[0].text)] and len(lp.tokens) == 4
    assert all(len(top) <= 2 and max(top, key=top.get) == t for top, t in zip(lp.top_logprobs, lp.tokens))
    assert lp.token_logprobs == pytest.approx([max(top.values()) for top in lp.top_logprobs])


def test_stop_strings_cut_the_text_and_seeds_repeat_samples(served, tiny_lm, tok):
    srv, url, client = served
    full = offline(tiny_lm, tok, TEXTS[1], 24)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt=TEXTS[1], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny", prompt=TEXTS[1], max_tokens=24, temperature=0, stop=stop, stream=True))
    assert streamed == cut
    kw = dict(model="tiny", prompt=TEXTS[0], max_tokens=10, temperature=1.0, extra_body={"top_k": 50})
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (8, 9, 10)}
    assert a == b and others - {a}


def test_32_concurrent_clients_with_mixed_lengths_get_their_own_greedy_answers(served, tiny_lm, tok):
    srv, url, client = served
    rng = np.random.default_rng(0)
    jobs = [(TEXTS[i % len(TEXTS)] + " " * int(rng.integers(0, 3)), int(rng.integers(1, 40))) for i in range(32)]
    alone = {}
    for text, n in jobs:  # the same requests one at a time
        alone[(text, n)] = client.completions.create(model="tiny", prompt=text, max_tokens=n, temperature=0).choices[0].text

    def call(job):
        text, n = job
        if n % 2:
            return "".join(ch.choices[0].text for ch in client.completions.create(
                model="tiny", prompt=text, max_tokens=n, temperature=0, stream=True))
        return client.completions.create(model="tiny", prompt=text, max_tokens=n, temperature=0).choices[0].text

    before = dict(httpx.get(url + "/health").json())
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(call, jobs))
    assert outs == [alone[j] for j in jobs]
    health = httpx.get(url + "/health").json()
    assert health["admitted"] - before["admitted"] == 32 and health["active"] == 0 and health["queued"] == 0


def test_a_client_that_disconnects_frees_its_slot(served, tok, monkeypatch):
    srv, url, client = served
    fast = srv.engine.generate  # a slower model: 480 tokens take 2.4 s, not 0.2 s

    def slow(state, **kw):
        time.sleep(0.01)
        return fast(state, **kw)

    monkeypatch.setattr(srv.engine, "generate", slow)
    before = httpx.get(url + "/health").json().get("cancelled", 0)
    body = {"model": "tiny", "prompt": "Metformin is", "max_tokens": 480, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=30) as r:
        next(r.iter_lines())  # the first chunk: the request holds a slot
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(url + "/v1/completions", json=body, timeout=0.3)
    deadline = time.time() + 20
    while time.time() < deadline:
        h = httpx.get(url + "/health").json()
        if h["active"] == 0 and h.get("cancelled", 0) - before == 2:
            break
        time.sleep(0.05)
    assert h["active"] == 0 and h.get("cancelled", 0) - before == 2, h


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"prompt": "x", "temprature": 0.5}, 400, "temprature"),
    ({"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 481}, 400, "max_tokens"),
    ({"prompt": "word " * 600}, 400, "prompt"),
    ({"prompt": "word " * 500, "max_tokens": 16}, 400, "prompt"),
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "stop": ["a", ""]}, 400, "stop"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "top_k": 2**31}, 400, "top_k"),  # was a 500 that failed every request in flight (issue 42)
    ({"prompt": "x", "top_k": 50258}, 400, "top_k"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed"),  # was a plain-text 500
    ({"prompt": ["x"] * 65}, 400, "prompt"),  # more prompts than the queue (64) can ever hold: was a 429
])
def test_bad_requests_get_openai_errors_naming_the_field(served, body, status, param):
    srv, url, client = served
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


def test_a_full_queue_answers_429_with_retry_after(tiny_lm, tok):
    model, params = tiny_lm
    eng = E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_id=EOS), slots=1,
                   max_len=64, bucket=16, detokenize=tok.decode)
    batcher = Batcher(eng, max_queue=1)  # not started yet: whatever is submitted waits
    app = api.create_app(batcher, tok, "tiny", EOS)
    with server.in_thread(app) as url:
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": "BRCA1", "max_tokens": 4, "temperature": 0}, timeout=60)))
        t.start()
        while batcher.queued == 0:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["code"] == "queue_full"
        batcher.start()  # the waiting request is served once the engine runs
        t.join(60)
        assert first["r"].status_code == 200 and first["r"].json()["choices"][0]["finish_reason"] == "length"
    batcher.close()


@pytest.mark.slow
def test_serve_command_answers_the_openai_client_and_exits_0_on_sigterm(tmp_path, tiny_lm, tok):
    """`python -m biomedlm_jax.serve --init_from=hf:DIR` as a user starts it."""
    from biomedlm_jax.formats import hf

    model, params = tiny_lm
    hf.save_pretrained(model, params, str(tmp_path / "ckpt"), tokenizer=tok)
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "biomedlm_jax.serve", f"--init_from=hf:{tmp_path / 'ckpt'}",
                             f"--port={port}", "--slots=2", "--max_len=256", "--bucket=16"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="ckpt", prompt=TEXTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == offline(tiny_lm, tok, TEXTS[0], 8)
        text = "".join(ch.choices[0].text for ch in client.completions.create(
            model="ckpt", prompt=TEXTS[0], max_tokens=8, temperature=0, stream=True))
        assert text == r.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)  # as a process manager stops it
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if " completion cmpl-" in line]
    assert len(lines) == 2 and all("completion_tokens=8" in line and "ttft_ms=" in line for line in lines), out[-3000:]


@pytest.mark.slow
def test_a_server_on_a_mesh_shards_weights_and_slots_and_answers_as_one_device(tmp_path, tiny_lm, tok):
    """`serve --mesh_shape=2,2,2` on this process's 8 devices: weights sharded by the trainer's rules,
    decode slots split over data x fsdp, the same greedy answers as offline generation on one device."""
    from biomedlm_jax.formats import hf

    model, params = tiny_lm
    hf.save_pretrained(model, params, str(tmp_path / "ckpt"), tokenizer=tok)
    with pytest.raises(ValueError, match=r"--slots=6 must be a multiple of the mesh's data x fsdp ways \(4"):
        server.build(f"hf:{tmp_path / 'ckpt'}", mesh_shape="2,2,2", slots=6, warmup=False)
    srv = server.build(f"hf:{tmp_path / 'ckpt'}", mesh_shape="2,2,2", slots=4, max_len=256, bucket=16,
                       steps_per_sync=2, model_name="tiny")
    try:
        kernels = [x for x in jax.tree.leaves(srv.engine.params) if x.ndim == 2]
        assert all(len(x.sharding.device_set) == 8 for x in kernels)
        assert any(x.addressable_shards[0].data.shape != x.shape for x in kernels)  # split, not replicated
        with srv.serving() as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            r = client.completions.create(model="tiny", prompt=TEXTS, max_tokens=6, temperature=0)
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [offline(tiny_lm, tok, t, 6) for t in TEXTS]
    finally:
        srv.close()


def test_a_bad_request_among_live_streams_fails_alone(served, tiny_lm, tok):
    """Issue 42: a top_k past int32 among 4 live streams got a 500 and every stream died with it."""
    srv, url, client = served
    texts = TEXTS[:4]
    want = [offline(tiny_lm, tok, t, 48) for t in texts]

    def stream(text):
        out = client.completions.create(model="tiny", prompt=text, max_tokens=48, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in out)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, t) for t in texts]
        while httpx.get(url + "/health").json()["active"] == 0:
            time.sleep(0.01)
        bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "top_k": 2147483648}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k", bad.text
        assert [f.result(timeout=120) for f in futures] == want


def test_every_route_answers_in_openai_error_shape(served):
    srv, url, client = served
    for method, path, status, says in (("POST", "/v1/chat/completions", 404, "POST /v1/completions"),
                                       ("GET", "/v1/nothing", 404, "no such route"),
                                       ("GET", "/v1/completions", 405, "no such route")):
        r = httpx.request(method, url + path, json={"messages": []}, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert says in err["message"] and err["type"] == "invalid_request_error", err
    with pytest.raises(openai.NotFoundError, match="/v1/completions"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_a_huge_body_is_refused_without_stalling_the_server(served):
    """An 8 MB prompt took 11 s to get its 400 and froze /health meanwhile (issue 42). Now it is refused
    by its size before it is read (--max_body_bytes, by default what the largest acceptable request needs:
    320 KiB here), a chunked one as its bytes arrive,
    and a text too long to fit the context before it is tokenized. The bound on /health's latency here
    is loose on purpose (a loaded CI box); the figure is printed."""
    srv, url, client = served
    latencies, done = [], threading.Event()

    def probe():
        while not done.is_set():
            t0 = time.perf_counter()
            assert httpx.get(url + "/health", timeout=30).status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.005)

    t = threading.Thread(target=probe)
    t.start()
    try:
        big = {"prompt": "word " * ((8 << 20) // 5), "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=big, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text[:300]

        def chunks():
            for _ in range(64):
                yield b" " * (64 << 10)

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large", r.text[:300]
        long_text = {"prompt": "x" * 200_000, "max_tokens": 4}  # under the body limit, too long for 512 tokens
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=long_text, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        refused_in = time.perf_counter() - t0
    finally:
        done.set()
        t.join(30)
    print(f"/health p100 latency while refusing: {1e3 * max(latencies):.1f} ms over {len(latencies)} probes; "
          f"a 200 kB text refused in {1e3 * refused_in:.1f} ms")
    assert latencies and max(latencies) < 2.0, max(latencies)


def test_queued_clients_that_leave_free_their_places(tiny_lm, tok):
    """Clients that disconnected while queued held their places (queued: 2 after both left; issue 42)."""
    model, params = tiny_lm
    eng = E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_id=EOS), slots=1,
                   max_len=64, bucket=16, detokenize=tok.decode)
    batcher = Batcher(eng, max_queue=4)  # not started: whatever is submitted waits
    with server.in_thread(api.create_app(batcher, tok, "tiny", EOS)) as url:
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", json={"prompt": "BRCA1", "max_tokens": 4}, timeout=0.5)
        deadline = time.time() + 10
        while batcher.queued and time.time() < deadline:
            time.sleep(0.05)
        assert batcher.queued == 0 and batcher.stats["cancelled"] == 2, (batcher.queued, batcher.stats)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread it kills
def test_engine_faults_fail_their_jobs_and_a_dead_engine_is_reported(tiny_lm, tok, monkeypatch):
    """A fault injected in engine.free (reached when a client leaves) killed the engine thread, /health
    kept saying ok and the next request hung (issue 42). Now the fault fails the jobs in flight and the
    next request is served."""
    model, params = tiny_lm
    eng = E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=200, temperature=0.0, eos_id=EOS), slots=2,
                   max_len=256, bucket=16, steps_per_sync=2, detokenize=tok.decode)
    batcher = Batcher(eng, max_queue=4).start()
    fast, calls = eng.generate, []

    def slow(state, **kw):
        time.sleep(0.01)
        return fast(state, **kw)

    def broken_free(state, slot):
        calls.append(slot)
        raise RuntimeError("injected fault in free")

    monkeypatch.setattr(eng, "generate", slow)
    monkeypatch.setattr(eng, "free", broken_free)
    body = {"prompt": "Metformin is", "max_tokens": 200, "temperature": 0}
    with server.in_thread(api.create_app(batcher, tok, "tiny", EOS)) as url:
        with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=30) as r:
            next(r.iter_lines())  # holds a slot; leaving cancels it: engine.free fails
        deadline = time.time() + 20
        while not calls and time.time() < deadline:
            time.sleep(0.05)
        assert calls and batcher.alive
        monkeypatch.setattr(eng, "free", E.Engine.free.__get__(eng))
        r = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=8), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
        assert httpx.get(url + "/health").status_code == 200
    batcher.close()
    # a loop that dies outright is restarted (test_serve_ops: 503 while down, ok after, served again)


def test_api_key_request_ids_access_log_cors_and_tokenize(tiny_lm, tok, caplog):
    """Operations (issue 42): --api_key (401 in OpenAI's shape without it; /health stays open), an
    X-Request-Id on every response (the client's, or a new one), one access-log line per response
    whatever its status, CORS for the configured origins, and /tokenize + /detokenize."""
    model, params = tiny_lm
    eng = E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_id=EOS), slots=1,
                   max_len=64, bucket=16, detokenize=tok.decode)
    batcher = Batcher(eng, max_queue=4).start()
    app = api.create_app(batcher, tok, "tiny", EOS, api_key="s3cret", cors_origins=["https://notebook.example"])
    key = {"Authorization": "Bearer s3cret"}
    caplog.set_level("INFO", logger="biomedlm_jax.serve")
    with server.in_thread(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="tiny", prompt="BRCA1", max_tokens=3, temperature=0).choices[0].text
        assert httpx.get(url + "/health").status_code == 200  # load balancers need no key

        r = httpx.get(url + "/v1/models", headers=dict(key, **{"X-Request-Id": "trace-42.a"}))
        assert r.headers["x-request-id"] == "trace-42.a"
        made = httpx.get(url + "/v1/models", headers=dict(key, **{"X-Request-Id": "bad id; forged=1"}))
        assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"].isalnum()
        assert httpx.get(url + "/nope", headers=key).headers["x-request-id"]

        text = "Metformin (500 mg) lowers HbA1c; β-blockers too.<|endoftext|>"
        r = httpx.post(url + "/tokenize", json={"prompt": text}, headers=key)
        assert r.json() == {"tokens": tok.encode(text).ids, "count": len(tok.encode(text).ids), "max_model_len": 64}
        r = httpx.post(url + "/detokenize", json={"tokens": tok.encode(text).ids}, headers=key)
        assert r.json() == {"prompt": text}
        r = httpx.post(url + "/detokenize", json={"tokens": [1, 60000]}, headers=key)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"

        pre = httpx.options(url + "/v1/completions", headers={"Origin": "https://notebook.example",
                                                              "Access-Control-Request-Method": "POST",
                                                              "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://notebook.example"
        other = httpx.options(url + "/v1/completions", headers={"Origin": "https://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    batcher.close()
    access = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    for status, path in ((401, "/v1/completions"), (200, "/v1/completions"), (200, "/health"), (404, "/nope"),
                         (200, "/tokenize"), (400, "/detokenize"), (200, "/v1/models")):
        assert any(f" {path} {status} " in line for line in access), (status, path, access)
    assert any("request_id=trace-42.a" in line for line in access)
    assert not any("forged" in line for line in access)


def test_text_offsets_are_exact_when_a_character_spans_tokens(tok):
    """logprobs' text_offset: where each token's text starts in the completion. Characters of several
    UTF-8 bytes (🧬, β, °, →) are split over byte-level tokens; counting each token's own decoded length
    drifted by the U+FFFD placeholders (issue 42). Reference: the complete characters in the bytes
    before each token (a byte-level token's vocabulary entry has one character per byte)."""
    text = "β-lactamase at 37 °C 🧬🧬 and IL-6→STAT3."
    ids = tok.encode(text).ids
    data, want, n_bytes = text.encode("utf-8"), [], 0
    for t in ids:
        want.append(len(data[:n_bytes].decode("utf-8", errors="ignore")))
        n_bytes += len(tok.id_to_token(t))
    assert n_bytes == len(data)
    choice = Choice(0, tok, EOS, (), logprobs=1)
    for k in range(0, len(ids), 3):  # updates of three tokens, as the engine hands them over
        part = ids[k: k + 3]
        choice.add(S.Update(0, part, [(-0.1, [(t, -0.1)]) for t in part]))
    got = choice.logprobs_json()
    assert choice.text == text and any("\ufffd" in t for t in got["tokens"])  # some tokens are partial characters
    assert got["text_offset"] == want
    assert choice.logprobs_json(start=5)["text_offset"] == want[5:]  # a streamed chunk's offsets are absolute


def test_a_job_whose_admission_fails_fails_alone(tiny_lm, tok, monkeypatch):
    """Admission is per job (issue 42): an insert that fails for one prompt of a batch fails that job;
    the jobs admitted with it and the job already decoding finish with their greedy tokens."""
    model, params = tiny_lm
    cfg = sampling.SamplingConfig(max_new_tokens=40, temperature=0.0, eos_id=None)
    eng = E.Engine(model, params, cfg, slots=4, max_len=64, bucket=16, detokenize=tok.decode)
    real_insert = eng.insert

    def insert(prefix, state, slot, prompt, *a, **k):
        if 999 in prompt:
            raise RuntimeError("injected insert fault")
        return real_insert(prefix, state, slot, prompt, *a, **k)

    monkeypatch.setattr(eng, "insert", insert)
    batcher = Batcher(eng, max_queue=8)
    results: dict = {}

    def sink_for(name):
        def sink(item):
            if isinstance(item, Exception):
                results[name] = item
            elif item.done:
                results[name] = item.output
        return sink

    prompts = {"long": [5, 6, 7], "a": [11, 12], "bad": [999, 3], "b": [21, 22, 23, 24]}
    jobs = {n: Job(E.Request(p, 24 if n != "long" else 40), sink_for(n)) for n, p in prompts.items()}
    batcher.start()
    batcher.submit([jobs["long"]])
    deadline = time.time() + 60
    while batcher.active == 0 and time.time() < deadline:  # "long" is decoding
        time.sleep(0.01)
    batcher.submit([jobs["a"], jobs["bad"], jobs["b"]])  # admitted together, one of them faulty
    while len(results) < 4 and time.time() < deadline:
        time.sleep(0.02)
    batcher.close()
    assert isinstance(results.get("bad"), RuntimeError), results
    for name in ("long", "a", "b"):
        want = G.generate(model, params, [prompts[name]], jax.random.PRNGKey(0),
                          sampling.SamplingConfig(max_new_tokens=jobs[name].request.max_new_tokens, temperature=0.0))[0]
        assert results[name] == want, name
    assert batcher.stats["failed"] == 1
