"""Readiness that tells the truth: a model version is ready when one of its workers has its model
loaded; the server is ready when every version that should have workers has one; live while the
frontend serves. Checked on the OIP and KServe v1 routes, and with Triton's client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as triton

from tests.conftest import Server, ServerFactory, make_mar, wait_for

http = httpx.Client(timeout=60)


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    http.close()


def server_ready(srv: Server) -> tuple[int, object]:
    response = http.get(f"{srv.inference}/v2/health/ready")
    return response.status_code, response.json()


def model_ready(srv: Server, name: str) -> bool:
    """The model's readiness, as OIP and KServe v1 both say it (and they must agree)."""
    while True:
        # Asked twice over OIP around the KServe v1 call: the state may change between two calls.
        v2 = http.get(f"{srv.inference}/v2/models/{name}/ready")
        v1 = http.get(f"{srv.inference}/v1/models/{name}")
        if http.get(f"{srv.inference}/v2/models/{name}/ready").status_code == v2.status_code:
            break
    answer = {"name": name, "ready": v2.status_code == 200}
    # KServe v1 adds TF Serving's model_version_status, which names the states of the versions.
    assert v2.json() == {key: v1.json()[key] for key in answer} == answer
    assert {state["state"] for state in v1.json()["model_version_status"]} >= {"AVAILABLE" if answer["ready"] else "LOADING"}
    assert v1.status_code == v2.status_code in (200, 503)
    return v2.status_code == 200


def worker_states(srv: Server, name: str) -> list[str]:
    described = http.get(f"{srv.management}/models/{name}").json()
    return [worker["state"] for worker in described[0]["workers"]]


def test_a_model_that_fails_to_load_is_not_ready(start_server: ServerFactory) -> None:
    srv = start_server(name="ready-failing")
    make_mar(srv.store, "echo", "echo_handler.py")
    make_mar(srv.store, "bad", "mgmt_failing_handler.py")
    assert srv.register("echo.mar").status_code == 200
    assert server_ready(srv) == (200, {"ready": True})
    # Asynchronously, so that the registration stands while its worker fails and retries.
    assert srv.register("bad.mar", synchronous=False).status_code == 202
    wait_for(lambda: "FAILED" in worker_states(srv, "bad"), what="the failing worker")
    assert not model_ready(srv, "bad")
    assert model_ready(srv, "echo")
    assert server_ready(srv) == (503, {"ready": False})
    client = triton.InferenceServerClient(url=srv.inference.removeprefix("http://"))
    try:
        assert client.is_server_live()
        assert not client.is_server_ready()
        assert not client.is_model_ready("bad")
        assert client.is_model_ready("echo")
    finally:
        client.close()
    # Liveness is the frontend's, and /ping keeps TorchServe's meaning.
    assert http.get(f"{srv.inference}/v2/health/live").json() == {"live": True}
    assert http.get(f"{srv.inference}/ping").status_code == 200
    # Once it is gone, the server is ready again.
    assert http.delete(f"{srv.management}/models/bad").status_code == 200
    assert server_ready(srv) == (200, {"ready": True})


def test_a_model_without_workers_is_not_counted(start_server: ServerFactory) -> None:
    srv = start_server(name="ready-zero")
    make_mar(srv.store, "idle", "echo_handler.py")
    assert srv.register("idle.mar", initial_workers=0).status_code == 200
    assert not model_ready(srv, "idle")
    assert server_ready(srv) == (200, {"ready": True})
    scaled = http.put(f"{srv.management}/models/idle", params={"min_worker": 1, "synchronous": "true"})
    assert scaled.status_code == 200, scaled.text
    assert model_ready(srv, "idle")
    scaled = http.put(f"{srv.management}/models/idle", params={"min_worker": 0, "max_worker": 0, "synchronous": "true"})
    assert scaled.status_code == 200, scaled.text
    assert not model_ready(srv, "idle")
    assert server_ready(srv) == (200, {"ready": True})


def test_ready_once_the_model_has_loaded(start_server: ServerFactory) -> None:
    srv = start_server(name="ready-slow")
    assert server_ready(srv) == (200, {"ready": True})  # no models: nothing to wait for
    make_mar(srv.store, "slow", "mgmt_slow_load_handler.py")
    assert srv.register("slow.mar", synchronous=False).status_code == 202
    # Its worker takes about two seconds to load: registered, but not ready yet.
    assert not model_ready(srv, "slow")
    assert server_ready(srv) == (503, {"ready": False})
    wait_for(lambda: model_ready(srv, "slow"), what="the slow model to load")
    assert worker_states(srv, "slow") == ["READY"]
    assert server_ready(srv) == (200, {"ready": True})


def test_a_version_is_ready_on_its_own(start_server: ServerFactory) -> None:
    srv = start_server(name="ready-versions")
    make_mar(srv.store, "m", "echo_handler.py", version="1.0")
    assert srv.register("m.mar").status_code == 200
    make_mar(srv.store, "m", "echo_handler.py", version="2.0")
    assert srv.register("m.mar", initial_workers=0).status_code == 200
    assert http.get(f"{srv.inference}/v2/models/m/versions/1.0/ready").status_code == 200
    not_ready = http.get(f"{srv.inference}/v2/models/m/versions/2.0/ready")
    assert (not_ready.status_code, not_ready.json()) == (503, {"name": "m", "ready": False})
    # The unversioned paths follow the default version.
    assert model_ready(srv, "m")
