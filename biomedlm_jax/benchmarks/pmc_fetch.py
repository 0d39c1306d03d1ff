"""PMC Cloud Service throughput per worker: `prepare_data` over article objects on a fake S3 server whose
every read waits `latency` seconds, fetching one object at a time against `--fetch_concurrency=N`.

    python -m biomedlm_jax.bench_prepare pmc-fetch --tokenizer=DIR --source=abstracts.jsonl \
        [--articles=400] [--latency_ms=20,50] [--concurrency=1,32]

The articles are the benchmark's synthetic PMC full texts (`benchmarks.prepare.synthesize`, about 1,900
tokens each), laid out as NLM's README describes the bucket (PMCn.1/PMCn.1.xml, metadata/PMCn.1.json).
The server (moto, in its own process) delays the anonymous requests the code under test makes, not
the signed uploads that lay the bucket out. Each run is the CLI as a user runs it (one process, a
local output), timed end to end: listing, two requests per article, parsing, tokenizing, packing.
A run over the same articles as local files gives the ceiling that the CPU sets.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

SERVER = r"""
import logging, sys, time
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
latency = float(sys.argv[1])
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
srv.start()
app = srv._server.app
def slow(environ, start_response):
    if "HTTP_AUTHORIZATION" not in environ:  # the reads under test; uploads are signed
        time.sleep(latency)
    return app(environ, start_response)
srv._server.app = slow
host, port = srv.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
srv.stop()
"""

BUCKET = "pmc-oa-opendata"


def _lay_out(url: str, files: list[str]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                      aws_secret_access_key="bench")
    s3.create_bucket(Bucket=BUCKET)

    def put(i_path):
        i, path = i_path
        name = f"PMC{9000000 + i}.1"
        xml = open(path, "rb").read()
        meta = {"pmcid": f"PMC{9000000 + i}", "version": 1, "is_pmc_openaccess": True, "is_retracted": False,
                "license_code": "CC BY", "xml_url": f"s3://{BUCKET}/{name}/{name}.xml?md5={hashlib.md5(xml).hexdigest()}"}
        for key, body in ((f"{name}/{name}.xml", xml), (f"metadata/{name}.json", json.dumps(meta).encode())):
            s3.put_object(Bucket=BUCKET, Key=key, Body=body, ACL="public-read")

    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, enumerate(files)))


def _env(url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent", TOKENIZERS_PARALLELISM="false")
    return env


def _prepare(inputs: str, tokenizer: str, out: str, env: dict, extra: list[str]) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "biomedlm_jax.prepare_data", f"--input={inputs}", f"--tokenizer={tokenizer}",
           f"--out={out}", "--overwrite", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.json")) as f:
        return wall, json.load(f)


def run(tokenizer: str, source: str, articles: int, latencies_ms: list[float], concurrencies: list[int]) -> list[dict]:
    from biomedlm_jax.benchmarks.prepare import synthesize

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pmc-") as tmp:
        scale = -(-articles // sum(1 for _ in open(source)))
        files = synthesize(source, os.path.join(tmp, "jats"), "jats", scale)[:articles]
        local = os.path.join(tmp, "local-articles")
        os.makedirs(local)
        for f in files:
            os.link(f, os.path.join(local, os.path.basename(f)))
        wall, m = _prepare(local, tokenizer, os.path.join(tmp, "out-local"), dict(os.environ, TOKENIZERS_PARALLELISM="false"), [])
        tokens = sum(s["tokens"] + s["dropped_tokens"] for s in m["splits"].values())
        rows.append({"kind": "pmc_fetch", "where": "local files", "latency_ms": 0, "concurrency": None,
                     "articles": m["read_stats"]["documents"], "seconds": round(wall, 2),
                     "articles_per_s": round(m["read_stats"]["documents"] / wall, 1), "tokens_per_s": round(tokens / wall)})
        print(json.dumps(rows[-1]), flush=True)
        for latency in latencies_ms:
            srv = subprocess.Popen([sys.executable, "-c", SERVER, str(latency / 1000)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
            try:
                url = srv.stdout.readline().strip()
                _lay_out(url, files)
                for c in concurrencies:
                    wall, m = _prepare(f"s3://{BUCKET}/metadata/", tokenizer, os.path.join(tmp, f"out-{latency}-{c}"),
                                       _env(url), [f"--fetch_concurrency={c}"])
                    tokens = sum(s["tokens"] + s["dropped_tokens"] for s in m["splits"].values())
                    n = m["read_stats"]["documents"]
                    rows.append({"kind": "pmc_fetch", "where": "fake S3", "latency_ms": latency, "concurrency": c,
                                 "articles": n, "seconds": round(wall, 2), "articles_per_s": round(n / wall, 1),
                                 "tokens_per_s": round(tokens / wall)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                srv.stdin.close()
                srv.wait(timeout=60)
    return rows
