"""Labels, the weighted traffic split and shadow traffic against a real server
(server/models/rollout.py, server/models/shadow.py), over TorchServe's, TF Serving's and the OIP's
REST routes, and their survival across a restart (snapshot)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import Model, Server, ServerFactory, make_mar, wait_for

_client = httpx.Client(timeout=60)


def manage(srv: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return _client.request(method, srv.management + path, **kwargs)  # type: ignore[arg-type]


def infer(srv: Server, path: str, body: bytes = b"x", **kwargs: object) -> httpx.Response:
    return _client.post(srv.inference + path, content=body, **kwargs)  # type: ignore[arg-type]


def served(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["version"])


def two_versions(start_server: ServerFactory, config: str = "") -> Server:
    srv = start_server(config)
    for version in ("1.0", "2.0"):
        make_mar(srv.store, "m", "rollout_handler.py", version=version)
        (srv.store / "m.mar").rename(srv.store / f"m-{version}.mar")
        reply = srv.register(f"m-{version}.mar", initial_workers=1)
        assert reply.status_code == 200, reply.text
    return srv


def metric(srv: Server, name: str, **labels: str) -> float:
    text = _client.get(srv.metrics + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_labels_name_versions_everywhere_a_version_can_be_named(start_server: ServerFactory) -> None:
    srv = two_versions(start_server)
    reply = manage(srv, "PUT", "/models/m/labels/canary", params={"version": "2.0"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"status": "Label canary of model m now names version 2.0"}
    assert manage(srv, "PUT", "/models/m/labels/prod", params={"version": "1.0"}).status_code == 200
    assert manage(srv, "GET", "/models/m/labels").json() == {"canary": "2.0", "prod": "1.0"}
    # Describe shows each version's labels.
    described = {d["modelVersion"]: d["labels"] for d in manage(srv, "GET", "/models/m/all").json()}
    assert described == {"1.0": ["prod"], "2.0": ["canary"]}

    assert served(infer(srv, "/predictions/m")) == "1.0"  # the default: the first registered
    assert served(infer(srv, "/predictions/m/labels/canary")) == "2.0"
    assert served(infer(srv, "/predictions/m/labels/prod")) == "1.0"
    # TF Serving's REST forms, with the kserve envelope.
    body = json.dumps({"instances": ["x"]}).encode()
    reply = infer(srv, "/v1/models/m/labels/canary:predict", body)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"predictions": [{"version": "2.0"}]}
    assert infer(srv, "/v1/models/m/versions/1.0:predict", body).json() == {"predictions": [{"version": "1.0"}]}
    # OIP: a label in place of a version.
    v2 = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    assert infer(srv, "/v2/models/m/labels/canary/infer", json.dumps(v2).encode()).status_code == 200

    # Status: KServe's name and ready beside TF Serving's model_version_status.
    status = _client.get(srv.inference + "/v1/models/m").json()
    assert status["name"] == "m" and status["ready"] is True
    assert [(s["version"], s["state"]) for s in status["model_version_status"]] == [("2.0", "AVAILABLE"), ("1.0", "AVAILABLE")]
    assert status["model_version_status"][0]["status"] == {"error_code": "OK", "error_message": ""}
    one = _client.get(srv.inference + "/v1/models/m/labels/prod").json()
    assert one["model_version_status"] == [{"version": "1.0", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]

    # Unknown labels and versions.
    reply = infer(srv, "/predictions/m/labels/nope")
    assert reply.status_code == 404 and reply.json()["message"] == "Label nope does not exist for model m"
    assert infer(srv, "/v1/models/m/labels/nope:predict", body).json() == {"error": "Label nope does not exist for model m"}
    assert manage(srv, "PUT", "/models/m/labels/x", params={"version": "9.0"}).status_code == 404
    assert manage(srv, "PUT", "/models/m/labels/bad:label", params={"version": "1.0"}).status_code == 400
    assert manage(srv, "PUT", "/models/m/labels/x").status_code == 400  # no version

    # A labelled version cannot be unregistered until the label goes.
    reply = manage(srv, "DELETE", "/models/m/2.0")
    assert reply.status_code == 409, reply.text
    assert "named by label canary" in reply.json()["message"]
    assert manage(srv, "DELETE", "/models/m/labels/canary").json() == {"status": "Label canary of model m removed"}
    assert manage(srv, "DELETE", "/models/m/labels/canary").status_code == 404
    assert manage(srv, "DELETE", "/models/m/2.0").status_code == 200
    # The version that left shows as END for a while.
    states = _client.get(srv.inference + "/v1/models/m").json()["model_version_status"]
    assert ("2.0", "END") in [(s["version"], s["state"]) for s in states]
    assert metric(srv, "marserve_routed_requests_total", model_name="m", model_version="2.0", route="label") == 3
    assert metric(srv, "marserve_routed_requests_total", model_name="m", model_version="1.0", route="explicit") == 1


def test_traffic_split_weights_and_sticky_keys(start_server: ServerFactory) -> None:
    srv = two_versions(start_server)
    reply = manage(srv, "PUT", "/models/m/traffic", json={"1.0": 70, "2.0": 30})
    assert reply.status_code == 200, reply.text
    assert manage(srv, "GET", "/models/m/traffic").json() == {"1.0": 70, "2.0": 30}
    counts = Counter(served(infer(srv, "/predictions/m")) for _ in range(300))
    assert 150 < counts["1.0"] < 260 and 40 < counts["2.0"] < 150, counts
    # Requests that name a version or a label are not split.
    assert {served(infer(srv, "/predictions/m/2.0")) for _ in range(10)} == {"2.0"}
    # The same route key always reaches the same version; different keys spread.
    for key in ("alice", "bob", "carol"):
        assert len({served(infer(srv, "/predictions/m", headers={"x-route-key": key})) for _ in range(15)}) == 1
    by_key = {served(infer(srv, "/predictions/m", headers={"x-route-key": f"user-{i}"})) for i in range(60)}
    assert by_key == {"1.0", "2.0"}
    # KServe v1 and OIP requests without a version are split too.
    body = json.dumps({"instances": ["x"]}).encode()
    v1 = Counter(infer(srv, "/v1/models/m:predict", body).json()["predictions"][0]["version"] for _ in range(60))
    assert set(v1) == {"1.0", "2.0"}
    assert metric(srv, "marserve_routed_requests_total", model_name="m", model_version="2.0", route="split") > 0

    # All to the canary, then the split removed: back to the default.
    manage(srv, "PUT", "/models/m/traffic", json={"1.0": 0, "2.0": 100})
    assert {served(infer(srv, "/predictions/m")) for _ in range(20)} == {"2.0"}
    # A version in the split cannot be unregistered.
    assert manage(srv, "DELETE", "/models/m/2.0").status_code == 409
    assert manage(srv, "PUT", "/models/m/traffic", content=b"{}").json() == {"status": "Traffic split of model m removed"}
    assert {served(infer(srv, "/predictions/m")) for _ in range(10)} == {"1.0"}
    # Bad splits.
    for bad in ({"9.0": 10}, {"1.0": -1}, {"1.0": 0}, {"1.0": "ten"}, ["1.0"]):
        assert manage(srv, "PUT", "/models/m/traffic", json=bad).status_code in (400, 404), bad
    assert manage(srv, "PUT", "/models/m/traffic", content=b"{").status_code == 400


def test_shadow_traffic_is_measured_and_never_reaches_the_client(start_server: ServerFactory) -> None:
    srv = two_versions(start_server)
    reply = manage(srv, "PUT", "/models/m/shadow", json={"version": "2.0", "percent": 100})
    assert reply.status_code == 200, reply.text
    # The client gets the primary's answer only.
    assert {served(infer(srv, "/predictions/m")) for _ in range(20)} == {"1.0"}
    for _ in range(10):
        assert infer(srv, "/predictions/m", b"same").json() == {"same": True}
    # Explicit versions are not mirrored.
    assert served(infer(srv, "/predictions/m/1.0")) == "1.0"

    def stats() -> dict[str, object]:
        return manage(srv, "GET", "/models/m/shadow").json()["stats"]  # type: ignore[no-any-return]

    wait_for(lambda: stats()["answered"] == 30, what="the shadow's 30 answers")
    shadow = manage(srv, "GET", "/models/m/shadow").json()
    assert shadow["version"] == "2.0" and shadow["percent"] == 100
    s = shadow["stats"]
    assert (s["mirrored"], s["errors"], s["compared"], s["differ"]) == (30, 0, 30, 20)
    assert s["differRate"] == pytest.approx(20 / 30, abs=1e-5)
    assert s["meanLatencyMs"] > 0
    assert metric(srv, "marserve_shadow_requests_total", model_name="m", model_version="2.0", outcome="differ") == 20
    assert metric(srv, "marserve_shadow_requests_total", model_name="m", model_version="2.0", outcome="match") == 10
    assert metric(srv, "marserve_routed_requests_total", model_name="m", model_version="2.0", route="shadow") == 30
    assert metric(srv, "marserve_shadow_duration_seconds_count", model_name="m", model_version="2.0") == 30

    # A shadow with no worker: errors counted, the primary untouched.
    assert manage(srv, "PUT", "/models/m/2.0", params={"min_worker": 0, "synchronous": "true"}).status_code == 200
    manage(srv, "PUT", "/models/m/shadow", json={"version": "2.0", "percent": 100})
    assert {served(infer(srv, "/predictions/m")) for _ in range(5)} == {"1.0"}
    s = manage(srv, "GET", "/models/m/shadow").json()["stats"]
    assert (s["mirrored"], s["errors"], s["refused"]) == (5, 5, 5)
    assert manage(srv, "DELETE", "/models/m/shadow").json() == {"status": "Shadow of model m removed"}
    assert manage(srv, "GET", "/models/m/shadow").json() == {}
    for bad in ({"version": "2.0", "percent": 0}, {"version": "2.0", "percent": 101}, {"percent": 5}, {"version": "2.0", "x": 1}):
        assert manage(srv, "PUT", "/models/m/shadow", json=bad).status_code == 400, bad
    assert manage(srv, "PUT", "/models/m/shadow", json={"version": "9.0"}).status_code == 404


def test_a_slow_shadow_does_not_slow_the_client(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = two_versions(start_server)
    yaml = tmp_path / "slow.yaml"
    yaml.write_text("rollout: {sleep_s: 3}\n")
    make_mar(srv.store, "m", "rollout_handler.py", version="3.0", config_file=str(yaml))
    assert srv.register("m.mar", initial_workers=1).status_code == 200
    manage(srv, "PUT", "/models/m/shadow", json={"version": "3.0", "percent": 100})
    started = time.monotonic()
    assert served(infer(srv, "/predictions/m")) == "1.0"
    assert time.monotonic() - started < 2.0  # the shadow takes 3 s
    s = manage(srv, "GET", "/models/m/shadow").json()["stats"]
    assert (s["mirrored"], s["answered"]) == (1, 0)
    wait_for(lambda: manage(srv, "GET", "/models/m/shadow").json()["stats"]["answered"] == 1, what="the shadow's answer")
    assert manage(srv, "GET", "/models/m/shadow").json()["stats"]["meanLatencyMs"] >= 3000


def test_rollouts_survive_a_restart(start_server: ServerFactory) -> None:
    srv = two_versions(start_server)
    manage(srv, "PUT", "/models/m/labels/prod", params={"version": "1.0"})
    manage(srv, "PUT", "/models/m/traffic", json={"1.0": 90, "2.0": 10})
    manage(srv, "PUT", "/models/m/shadow", json={"version": "2.0", "percent": 25})
    saved = json.loads((srv.root / "logs" / "config" / "snapshot.json").read_text())
    assert saved["rollouts"] == {
        "m": {"labels": {"prod": "1.0"}, "traffic": {"1.0": 90, "2.0": 10}, "shadow": {"version": "2.0", "percent": 25.0}}
    }
    srv.stop()
    again = start_server(root=srv.root)
    wait_for(lambda: _client.get(again.inference + "/v1/models/m").status_code == 200, what="m ready again")
    assert manage(again, "GET", "/models/m/labels").json() == {"prod": "1.0"}
    assert manage(again, "GET", "/models/m/traffic").json() == {"1.0": 90, "2.0": 10}
    assert manage(again, "GET", "/models/m/shadow").json()["percent"] == 25


def test_torchserve_routes_are_unchanged_without_rollouts(start_server: ServerFactory) -> None:
    srv = start_server(models=[Model("echo", "echo_handler.py")])
    assert srv.predict("echo", b"hi").content == b"hi"
    assert _client.post(srv.inference + "/predictions/echo/1.0", content=b"hi").content == b"hi"
    assert _client.post(srv.inference + "/predictions/echo/1.0/extra/path", content=b"hi").content == b"hi"
    assert manage(srv, "GET", "/models/echo").json()[0]["labels"] == []
    assert manage(srv, "GET", "/models/echo/traffic").json() == {}
