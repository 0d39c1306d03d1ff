"""The server in operation (issue 42): warm before the port opens (no request compiles anything), a
deadline per request, an engine that is rebuilt or restarted after a fault and says so on /health,
Prometheus metrics that add up, and chat completions through a seq2seq run's prompt template."""
import concurrent.futures
import json
import logging
import threading
import time

import httpx2 as httpx
import jax
import openai
import pytest
from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families

from biomedlm_jax.data import tokenizer as T
from biomedlm_jax.inference import engine as E
from biomedlm_jax.inference import sampling
from biomedlm_jax.models import gpt as M
from biomedlm_jax.models import gpt_config
from biomedlm_jax.serving import api, server
from biomedlm_jax.serving.batcher import Batcher
from biomedlm_jax.serving.chat import PromptTemplate

EOS = 50256


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(str(REPO / "data" / "gpt2_tokenizer"))


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = gpt_config.get_config("tiny", vocab_size=50257, n_positions=128)
    model = M.GPT(cfg)
    return model, M.init_params(model, jax.random.PRNGKey(3))


def engine(tiny_lm, tok, **kw):
    model, params = tiny_lm
    kw = dict(dict(slots=2, max_len=96, bucket=16, steps_per_sync=2, detokenize=tok.decode), **kw)
    return E.Engine(model, params, sampling.SamplingConfig(max_new_tokens=90, temperature=0.0, eos_id=EOS), **kw)


class Compiles:
    """Counts XLA backend compilations in this process while active."""

    def __init__(self):
        self.n, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event, duration, **kw):
        if self.on and event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


def metrics_of(url, **kw) -> dict:
    """{(name, labels as a sorted tuple): value} of /metrics."""
    text = httpx.get(url + "/metrics", timeout=10, **kw).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_warm_up_compiles_every_program_before_the_port_opens(tiny_lm, tok, caplog):
    """Every prompt bucket x prefill batch, each insert and both decode variants compile at start-up:
    the first ~100-token prompt asking for logprobs froze a concurrent stream for 4.4 s while it
    compiled (issue 42). Then no request compiles anything: prompts of every bucket, batches of
    prompts, logprobs, stop strings, seeds, streams."""
    model, params = tiny_lm
    counter = Compiles()
    with caplog.at_level(logging.INFO, logger="biomedlm_jax.serve"):
        srv = server.Server(model, params, tok, model_name="tiny", eos_id=EOS, slots=4, max_len=96, bucket=16,
                            steps_per_sync=2)
    # 6 buckets (16..96) x prefill batches 1, 2, 4 + 6 inserts + 2 decode variants + free
    assert srv.warm_up["programs"] == 6 * 3 + 6 + 2 + 1
    assert any("warm-up: 27 programs compiled in" in r.getMessage() for r in caplog.records)
    words = "the patient was given metformin for type two diabetes and improved " * 8
    with srv.serving() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        counter.on = True
        jobs = [dict(prompt=words[: n], max_tokens=4, temperature=0) for n in (5, 60, 150, 250, 330)]
        jobs += [dict(prompt=[words[:40], words[:200], "BRCA1"], max_tokens=3, logprobs=2, temperature=0.8, seed=7),
                 dict(prompt=words[:120], max_tokens=6, stop=["diabetes"], extra_body={"top_k": 5}, top_p=0.9, seed=1),
                 dict(prompt="Metformin", max_tokens=5, stream=True, logprobs=0)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for out in pool.map(lambda kw: client.completions.create(model="tiny", **kw), jobs):
                if not isinstance(out, openai.types.Completion):
                    list(out)
        counter.on = False
    srv.close()
    assert counter.n == 0, f"{counter.n} programs compiled while serving"


def test_a_request_past_its_deadline_is_cancelled_with_finish_reason_timeout(tiny_lm, tok, caplog):
    eng = engine(tiny_lm, tok)
    eng.warm_up()  # no compile inside the deadline
    fast = eng.generate
    eng.generate = lambda state, **kw: (time.sleep(0.05), fast(state, **kw))[1]
    batcher = Batcher(eng, max_queue=4).start()
    body = {"prompt": "Metformin is", "max_tokens": 80, "temperature": 0}
    with caplog.at_level(logging.INFO, logger="biomedlm_jax.serve"):
        with server.in_thread(api.create_app(batcher, tok, "tiny", EOS, request_timeout=0.6)) as url:
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json=body, timeout=30)
            took = time.perf_counter() - t0
            choice = r.json()["choices"][0]
            assert r.status_code == 200 and choice["finish_reason"] == "timeout", r.text
            assert 0 < r.json()["usage"]["completion_tokens"] < 80 and took < 5
            with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=30) as s:
                events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "timeout"
            deadline = time.time() + 10
            while (batcher.active or batcher.queued) and time.time() < deadline:
                time.sleep(0.05)
            assert batcher.active == 0 and batcher.queued == 0  # the slots were freed
            fams = metrics_of(url)
            assert fams[("biomedlm_completions_total", (("finish_reason", "timeout"),))] == 2
    batcher.close()
    assert sum("passed its deadline" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_decode_fault_fails_its_slots_and_the_engine_is_rebuilt_without_a_second_cache(tiny_lm, tok, monkeypatch):
    """A failure of the decode step fails the jobs in slots (500); the state is rebuilt once, the old
    one deleted before the new one is made; the next request is served. A loop that dies outright is
    restarted after restart_delay: /health says 503 meanwhile, ok after."""
    eng = engine(tiny_lm, tok)
    states, made = [], []
    real_init = eng.init_state

    def init_state():
        made.append(all(leaf.is_deleted() for st in states for leaf in jax.tree.leaves(st)))
        states.append(real_init())
        return states[-1]

    monkeypatch.setattr(eng, "init_state", init_state)
    fast, broken = eng.generate, threading.Event()

    def generate(state, **kw):
        time.sleep(0.01)
        if broken.is_set():
            broken.clear()
            raise RuntimeError("injected decode fault")
        return fast(state, **kw)

    monkeypatch.setattr(eng, "generate", generate)
    batcher = Batcher(eng, max_queue=4, restart_delay=1.5).start()
    body = {"prompt": "Metformin is", "max_tokens": 60, "temperature": 0}
    with server.in_thread(api.create_app(batcher, tok, "tiny", EOS)) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(2)]
            while batcher.active < 2:
                time.sleep(0.01)
            broken.set()
            rs = [f.result() for f in futures]
        assert [r.status_code for r in rs] == [500, 500] and "injected decode fault" in rs[0].text
        assert made == [True, True]  # the first state, then one rebuild after the old state was deleted
        r = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=4), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text

        def die(*a, **k):
            raise SystemExit("the engine loop dies")

        real_drain = batcher._drain
        monkeypatch.setattr(batcher, "_drain", die)
        batcher._inbox.put(None)
        deadline = time.time() + 10
        while not batcher.stats["engine_restarts"] and time.time() < deadline:
            time.sleep(0.02)
        h = httpx.get(url + "/health", timeout=10)
        assert h.status_code == 503 and h.json()["status"] == "engine_down", h.text
        monkeypatch.setattr(batcher, "_drain", real_drain)
        deadline = time.time() + 20
        while httpx.get(url + "/health", timeout=10).status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
        r = httpx.post(url + "/v1/completions", json=dict(body, max_tokens=4), timeout=60)
        assert r.status_code == 200, r.text
        assert metrics_of(url)[("biomedlm_engine_restarts", ())] >= 1
    batcher.close()


