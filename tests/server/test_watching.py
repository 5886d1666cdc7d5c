"""Model-store watching against a real server (server/models/watching.py): new versions swap in
under load with no failed request, removed ones drain, version policies, broken and half-written
archives, and how watched versions meet snapshots."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.config import ConfigError, load_config
from tests.conftest import Server, ServerFactory, make_mar, wait_for

_client = httpx.Client(timeout=60)


def drop_version(store: Path, tmp: Path, name: str, version: str, handler: str = "rollout_handler.py", **spec: object) -> Path:
    """Build ``name`` ``version`` elsewhere, then rename it into ``store/name/version/`` (how a
    deployment should copy: no scan ever sees it half-written)."""
    build = tmp / f"build-{name}-{version}-{time.monotonic_ns()}"
    build.mkdir(parents=True)
    archive = make_mar(build, name, handler, version=version, **spec)
    target = store / name / version
    target.mkdir(parents=True, exist_ok=True)
    os.replace(archive, target / archive.name)
    return target / archive.name


def versions(srv: Server, name: str) -> dict[str, bool]:
    """version -> is default, as describe shows them ({} when the model is not registered)."""
    reply = _client.get(f"{srv.management}/models/{name}/all")
    if reply.status_code == 404:
        return {}
    return {d["modelVersion"]: _default(srv, name) == d["modelVersion"] for d in reply.json()}


def _default(srv: Server, name: str) -> str | None:
    reply = _client.get(f"{srv.management}/models/{name}")
    return reply.json()[0]["modelVersion"] if reply.status_code == 200 else None


def served(srv: Server, name: str) -> str:
    reply = _client.post(f"{srv.inference}/predictions/{name}", content=b"x")
    assert reply.status_code == 200, reply.text
    return str(reply.json()["version"])


WATCH = "model_store_poll_seconds=1\n"


def test_a_new_version_swaps_in_under_load_with_no_failed_request(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(WATCH, start=False)
    drop_version(srv.store, tmp_path, "m", "1")
    srv.start()
    wait_for(lambda: versions(srv, "m") == {"1": True}, what="version 1 loaded")
    statuses: list[int] = []
    seen: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                reply = client.post(f"{srv.inference}/predictions/m", content=b"x")
                statuses.append(reply.status_code)
                if reply.status_code == 200:
                    seen.add(reply.json()["version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        drop_version(srv.store, tmp_path, "m", "2")
        wait_for(lambda: versions(srv, "m") == {"2": True}, timeout=60, what="version 2 the default, version 1 gone")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {sorted(set(failed))}"
    assert seen == {"1", "2"} and len(statuses) > 50
    # The old version drained and ended; the new one serves.
    states = _client.get(f"{srv.inference}/v1/models/m").json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in states] == [("2", "AVAILABLE"), ("1", "END")]
    described = _client.get(f"{srv.management}/models/m").json()[0]
    assert described["modelUrl"] == "m/2/m.mar"
    log = srv.log.read_text()
    assert "model m: default version is now 2" in log
    assert "model m version 1 unregistered (the version policy (latest 1) no longer serves it)" in log


def test_version_policies_removed_versions_and_inherited_settings(start_server: ServerFactory, tmp_path: Path) -> None:
    policy = json.dumps({"m": {"latest": 2}, "s": {"specific": ["1", "3"]}, "a": "all"})
    srv = start_server(WATCH + f"max_workers=32\nmodel_store_version_policy={policy}\n", start=False)
    for version in ("1", "2", "3"):
        for name in ("m", "s", "a"):
            drop_version(srv.store, tmp_path, name, version)
    srv.start()
    wait_for(lambda: versions(srv, "m") == {"2": False, "3": True}, what="m: latest 2")
    wait_for(lambda: versions(srv, "s") == {"1": False, "3": True}, what="s: specific 1 and 3")
    wait_for(lambda: versions(srv, "a") == {"1": False, "2": False, "3": True}, what="a: all")
    assert served(srv, "m") == "3"
    # The API's settings carry over to new versions: scale m, then add version 4.
    reply = _client.put(f"{srv.management}/models/m/3", params={"min_worker": 2, "synchronous": "true"})
    assert reply.status_code == 200, reply.text
    drop_version(srv.store, tmp_path, "m", "4")
    wait_for(lambda: versions(srv, "m") == {"3": False, "4": True}, what="m: 3 and 4")
    assert _client.get(f"{srv.management}/models/m/4").json()[0]["minWorkers"] == 2
    # Removing the newest version's files: it drains and goes, the default moves back, and the
    # policy brings the next older one back.
    shutil.rmtree(srv.store / "m" / "4")
    wait_for(lambda: versions(srv, "m") == {"2": False, "3": True}, what="m: back to 2 and 3")
    # Removing a model's every version unregisters it.
    shutil.rmtree(srv.store / "s")
    wait_for(lambda: versions(srv, "s") == {}, what="s gone")
    # An archive at the top of the store is a version named by its own manifest.
    make_mar(srv.store, "top", "rollout_handler.py", version="7.0")
    wait_for(lambda: versions(srv, "top") == {"7.0": True}, what="top.mar loaded")
    assert served(srv, "top") == "7.0"


def test_broken_and_half_written_versions_leave_the_serving_version_alone(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(WATCH, start=False)
    drop_version(srv.store, tmp_path, "m", "1")
    srv.start()
    wait_for(lambda: versions(srv, "m") == {"1": True}, what="version 1")
    # A version whose handler cannot be imported: logged, left out, version 1 serves on.
    broken = drop_version(srv.store, tmp_path, "m", "2", handler="mgmt_import_error_handler.py")
    wait_for(lambda: "m/2/m.mar is left out, and retried once it changes" in srv.log.read_text(), what="the failure logged")
    time.sleep(2.5)  # more scans: it is not retried while it is unchanged
    assert srv.log.read_text().count("m/2/m.mar is left out") == 1
    assert versions(srv, "m") == {"1": True} and served(srv, "m") == "1"
    # Temporary names are never looked at.
    good = make_mar(tmp_path, "m", "rollout_handler.py", version="2")
    (srv.store / "m" / "3").mkdir()
    shutil.copy(good, srv.store / "m" / "3" / "m.mar.part")
    # An archive copied in place, slowly: half of it first (it may be tried and fail), then the
    # rest; once complete it loads.
    data = good.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    time.sleep(2.5)
    with open(broken, "ab") as file:
        file.write(data[len(data) // 2 :])
    wait_for(lambda: versions(srv, "m") == {"2": True}, timeout=60, what="the fixed version 2")
    assert served(srv, "m") == "2"
    assert "model m version 3" not in srv.log.read_text()


def test_watched_versions_and_snapshots(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(WATCH, start=False)
    drop_version(srv.store, tmp_path, "m", "1")
    make_mar(srv.store, "other", "rollout_handler.py", version="5.0")
    srv.start()
    wait_for(lambda: versions(srv, "m") == {"1": True}, what="version 1")
    wait_for(lambda: versions(srv, "other") == {"5.0": True}, what="other")
    wait_for(lambda: _client.get(f"{srv.inference}/v1/models/m").status_code == 200, what="m ready")
    assert _client.put(f"{srv.management}/models/m/labels/prod", params={"version": "1"}).status_code == 200
    # An API registration of another model is saved; the watched versions are not: the store brings them back.
    make_mar(tmp_path, "api", "rollout_handler.py", version="1.0")
    (srv.store / "api-dir").mkdir()
    shutil.copy(tmp_path / "api.mar", srv.store / ".api.mar")  # hidden from the watcher
    assert srv.register(".api.mar", model_name="api").status_code == 200
    saved = json.loads((srv.root / "logs" / "config" / "snapshot.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["api"]
    assert saved["rollouts"] == {"m": {"labels": {"prod": "1"}}}
    srv.stop()
    again = start_server(WATCH, root=srv.root)
    # The server is ready once the first scan has loaded the store, and the rollouts are back.
    wait_for(lambda: _client.get(f"{again.inference}/v2/health/ready").status_code == 200, what="ready")
    assert versions(again, "m") == {"1": True}
    assert _client.get(f"{again.management}/models/m/labels").json() == {"prod": "1"}
    assert versions(again, "api") == {"1.0": True}
    # The label pins version 1: version 2 becomes the default, but 1 stays while prod names it.
    drop_version(again.store, tmp_path, "m", "2")
    wait_for(lambda: versions(again, "m") == {"1": False, "2": True}, what="2 the default")
    time.sleep(2.5)
    assert versions(again, "m") == {"1": False, "2": True}
    assert _client.post(f"{again.inference}/predictions/m/labels/prod", content=b"x").json() == {"version": "1"}
    assert _client.delete(f"{again.management}/models/m/labels/prod").status_code == 200
    wait_for(lambda: versions(again, "m") == {"2": True}, what="1 unloaded once nothing names it")
    # A version unregistered through the API stays out while its archive is unchanged; the policy
    # then serves the newest of the others.
    drop_version(again.store, tmp_path, "m", "3")
    wait_for(lambda: versions(again, "m") == {"3": True}, what="3")
    assert _client.delete(f"{again.management}/models/m/3").status_code == 200
    wait_for(lambda: versions(again, "m") == {"2": True}, what="2 back")
    time.sleep(2.5)
    assert versions(again, "m") == {"2": True}


def test_watch_config_is_checked(tmp_path: Path) -> None:
    config = tmp_path / "config.properties"
    config.write_text('model_store_poll_seconds=5\nmodel_store_version_policy={"m": {"latest": 0}}\n')
    with pytest.raises(ConfigError, match="model m: latest must be an integer from 1 to 1000"):
        load_config(config, env={})
    config.write_text("model_store_poll_seconds=5\nmodel_store_watch_urls=s3://bucket/models/\n")
    with pytest.raises(ConfigError, match="does not match any of allowed_urls"):
        load_config(config, env={})
    config.write_text("model_store_poll_seconds=-1\n")
    with pytest.raises(ConfigError, match="model_store_poll_seconds"):
        load_config(config, env={})
    config.write_text('model_store_poll_seconds=5\nmodel_store_version_policy={"*": "all", "m": {"specific": [1, "2.0"]}}\n')
    assert load_config(config, env={}).model_store_poll_seconds == 5
