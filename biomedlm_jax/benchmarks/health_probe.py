"""/health's latency while the server refuses huge requests (issue 42's "8 MB prompt" case).

    python -m biomedlm_jax.bench_inference health-probe [--model=tiny --max_len=512 --slots=4]

`python -m biomedlm_jax.serve` runs in its own process, as a user starts it, on a random-init model.
A probe thread GETs /health every 10 ms while one request at a time is refused: an 8 MB body (refused
by its Content-Length), the same sent chunked (refused as its bytes pass the limit), a text under the
body limit too long for the context (refused before it is tokenized) and 20,000 token ids (refused by
length). A row per case: the refusal's status and milliseconds, and /health's p50 and slowest answer
while it ran; the "idle" row is /health with nothing else going on.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

from biomedlm_jax.benchmarks.serving import running, serve_argv


def _cases(vocab: int):
    def chunks():
        for _ in range(128):
            yield b" " * (64 << 10)

    return [
        ("idle", None),
        ("8 MB body", {"json": {"prompt": "word " * ((8 << 20) // 5), "max_tokens": 4}}),
        ("8 MB chunked body", {"content": chunks, "headers": {"content-type": "application/json"}}),
        ("100 kB text", {"json": {"prompt": "x" * 100_000, "max_tokens": 4}}),
        ("20,000 token ids", {"json": {"prompt": [i % vocab for i in range(20_000)], "max_tokens": 4}}),
    ]


def bench_health_probe(variant: str = "tiny", max_len: int = 512, slots: int = 4, tokenizer: str = "") -> list[dict]:
    import httpx2 as httpx
    import jax

    from biomedlm_jax.benchmarks.inference import random_model
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import hf

    tok = tokenizer_lib.load_tokenizer(tokenizer or os.path.join("data", "gpt2_tokenizer"))
    model, params = random_model(variant, max_len, tok.get_vocab_size())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "bench")
        hf.save_pretrained(model, params, ckpt, tokenizer=tok)
        with running(serve_argv(ckpt, f"--slots={slots}", f"--max_len={max_len}"), tmp, "serve") as (url, _):
            for name, kw in _cases(model.config.vocab_size):
                latencies, done = [], threading.Event()

                def probe():
                    while not done.is_set():
                        t0 = time.perf_counter()
                        httpx.get(url + "/health", timeout=30)
                        latencies.append(time.perf_counter() - t0)
                        time.sleep(0.01)

                thread = threading.Thread(target=probe)
                thread.start()
                time.sleep(0.3)
                t0 = time.perf_counter()
                if kw is None:
                    time.sleep(1.0)
                    status, code = 200, None
                else:
                    kw = dict(kw, content=kw["content"]()) if "content" in kw else kw
                    r = httpx.post(url + "/v1/completions", timeout=120, **kw)
                    status, code = r.status_code, (r.json().get("error") or {}).get("code")
                refused_ms = 1e3 * (time.perf_counter() - t0)
                time.sleep(0.3)
                done.set()
                thread.join(30)
                lat = 1e3 * np.array(latencies)
                rows.append({"kind": "health-probe", "case": name, "status": status, "code": code,
                             "refused_ms": None if kw is None else round(refused_ms, 1),
                             "health_p50_ms": round(float(np.percentile(lat, 50)), 1),
                             "health_max_ms": round(float(lat.max()), 1), "probes": len(lat), "model": variant,
                             "max_len": max_len, "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count()})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows
