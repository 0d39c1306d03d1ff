"""A fake GCS server for tests (gcp-storage-emulator, in memory) and helpers to look into it.

`fake_gcs` yields the environment a process needs to use it: the emulator's address for gcsfs and
tensorstore, a test token, and `EPATH_USE_TF=false`, so that etils.epath uses gcsfs (which honours
the emulator) in every process, Beam workers included, rather than TensorFlow's gfile (which does not).
"""
import json
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from conftest import REPO

SERVED: dict = {}  # object name -> bytes the fake server sent (media downloads)


@pytest.fixture
def fake_gcs(monkeypatch):
    SERVED.clear()
    from gcp_storage_emulator import server as emulator
    from gcp_storage_emulator.handlers import objects

    # The emulator's media download leaves out the x-goog-generation header that GCS sends and that
    # tensorstore's conditional writes (OCDBT manifests) rely on; add it.
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        name = request.params.get("object_id", "")
        SERVED[name] = SERVED.get(name, 0) + len(response._content or b"")
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the 404 stands as it is
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj["metageneration"]

    monkeypatch.setattr(objects, "download", download)
    for _, methods in emulator.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is plain:
                monkeypatch.setitem(methods, method, download)
    # gcsfs's default (experimental) file system first asks a gRPC control API, which the emulator lacks
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="test", GOOGLE_CLOUD_PROJECT="test",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", EPATH_USE_TF="false")
    yield env
    server.stop()


def run(env, module, *args, ok=True, cwd=REPO):
    """`python -m module args` in the fake server's environment."""
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def ls(env, prefix):
    """Object names under gs://bkt/PREFIX (the JSON API, read straight from the emulator)."""
    q = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/bkt/o?{q}") as r:
        return sorted(item["name"] for item in json.load(r).get("items", []))


def cat(env, name) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{env['STORAGE_EMULATOR_HOST']}/storage/v1/b/bkt/o/{quoted}?alt=media") as r:
        return r.read()


def get(env, prefix, dst):
    for name in ls(env, prefix):
        out = os.path.join(dst, os.path.relpath(name, prefix))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(cat(env, name))




def put(env, name, data: bytes) -> None:
    """Upload an object to gs://bkt/NAME (the JSON API's media upload)."""
    q = urllib.parse.urlencode({"uploadType": "media", "name": name})
    req = urllib.request.Request(f"{env['STORAGE_EMULATOR_HOST']}/upload/storage/v1/b/bkt/o?{q}", data=data,
                                 method="POST", headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req) as r:
        r.read()


def put_tree(env, folder, prefix) -> None:
    """Upload every file below a local folder to gs://bkt/PREFIX/..."""
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                put(env, f"{prefix}/{os.path.relpath(path, folder)}", fh.read())
