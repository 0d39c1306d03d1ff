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

# A minimal S3 for reads (GET/HEAD object, HEAD bucket, ListObjectsV2 with prefix, delimiter and
# continuation), objects in memory, every request answered after `latency` on its own thread, HTTP/1.1
# keep-alive. moto spends ~10 ms of CPU per request on this host and tops out near 100 requests/s,
# which would measure moto; this serves thousands. Objects are written with PUT (unsigned or not).
FAST_SERVER = r"""
import hashlib, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape
latency = float(sys.argv[1])
objects = {}  # (bucket, key) -> (bytes, etag)
lock = threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()  # headers and body go out in two writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def log_message(self, *a): pass
    def send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers: self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD": self.wfile.write(body)
    def split(self):
        u = urlsplit(self.path)
        parts = unquote(u.path).lstrip("/").split("/", 1)
        return parts[0], (parts[1] if len(parts) > 1 else ""), parse_qs(u.query)
    def do_PUT(self):
        bucket, key, _ = self.split()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if key:
            with lock: objects[(bucket, key)] = (body, hashlib.md5(body).hexdigest())
        self.send(200, b"", [("ETag", '"x"')])
    def do_HEAD(self): self.do_GET()
    def do_GET(self):
        if "Authorization" not in self.headers: time.sleep(latency)
        bucket, key, q = self.split()
        if not key and "list-type" in q: return self.list(bucket, q)
        if not key: return self.send(200)
        hit = objects.get((bucket, key))
        if hit is None:
            return self.send(404, b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>", [("Content-Type", "application/xml")])
        body, etag = hit
        self.send(200, body, [("ETag", f'"{etag}"'), ("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT"),
                              ("Content-Type", "application/octet-stream")])
    def list(self, bucket, q):
        prefix, delim = q.get("prefix", [""])[0], q.get("delimiter", [""])[0]
        start, most = q.get("continuation-token", [""])[0], int(q.get("max-keys", ["1000"])[0])
        keys = sorted(k for b, k in objects if b == bucket and k.startswith(prefix) and k > start)
        contents, prefixes, last, n = [], [], "", 0
        for k in keys:
            if n >= most: break
            rest = k[len(prefix):]
            if delim and delim in rest:
                p = prefix + rest.split(delim, 1)[0] + delim
                if p not in prefixes:
                    prefixes.append(p); n += 1
            else:
                contents.append(k); n += 1
            last = k
        truncated = n >= most and keys and last != keys[-1]
        xml = ["<?xml version='1.0' encoding='UTF-8'?><ListBucketResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>",
               f"<Name>{bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{n}</KeyCount><MaxKeys>{most}</MaxKeys>",
               f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if truncated: xml.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        for k in contents:
            body, etag = objects[(bucket, k)]
            xml.append(f"<Contents><Key>{escape(k)}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified>"
                       f"<ETag>&quot;{etag}&quot;</ETag><Size>{len(body)}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        for p in prefixes: xml.append(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>")
        xml.append("</ListBucketResult>")
        self.send(200, "".join(xml).encode(), [("Content-Type", "application/xml")])
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
threading.Thread(target=srv.serve_forever, daemon=True).start()
print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
sys.stdin.read()
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


def run(tokenizer: str, source: str, articles: int, latencies_ms: list[float], concurrencies: list[int],
        servers: tuple[str, ...] = ("minimal", "moto")) -> list[dict]:
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
        for server, latency in [(sv, lat) for sv in servers for lat in latencies_ms]:
            code = FAST_SERVER if server == "minimal" else SERVER
            srv = subprocess.Popen([sys.executable, "-c", code, str(latency / 1000)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
            try:
                url = srv.stdout.readline().strip()
                _lay_out(url, files)
                for c in concurrencies:
                    wall, m = _prepare(f"s3://{BUCKET}/metadata/", tokenizer, os.path.join(tmp, f"out-{latency}-{c}"),
                                       _env(url), [f"--fetch_concurrency={c}"])
                    tokens = sum(s["tokens"] + s["dropped_tokens"] for s in m["splits"].values())
                    n = m["read_stats"]["documents"]
                    rows.append({"kind": "pmc_fetch", "where": f"fake S3 ({server})", "latency_ms": latency, "concurrency": c,
                                 "articles": n, "seconds": round(wall, 2), "articles_per_s": round(n / wall, 1),
                                 "tokens_per_s": round(tokens / wall)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                srv.stdin.close()
                srv.wait(timeout=60)
    return rows
