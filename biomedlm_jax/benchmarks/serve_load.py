"""The server under a bounded, local load with misbehaving clients (issue 42's acceptance run).

    python -m biomedlm_jax.bench_inference serve-load --model=bench-cpu --clients=64 --seconds=60 [--llama_cpp]

`python -m biomedlm_jax.serve` runs as a user starts it, in its own process, on a random-init model
saved as an HF checkpoint. `clients` threads send requests back to back for `seconds`: MedQuAD
questions, greedy, half of them streamed. Of the requests, `disconnect` (default 10%) are streams
whose client hangs up after the first chunk, and `bad` (5%) are invalid (an out-of-range top_k, an
unknown field, another model's name). Checked at the end, each a field of the row:

  * every good request answered 200 with the text offline greedy generation gives its prompt
    (`engine.generate_all` in this process, on the same weights): `wrong_text` counts the others;
  * every bad request got a 400/404 in OpenAI's error shape (`bad_not_refused`);
  * /metrics adds up: responses per status equal what the clients saw, plus the benchmark's own
    GETs (`metrics_add_up`); choices that ended by stop or length equal the good prompts
    answered, the ones cancelled equal the disconnects;
  * nothing leaks: once the clients stop, no slot is busy and no queue place is held (`leaked`);
  * memory: the server's resident memory at the end is within 10% of its memory right after the
    warm-up (`rss_after_warmup_mb`, `rss_end_mb`, `rss_growth`).

Rows: requests/s, completion tokens/s, p50/p99 time to first token and latency of the good requests.
With `llama_cpp`, llama-cpp-python's OpenAI server gets the same clients and duration with good
requests only (it queues requests one at a time) on the same weights exported to GGUF.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import sys
import tempfile
import threading
import time

import numpy as np

from biomedlm_jax.benchmarks.serving import llama_argv, running, serve_argv

BAD_BODIES = ({"top_k": -1}, {"unknown_field": 1}, {"model": "another-model"}, {"max_tokens": -3})


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _request(url: str, prompt: str, budget: int, kind: str, stream: bool, model: str) -> dict:
    """One request of `kind` (good, disconnect, bad): what the client saw."""
    import httpx2 as httpx

    body = {"model": model, "prompt": prompt, "max_tokens": budget, "temperature": 0, "stream": stream}
    if kind == "bad":
        body.update(random.choice(BAD_BODIES))
    t0 = time.perf_counter()
    ttft, text, status = None, "", None
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        status = r.status_code
        if status == 200:
            text = r.json()["choices"][0]["text"]
            ttft = time.perf_counter() - t0
        return {"kind": kind, "status": status, "text": text, "error": r.json().get("error") if status != 200 else None,
                "latency": time.perf_counter() - t0, "ttft": ttft}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        status = r.status_code
        if status != 200:
            r.read()
            return {"kind": kind, "status": status, "text": "", "error": r.json().get("error"),
                    "latency": time.perf_counter() - t0, "ttft": None}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
            if kind == "disconnect":
                break  # the client hangs up mid-stream
    return {"kind": kind, "status": status, "text": text, "error": None, "latency": time.perf_counter() - t0,
            "ttft": ttft if ttft is not None else time.perf_counter() - t0}


def _metrics(url: str) -> dict:
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def drive(url: str, prompts, budgets, clients: int, seconds: float, disconnect: float, bad: float,
          model: str, seed: int = 0) -> list[dict]:
    """`clients` threads sending requests back to back until `seconds` have passed."""
    stop_at = time.perf_counter() + seconds
    results, lock = [], threading.Lock()

    def client(c: int):
        rng = random.Random(seed * 1000 + c)
        while time.perf_counter() < stop_at:
            i = rng.randrange(len(prompts))
            u = rng.random()
            kind = "bad" if u < bad else "disconnect" if u < bad + disconnect else "good"
            out = _request(url, prompts[i], budgets[i], kind, kind == "disconnect" or rng.random() < 0.5, model)
            out["index"] = i
            with lock:
                results.append(out)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return results


def summarize(results: list[dict], seconds: float, tok) -> dict:
    good = [r for r in results if r["kind"] == "good" and r["status"] == 200]
    lat = np.array([r["latency"] for r in good]) if good else np.zeros(1)
    ttft = np.array([r["ttft"] for r in good]) if good else np.zeros(1)
    tokens = sum(len(tok.encode(r["text"]).ids) for r in good)
    return {"requests": len(results), "good": sum(r["kind"] == "good" for r in results),
            "disconnects": sum(r["kind"] == "disconnect" for r in results),
            "bad": sum(r["kind"] == "bad" for r in results), "good_answered": len(good),
            "requests_per_s": len(good) / seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99))}


def bench_serve_load(variant: str, clients: int, seconds: float, slots: int, max_new: int, medquad: str,
                     tokenizer: str, questions: int = 64, disconnect: float = 0.10, bad: float = 0.05,
                     steps_per_sync: int = 8, llama_cpp: bool = False, llama_extra_bufts: str = "auto") -> list[dict]:
    import httpx2 as httpx
    import jax

    from biomedlm_jax.benchmarks.inference import random_model
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import gguf, hf
    from biomedlm_jax.inference import engine, sampling
    from biomedlm_jax.tasks import seq2seq

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    examples = seq2seq.read_medquad(medquad)[:questions]
    prompts = [f"Question: {e.question}\nAnswer:" for e in examples]
    budgets = [max(1, min(max_new, len(tok.encode(" " + e.answer).ids))) for e in examples]
    ids = [tok.encode(p).ids for p in prompts]
    model, params = random_model(variant, max(map(len, ids)) + max_new, tok.get_vocab_size())
    eos = tok.token_to_id(tokenizer_lib.EOS_TOKEN)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new, temperature=0.0, eos_id=eos, pad_id=eos)
    offline = engine.generate_all(model, params, ids, cfg, slots=slots, max_new_tokens=budgets)
    want = [tok.decode([t for t in out if t != eos]) for out in offline]
    base = {"model": variant, "clients": clients, "seconds": seconds, "slots": slots, "max_new": max_new,
            "disconnect_share": disconnect, "bad_share": bad, "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "bench")
        hf.save_pretrained(model, params, ckpt, tokenizer=tok)
        argv = serve_argv(ckpt, "--model_name=bench", f"--slots={slots}", f"--max_len={model.config.n_positions}",
                          f"--steps_per_sync={steps_per_sync}", f"--max_queue={max(64, 2 * clients)}")
        t0 = time.perf_counter()
        with running(argv, tmp, "serve") as (url, proc):
            ready_s = time.perf_counter() - t0
            rss_warm = _rss_mb(proc.pid)
            results = drive(url, prompts, budgets, clients, seconds, disconnect, bad, "bench")
            deadline = time.time() + 60  # the server sees the last disconnects at its next check
            health, n_health = httpx.get(url + "/health", timeout=30).json(), 1
            while (health["active"] or health["queued"]) and time.time() < deadline:
                time.sleep(0.2)
                health, n_health = httpx.get(url + "/health", timeout=30).json(), n_health + 1
            own_gets = 1 + n_health  # the benchmark's own 200s: the readiness probe's and the health reads
            m = _metrics(url)
            rss_end = _rss_mb(proc.pid)
        with open(os.path.join(tmp, "serve.log")) as f:
            log_text = f.read()
        warm_line = next((ln for ln in log_text.splitlines() if "warm-up:" in ln), "")
        statuses = {}
        for r in results:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        counted = {labels[0][1]: v for (name, labels), v in m.items() if name == "biomedlm_http_responses_total"}
        # the benchmark's own GETs are 200s the clients did not send (the /metrics read being answered is
        # counted after its body is made)
        extra_200 = counted.get("200", 0) - statuses.get("200", 0)
        disconnects = sum(r["kind"] == "disconnect" for r in results)
        good = [r for r in results if r["kind"] == "good"]
        finished = {labels[0][1]: v for (name, labels), v in m.items() if name == "biomedlm_completions_total"}
        row = dict(base, kind="serve-load", impl="biomedlm-jax", **summarize(results, seconds, tok),
                   ready_s=ready_s, warm_up=warm_line.split("warm-up:", 1)[-1].strip(),
                   statuses=statuses, metrics_responses=counted,
                   wrong_text=sum(r["status"] != 200 or r["text"] != want[r["index"]] for r in good),
                   bad_not_refused=sum(r["kind"] == "bad" and (r["status"] not in (400, 404) or not r["error"])
                                       for r in results),
                   # every status as the clients saw it; one ended choice per good or disconnected
                   # request (a disconnect after the last token ends by length, not cancelled)
                   metrics_add_up=bool(all(counted.get(s, 0) == n for s, n in statuses.items() if s != "200")
                                       and set(counted) <= set(statuses) | {"200"} and extra_200 == own_gets
                                       and sum(finished.values()) == len(good) + disconnects
                                       and finished.get("cancelled", 0) <= disconnects),
                   finish_reasons=finished, own_200s=extra_200,
                   leaked={"active": health["active"], "queued": health["queued"]},
                   rss_after_warmup_mb=rss_warm, rss_end_mb=rss_end, rss_growth=rss_end / rss_warm - 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if llama_cpp:
            path = gguf.write_gguf(model.config, params, tok, os.path.join(tmp, "bench.gguf"), "F32")
            with running(llama_argv(path, model.config.n_positions, llama_extra_bufts), tmp, "llama.cpp") as (url, _):
                results = drive(url, prompts, budgets, clients, seconds, 0.0, 0.0, "bench")
            rows.append(dict(base, kind="serve-load", impl="llama.cpp", disconnect_share=0.0, bad_share=0.0,
                             **summarize(results, seconds, tok)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows
