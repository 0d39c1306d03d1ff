"""Reading a prepared corpus from an object store, measured against a local fake GCS server
(gcp-storage-emulator, from the [test] extra) that answers each request after a set latency.

`python -m biomedlm_jax.bench_prepare remote-read --corpus=DIR [--latency_ms=20]` uploads DIR (a
`prepare_data` output) to the fake server, then each of `--hosts` reader processes takes its share
of every global batch with the trainer's `BatchIterator`, as the hosts of a pod do, and reports:

- bytes served by the server ÷ bytes of the rows the batches needed (1.0 = nothing extra fetched);
- requests per batch (counted by the server);
- batches per second per host with the simulated per-request latency.

`--reader_path=CHECKOUT` runs the readers from another checkout of this repository (its
`biomedlm_jax` first on PYTHONPATH): the same numbers for another version of the reader. The server is
threaded, so concurrent requests overlap their latency as they would against GCS.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

READER = r"""
import json, sys, time
from biomedlm_jax.data import input_pipeline as ip
from biomedlm_jax.data.shards import load_prepared
url, batch, batches, hosts, host = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
per = batch // hosts
rows = load_prepared(url, "train").rows
it = ip.BatchIterator(rows, batch, seed=0, local_rows=(host * per, host * per + per))
row_bytes = rows.shape[1] * rows.dtype.itemsize
next(it)  # the first batch pays for connections; timed from the second
t0 = time.perf_counter()
for _ in range(batches):
    next(it)
seconds = time.perf_counter() - t0
time.sleep(1.0)  # let the read-ahead thread finish the batch after the last: the server counts it too
print(json.dumps({"seconds": seconds, "row_bytes": row_bytes, "rows_per_batch": per}))
"""


class FakeGCS:
    """The emulator in this process, threaded, each media download delayed by `latency` seconds and
    counted (requests, bytes) per object name."""

    def __init__(self, latency: float):
        from http import server as http_server

        from gcp_storage_emulator import server as emulator
        from gcp_storage_emulator.handlers import objects

        self.latency, self.requests, self.bytes = latency, 0, 0
        self._lock = threading.Lock()
        plain = objects.download

        def download(request, response, storage, *args, **kwargs):
            time.sleep(self.latency)
            plain(request, response, storage, *args, **kwargs)
            if request.params.get("object_id", "").endswith(".npy"):
                with self._lock:
                    self.requests += 1
                    self.bytes += len(response._content or b"")

        for _, methods in emulator.HANDLERS:
            for method, handler in list(methods.items()):
                if handler is plain:
                    methods[method] = download

        class Threaded(http_server.ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 drops concurrent connects (1 s retries)

        def run(thread):  # the emulator's API thread, with a thread per request
            from functools import partial

            thread._httpd = Threaded((thread._host, thread._port), partial(emulator.RequestHandler, thread._storage))
            thread.is_running.set()
            thread._httpd.serve_forever()

        emulator.APIThread.run = run
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        self.server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bench")
        self.server.start()
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ, STORAGE_EMULATOR_HOST=self.url, GOOGLE_AUTH_TOKEN_FOR_TESTING="bench",
                        GOOGLE_CLOUD_PROJECT="bench", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                        EPATH_USE_TF="false")

    def upload(self, folder: str, prefix: str) -> None:
        import urllib.parse
        import urllib.request

        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                q = urllib.parse.urlencode({"uploadType": "media", "name": f"{prefix}/{os.path.relpath(path, folder)}"})
                with open(path, "rb") as f:
                    req = urllib.request.Request(f"{self.url}/upload/storage/v1/b/bench/o?{q}", data=f.read(),
                                                 method="POST")
                with urllib.request.urlopen(req) as r:
                    r.read()

    def stop(self):
        self.server.stop()


def run(corpus: str, latency_ms: float = 20, batch: int = 32, batches: int = 20, hosts: int = 2,
        reader_path: str | None = None) -> dict:
    """Measures `hosts` reader processes, one after the other, each reading `batches` batches."""
    fake = FakeGCS(latency_ms / 1000)
    try:
        fake.upload(corpus, "corpus")
        env = dict(fake.env)
        if reader_path:
            env["PYTHONPATH"] = os.path.abspath(reader_path) + os.pathsep + env.get("PYTHONPATH", "")
        seconds, needed, requests, served = [], 0, 0, 0
        for host in range(hosts):
            before_req, before_bytes = fake.requests, fake.bytes
            r = subprocess.run([sys.executable, "-c", READER, "gs://bench/corpus", str(batch), str(batches), str(hosts),
                                str(host)], capture_output=True, text=True, env=env, timeout=1200,
                               cwd=reader_path or None)
            if r.returncode:
                raise RuntimeError(f"reader {host} failed:\n{r.stderr[-3000:]}")
            out = json.loads(r.stdout.strip().splitlines()[-1])
            seconds.append(out["seconds"])
            # batches + 1 read by the loop, and one more by the read-ahead thread
            needed += (batches + 2) * out["rows_per_batch"] * out["row_bytes"]
            requests += fake.requests - before_req
            served += fake.bytes - before_bytes
        return {"kind": "remote_read", "reader": reader_path or "this checkout", "latency_ms": latency_ms,
                "batch": batch, "hosts": hosts, "batches": batches,
                "served_over_needed": round(served / needed, 3), "requests_per_batch": round(requests / hosts / (batches + 2), 2),
                "batches_per_s_per_host": round(batches / (sum(seconds) / hosts), 2), "served_mb": round(served / 1e6, 2)}
    finally:
        fake.stop()
