"""S3 sources against a real server and a real S3 API on loopback: moto's server mode, started by
the tests. Registration from ``s3://`` URLs (allowed, denied, missing, too big, credentials in the
URL) and watching an ``s3://`` prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, ServerFactory, free_port, make_mar, wait_for

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

_client = httpx.Client(timeout=60)
BUCKET = "models"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[object]:
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", ()):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-logged",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def upload(s3: object, tmp: Path, key: str, name: str, version: str) -> None:
    build = tmp / f"build-{key.replace('/', '_')}"
    build.mkdir(parents=True, exist_ok=True)
    archive = make_mar(build, name, "rollout_handler.py", version=version)
    s3.upload_file(str(archive), BUCKET, key)  # type: ignore[attr-defined]


def test_register_from_s3(start_server: ServerFactory, s3: object, s3_endpoint: str, tmp_path: Path) -> None:
    config = f"allowed_urls=s3://{BUCKET}/allowed/.*\nmax_download_size=200000\n"
    srv = start_server(config, env=aws_env(s3_endpoint))
    upload(s3, tmp_path, "allowed/m.mar", "m", "1.0")
    reply = srv.register(f"s3://{BUCKET}/allowed/m.mar", initial_workers=1)
    assert reply.status_code == 200, reply.text
    assert srv.predict("m").json() == {"version": "1.0"}
    assert (srv.store / "m.mar").is_file()  # downloaded into the store, as http(s) archives are
    assert _client.get(f"{srv.management}/models/m").json()[0]["modelUrl"] == f"s3://{BUCKET}/allowed/m.mar"
    assert _client.delete(f"{srv.management}/models/m").status_code == 200
    assert not (srv.store / "m.mar").exists()  # and removed with the model

    # A pattern that is not allowed: refused before any S3 call.
    upload(s3, tmp_path, "other/x.mar", "x", "1.0")
    reply = srv.register(f"s3://{BUCKET}/other/x.mar")
    assert reply.status_code == 404
    assert reply.json()["message"] == f"Given URL s3://{BUCKET}/other/x.mar does not match any allowed URL(s)"
    # A missing key.
    reply = srv.register(f"s3://{BUCKET}/allowed/nope.mar")
    assert reply.status_code == 400
    assert reply.json() == {
        "code": 400, "type": "DownloadArchiveException",
        "message": f"Failed to download archive from: s3://{BUCKET}/allowed/nope.mar: no such key",
    }  # fmt: skip
    # Over max_download_size.
    s3.put_object(Bucket=BUCKET, Key="allowed/big.mar", Body=b"\0" * 300_000)  # type: ignore[attr-defined]
    reply = srv.register(f"s3://{BUCKET}/allowed/big.mar")
    assert reply.status_code == 400
    assert "larger than max_download_size (200000 bytes)" in reply.json()["message"]
    # Credentials never travel in a URL, and are never repeated.
    reply = srv.register(f"s3://AKIAEXAMPLE:hunter2@{BUCKET}/allowed/m.mar")
    assert reply.status_code == 400 and "hunter2" not in reply.text
    assert sorted(p.name for p in srv.store.iterdir()) == []  # no archive nor part left behind
    log = srv.log.read_text()
    assert "s3cr3t-never-logged" not in log and "hunter2" not in log


def test_watch_an_s3_prefix(start_server: ServerFactory, s3: object, s3_endpoint: str, tmp_path: Path) -> None:
    config = (
        f"allowed_urls=s3://{BUCKET}/store/.*\nmodel_store_poll_seconds=1\n"
        f"model_store_watch_urls=s3://{BUCKET}/store/\n"
    )
    upload(s3, tmp_path, "store/w/1/w.mar", "w", "1")
    srv = start_server(config, env=aws_env(s3_endpoint))
    wait_for(lambda: _client.get(f"{srv.inference}/v2/health/ready").status_code == 200, what="ready")

    def served() -> str | None:
        reply = _client.post(f"{srv.inference}/predictions/w", content=b"x")
        return reply.json()["version"] if reply.status_code == 200 else None

    wait_for(lambda: served() == "1", what="w 1 from S3")
    assert _client.get(f"{srv.management}/models/w").json()[0]["modelUrl"] == f"s3://{BUCKET}/store/w/1/w.mar"
    upload(s3, tmp_path, "store/w/2/w.mar", "w", "2")
    wait_for(lambda: served() == "2", what="w 2 from S3")
    wait_for(lambda: len(_client.get(f"{srv.management}/models/w/all").json()) == 1, what="w 1 unloaded")
    # An archive at the top of the prefix, named by its manifest.
    upload(s3, tmp_path, "store/top.mar", "top", "3.0")
    wait_for(lambda: _client.get(f"{srv.management}/models/top").status_code == 200, what="top from S3")
    # The newest version's object deleted: it goes, and the policy serves version 1 again.
    s3.delete_object(Bucket=BUCKET, Key="store/w/2/w.mar")  # type: ignore[attr-defined]
    wait_for(lambda: served() == "1", what="back to w 1")
    assert not list((srv.tmp).rglob("watched/*/*.mar"))  # downloads are not kept once registered
    assert sorted(p.name for p in srv.store.iterdir()) == []


def test_an_unreachable_s3_prefix_unloads_nothing(start_server: ServerFactory, s3: object, s3_endpoint: str, tmp_path: Path) -> None:
    config = f"allowed_urls=s3://{BUCKET}/store/.*\nmodel_store_poll_seconds=1\nmodel_store_watch_urls=s3://{BUCKET}/store/\n"
    upload(s3, tmp_path, "store/w/1/w.mar", "w", "1")
    srv: Server = start_server(config, env=aws_env(s3_endpoint))
    wait_for(lambda: _client.get(f"{srv.management}/models/w").status_code == 200, what="w")
    # Listing now fails (access denied with other credentials is simulated by a bucket that is gone).
    s3.delete_object(Bucket=BUCKET, Key="store/w/1/w.mar")  # type: ignore[attr-defined]
    s3.delete_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
    wait_for(lambda: "no such bucket" in srv.log.read_text(), what="the failed listing logged")
    assert _client.get(f"{srv.management}/models/w").status_code == 200
    s3.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