def test_health_says_stalled_when_work_waits_and_no_sync_finishes(tiny_lm, tok, monkeypatch):
    eng = engine(tiny_lm, tok)
    fast, hang = eng.generate, threading.Event()

    def generate(state, **kw):
        while hang.is_set():
            time.sleep(0.05)
        return fast(state, **kw)

    monkeypatch.setattr(eng, "generate", generate)
    batcher = Batcher(eng, max_queue=4, stall_timeout=0.5).start()
    with server.in_thread(api.create_app(batcher, tok, "tiny", EOS)) as url:
        h = httpx.get(url + "/health")
        assert h.status_code == 200, h.text
        hang.set()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            f = pool.submit(httpx.post, url + "/v1/completions", json={"prompt": "x", "max_tokens": 8}, timeout=60)
            time.sleep(1.5)
            h = httpx.get(url + "/health", timeout=10)
            assert h.status_code == 503 and h.json()["status"] == "engine_stalled", h.text
            hang.clear()
            assert f.result().status_code == 200
        assert httpx.get(url + "/health").status_code == 200
    batcher.close()


def test_metrics_add_up(tiny_lm, tok):
    eng = engine(tiny_lm, tok)
    batcher = Batcher(eng, max_queue=4).start()
    app = api.create_app(batcher, tok, "tiny", EOS, api_key="k")
    auth = {"Authorization": "Bearer k"}
    with server.in_thread(app) as url:
        assert httpx.get(url + "/metrics", timeout=10).status_code == 401  # behind the key like the API
        tokens = 0
        for n in (3, 5):
            r = httpx.post(url + "/v1/completions", json={"prompt": ["a", "b c"], "max_tokens": n}, headers=auth)
            tokens += r.json()["usage"]["completion_tokens"]
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": True,
                                                                  "stream_options": {"include_usage": True}},
                          headers=auth) as s:
            tokens += [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")][-1]["usage"]["completion_tokens"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "top_k": -1}, headers=auth).status_code == 400
        assert httpx.get(url + "/nope", headers=auth).status_code == 404
        m = metrics_of(url, headers=auth)
    batcher.close()
    assert m[("biomedlm_http_responses_total", (("status", "200"),))] == 3
    assert m[("biomedlm_http_responses_total", (("status", "400"),))] == 1
    assert m[("biomedlm_http_responses_total", (("status", "404"),))] == 1
    assert m[("biomedlm_http_responses_total", (("status", "401"),))] == 1
    assert m[("biomedlm_generation_tokens_total", ())] == tokens == 2 * 3 + 2 * 5 + 4
    assert m[("biomedlm_completions_total", (("finish_reason", "length"),))] == 5
    assert m[("biomedlm_queue_time_seconds_count", ())] == 5  # one per prompt
    assert m[("biomedlm_request_latency_seconds_count", ())] == 3
    assert m[("biomedlm_time_to_first_token_seconds_count", ())] == 3
    assert m[("biomedlm_slots_busy", ())] == 0 and m[("biomedlm_queue_depth", ())] == 0
    assert m[("biomedlm_slots_total", ())] == 2 and m[("biomedlm_engine_healthy", ())] == 1


def test_chat_completions_apply_the_runs_prompt_template(tiny_lm, tok):
    """A seq2seq run's meta carries its template; a chat turn is answered as the completion of the
    templated prompt, plain and streamed, in the chat shape. Anything but one user turn is a 400."""
    meta = {"config": {"data": {"task": "seq2seq", "format": "medquad", "layout": "",
                                "prompt_template": "Question: {question}\nAnswer:", "answer_prefix": " "}}}
    template = PromptTemplate.from_meta(meta)
    assert template == PromptTemplate("template", "Question: {question}\nAnswer:", " ")
    assert PromptTemplate.from_meta({"prompt_template": {"layout": "biomedlm", "template": "{question}",
                                                         "answer_prefix": ""}}).apply("q") == "q<|startoftext|>"
    assert PromptTemplate.from_meta({"config": {"data": {"task": "lm"}}}) is None
    batcher = Batcher(engine(tiny_lm, tok), max_queue=4).start()
    with server.in_thread(api.create_app(batcher, tok, "tiny", EOS, prompt_template=template)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        question = "What is metformin?"
        want = client.completions.create(model="tiny", prompt=template.apply(question), max_tokens=8, temperature=0)
        got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                             max_tokens=8, temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.choices[0].text
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 8
        parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                                    max_tokens=8, temperature=0, stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == want.choices[0].text
        with pytest.raises(openai.BadRequestError, match="exactly one message"):
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}])
    batcher.close()


