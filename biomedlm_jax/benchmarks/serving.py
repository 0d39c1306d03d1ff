"""The HTTP server under load: MedQuAD questions sent by N concurrent clients, streamed, greedy.

Both servers run as users start them, in their own process: ours (`python -m biomedlm_jax.serve` on a
random-init model saved as an HF checkpoint) and, with `llama_cpp`, llama-cpp-python's OpenAI server
(`python -m llama_cpp.server`, one request at a time: its default of interrupting the running request
when another arrives is turned off) on the same weights exported to GGUF. Each request asks for
`max_tokens` = its reference answer's token count (at most `max_new`; a random-init model does not stop
on cue) and is streamed, so the client sees its time to first token. Rows per (server, clients):
requests/s, completion tokens/s, p50 / p99 latency and p50 / p99 time to first token. One client is
the same requests sent one at a time.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url: str, logf, timeout: float = 600) -> None:
    import httpx2 as httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            logf.seek(0)
            raise SystemExit(f"the server exited ({proc.returncode}): {logf.read()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not answer in {timeout:.0f} s")


# llama_cpp.server with extra buffer types as gguf.load_llama sets them (off where AMX is reported)
LLAMA_SERVER = "from biomedlm_jax.formats import gguf; gguf.llama_cpp_server_main()"


def serve_argv(ckpt: str, *flags: str) -> list:
    """`python -m biomedlm_jax.serve` on an HF checkpoint folder, with more flags."""
    return [sys.executable, "-m", "biomedlm_jax.serve", f"--init_from=hf:{ckpt}", *flags]


def llama_argv(gguf_path: str, n_ctx: int, extra_bufts: str) -> list:
    """llama-cpp-python's OpenAI server on a GGUF file, model alias "bench", queueing requests (its
    default of interrupting the running request when another arrives returns cut answers)."""
    return [sys.executable, "-c", LLAMA_SERVER, f"--extra_bufts={extra_bufts}", "--model", gguf_path,
            "--model_alias", "bench", "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]


@contextlib.contextmanager
def running(argv: list, folder: str, name: str):
    """Start a server (argv, then --host/--port, which both servers take), wait until it answers, yield
    (url, process); stop it afterwards. Its output goes to FOLDER/NAME.log (a file, not a pipe nobody
    drains)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(os.path.join(folder, f"{name}.log"), "w+") as logf:
        proc = subprocess.Popen(argv + ["--host", "127.0.0.1", "--port", str(port)],
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), stdout=logf,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_ready(proc, url, logf)
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(60)


def _one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; (latency, ttft, tokens) as the client sees them."""
    import httpx2 as httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, text = None, ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "text": text}


def load(url: str, model: str, prompts: Sequence[str], budgets: Sequence[int], clients: int, tok) -> dict:
    """All requests through `clients` concurrent clients: throughput and latency percentiles. Tokens are
    counted in the text received (re-tokenized with `tok`, the same rule for every server), so a server
    that returns less than was asked for is not credited with it."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda pb: _one(url, model, *pb), zip(prompts, budgets)))
    wall = time.perf_counter() - t0
    lat, ttft = np.array([r["latency"] for r in res]), np.array([r["ttft"] for r in res])
    tokens = sum(len(tok.encode(r["text"]).ids) for r in res)
    return {"clients": clients, "requests": len(res), "seconds": wall, "requests_per_s": len(res) / wall,
            "tokens_per_s": tokens / wall, "completion_tokens": tokens, "asked_tokens": int(sum(budgets)),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "texts": [r["text"] for r in res]}


def bench_serve(variant: str, questions: int, clients: Sequence[int], slots: int, max_new: int, medquad: str,
                tokenizer: str, steps_per_sync: int = 8, llama_cpp: bool = False,
                llama_extra_bufts: str = "auto") -> list[dict]:
    import jax

    from biomedlm_jax.benchmarks.inference import random_model
    from biomedlm_jax.data import tokenizer as tokenizer_lib
    from biomedlm_jax.formats import gguf, hf
    from biomedlm_jax.tasks import seq2seq

    tok = tokenizer_lib.load_tokenizer(tokenizer)
    examples = seq2seq.read_medquad(medquad)[:questions]
    if len(examples) < questions:
        raise SystemExit(f"{medquad}: {len(examples)} question-answer pairs, fewer than --questions={questions}")
    prompts = [f"Question: {e.question}\nAnswer:" for e in examples]
    budgets = [max(1, min(max_new, len(tok.encode(" " + e.answer).ids))) for e in examples]
    longest = max(len(tok.encode(p).ids) for p in prompts)
    model, params = random_model(variant, longest + max_new, tok.get_vocab_size())
    max_len = model.config.n_positions
    base = {"model": variant, "vocab": model.config.vocab_size, "questions": questions, "slots": slots,
            "max_new": max_new, "budget_mean": float(np.mean(budgets)), "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "bench")
        hf.save_pretrained(model, params, ckpt, tokenizer=tok)
        servers = [("biomedlm-jax", serve_argv(ckpt, f"--slots={slots}", f"--max_len={max_len}",
                                               f"--steps_per_sync={steps_per_sync}", f"--max_queue={4 * max(clients)}"))]
        if llama_cpp:
            path = gguf.write_gguf(model.config, params, tok, os.path.join(tmp, "bench.gguf"), "F32")
            servers.append(("llama.cpp", llama_argv(path, max_len, llama_extra_bufts)))
        texts = {}
        for name, argv in servers:
            with running(argv, tmp, name) as (url, _):
                load(url, "bench", prompts[: 2 * slots], budgets[: 2 * slots], max(clients), tok)  # warm up
                for c in clients:
                    row = load(url, "bench", prompts, budgets, c, tok)
                    texts[(name, c)] = row.pop("texts")
                    rows.append(dict(base, kind="serve", impl=name, **row))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
        ours = [k for k in texts if k[0] == "biomedlm-jax"]
        for row in rows:  # greedy answers must not depend on how many clients shared the engine
            if row["impl"] == "biomedlm-jax":
                row["same_text_as_1_client"] = texts[("biomedlm-jax", row["clients"])] == texts[ours[0]]
            if llama_cpp and row["impl"] == "llama.cpp" and ("biomedlm-jax", row["clients"]) in texts:
                same = [a == b for a, b in zip(texts[("llama.cpp", row["clients"])], texts[("biomedlm-jax", row["clients"])])]
                row["same_text_as_ours"] = float(np.mean(same))
    return rows
