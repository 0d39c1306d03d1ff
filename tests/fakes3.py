"""A fake S3 server for tests (moto's server mode, in this process) and a PMC Cloud Service laid out in it.

`fake_s3` yields (environment, client): the environment a process needs to reach the server, which is
only `AWS_ENDPOINT_URL` (botocore honours it) with no AWS credentials at all, so the code under test
must read the bucket anonymously, as it reads the real `s3://pmc-oa-opendata`; and a boto3 client
with test credentials to lay out buckets and objects. `latency_s` delays every request the server
answers (on its own thread, as a remote store would), for throughput measurements.
"""
import csv
import gzip
import hashlib
import io
import json
import os
import time

import pytest

BUCKET = "pmc-oa-opendata"


def server(latency_s: float = 0.0):
    """A started ThreadedMotoServer on a free port and its URL; every request waits `latency_s` first."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    if latency_s:
        app = srv._server.app

        def slow(environ, start_response):
            time.sleep(latency_s)
            return app(environ, start_response)

        srv._server.app = slow
    host, port = srv.get_host_and_port()
    url = f"http://{host}:{port}"
    import urllib.request

    # moto keeps its buckets in module state, shared by every server of this process: start empty
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).read()
    return srv, url


def environment(url: str) -> dict:
    """This process's environment without AWS credentials or config, pointed at the fake server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=url, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")
    return env


def client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


def put(s3, key: str, body: bytes, bucket: str = BUCKET) -> None:
    """A world-readable object (moto answers an anonymous HEAD by the object's ACL, not the bucket policy)."""
    s3.put_object(Bucket=bucket, Key=key, Body=body, ACL="public-read")


def public_bucket(s3, bucket: str = BUCKET) -> None:
    """A world-readable bucket, as the PMC Cloud Service's is: anyone may list it and get its objects."""
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))


@pytest.fixture
def fake_s3(monkeypatch):
    srv, url = server()
    env = environment(url)
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    _clear_s3_caches()
    yield env, client(url)
    _clear_s3_caches()
    srv.stop()


def _clear_s3_caches():
    """fsspec caches file system instances and listings, and core.paths its anonymous-access choice."""
    import s3fs
    from etils.epath import backend

    from biomedlm_jax.core import paths

    s3fs.S3FileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # etils keeps one file system per scheme
    paths._s3_defaults.cache_clear()


# ----------------------------------------------------------------------------------------------------
# a PMC Cloud Service in the fake bucket
# ----------------------------------------------------------------------------------------------------


def jats(pmcid: str, pmid: str, title: str, abstract: str, body: str, lang: str = "en") -> bytes:
    pmid_el = f'<article-id pub-id-type="pmid">{pmid}</article-id>' if pmid else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<article xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'xml:lang="{lang}" article-type="research-article"><front><article-meta>'
            f'<article-id pub-id-type="pmcid">{pmcid}</article-id>{pmid_el}'
            f'<title-group><article-title>{title}</article-title></title-group>'
            f'<abstract><p>{abstract}</p></abstract></article-meta></front>'
            f'<body><sec><title>Results</title><p>{body}</p></sec></body></article>').encode()


def put_article(s3, pmcid: str, version: int, xml: bytes, *, license_code: str = "CC BY", pmid: str = "",
                retracted: bool = False, openaccess: bool = True, bucket: str = BUCKET) -> dict:
    """PMCn.v/PMCn.v.xml, .txt and .json, and metadata/PMCn.v.json, as NLM's README describes them."""
    name = f"{pmcid}.{version}"
    md5 = hashlib.md5(xml).hexdigest()
    meta = {"pmcid": pmcid, "version": version, "pmid": int(pmid) if pmid else None, "doi": f"10.0/{name}",
            "title": "t", "citation": "J Test. 2026", "is_pmc_openaccess": openaccess, "is_manuscript": False,
            "is_historical_ocr": False, "is_retracted": retracted, "license_code": license_code,
            "xml_url": f"s3://{bucket}/{name}/{name}.xml?md5={md5}",
            "text_url": f"s3://{bucket}/{name}/{name}.txt?md5=0", "pdf_url": None, "media_urls": []}
    body = json.dumps(meta).encode()
    put(s3, f"{name}/{name}.xml", xml, bucket)
    put(s3, f"{name}/{name}.txt", b"plain text, not read", bucket)
    put(s3, f"{name}/{name}.json", body, bucket)
    put(s3, f"metadata/{name}.json", body, bucket)
    return meta


def put_inventory(s3, date: str, bucket: str = BUCKET) -> int:
    """An S3 Inventory of metadata/ as of now, under inventory-reports/BUCKET/metadata/DATE/: a
    manifest.json naming one CSV.gz of (bucket, key, last modified, ETag). Returns its rows."""
    rows = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="metadata/"):
        for obj in page.get("Contents", []):
            rows.append([bucket, obj["Key"], obj["LastModified"].strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                         obj["ETag"].strip('"')])
    text = io.StringIO()
    csv.writer(text, quoting=csv.QUOTE_ALL).writerows(rows)
    key = f"inventory-reports/{bucket}/metadata/data/{hashlib.sha1(date.encode()).hexdigest()}.csv.gz"
    put(s3, key, gzip.compress(text.getvalue().encode()), bucket)
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "version": "2016-11-30",
                "fileFormat": "CSV", "fileSchema": "Bucket, Key, LastModifiedDate, ETag",
                "files": [{"key": key, "size": 0, "MD5checksum": ""}]}
    put(s3, f"inventory-reports/{bucket}/metadata/{date}/manifest.json", json.dumps(manifest).encode(), bucket)
    return len(rows)