def test_the_container_recipe_runs_the_server_with_flags_it_takes():
    """launch/serve/Dockerfile (no Docker engine here to build it): it installs the repository's own
    pins, and its entry point + default command are flags `serve` accepts."""
    from biomedlm_jax import serve

    text = (REPO / "launch" / "serve" / "Dockerfile").read_text()
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in text.splitlines() if ln[:1].isupper()}
    entry, cmd = json.loads(lines["ENTRYPOINT"]), json.loads(lines["CMD"])
    assert entry[:3] == ["python", "-m", "biomedlm_jax.serve"]
    args = serve.parser().parse_args(entry[3:] + cmd)
    assert (args.host, args.port, args.init_from) == ("0.0.0.0", 8000, "hf:/model")
    assert "EXPOSE 8000" in text and "pip install .;" in text and 'pip install ".[$EXTRAS]"' in text
    install = text.split("RUN ", 1)[1].split("USER", 1)[0]
    assert "torch" not in install and "==" not in install  # nothing but setup.py's pins


@pytest.mark.slow
def test_load_with_disconnects_and_bad_requests_keeps_answers_metrics_slots_and_memory(monkeypatch):
    """A bounded load (the benchmark's, smaller): `serve` in its own process, 12 clients for 12 s, 10%
    hanging up mid-stream and 5% sending bad requests. Every good answer equals offline greedy
    generation, bad ones get 4xx, /metrics adds up, nothing leaks, memory stays within 10%."""
    from biomedlm_jax.benchmarks.serve_load import bench_serve_load

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XLA_FLAGS", "")  # the server runs as a user runs it: one device
    [row] = bench_serve_load("tiny", clients=12, seconds=12, slots=4, max_new=16, questions=16,
                             medquad="data/medquad", tokenizer="data/gpt2_tokenizer")
    assert row["good_answered"] == row["good"] > 20 and row["disconnects"] and row["bad"], row
    assert row["wrong_text"] == 0 and row["bad_not_refused"] == 0 and row["metrics_add_up"], row
    assert row["leaked"] == {"active": 0, "queued": 0}, row
    assert abs(row["rss_growth"]) < 0.10, row
