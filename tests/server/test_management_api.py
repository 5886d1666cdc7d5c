"""The management API against a real server: exact statuses, messages and JSON shapes (surface §5).

Most tests share one module-scoped server; the ``mgmt`` fixture unregisters every model after each
test and checks that no worker process outlives its model, so tests stay independent.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import InProcessServer, Model, Server, ServerFactory, make_mar, wait_for

NOT_FOUND = "Requested resource is not found, please refer to API document."
NOT_ALLOWED = "Requested method is not allowed, please refer to API document."
NO_WORKERS = "Use scale workers API to add workers for the model."


# -- helpers ---------------------------------------------------------------------------------------

# One pooled client: a fresh httpx client per call costs about 80 ms, more than the calls themselves.
_client = httpx.Client(timeout=60)


def call(srv: Server, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return _client.request(method, srv.management + path, **kwargs)


def register(srv: Server, url: str | None, **params: object) -> httpx.Response:
    query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
    if url is not None:
        query["url"] = url
    return call(srv, "POST", "/models", params=query)


def predict(srv: Server, model: str, body: bytes = b"x", version: str | None = None) -> httpx.Response:
    path = f"/predictions/{model}" + (f"/{version}" if version else "")
    return _client.post(srv.inference + path, content=body)


def _assert_torchserve_json(response: httpx.Response) -> Any:
    # TorchServe (Gson) pretty-prints with two spaces and ends the body with a newline.
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert response.text == json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    return body


def assert_error(response: httpx.Response, code: int, type_name: str, message: str) -> None:
    assert response.status_code == code, response.text
    assert _assert_torchserve_json(response) == {"code": code, "type": type_name, "message": message}


def assert_status(response: httpx.Response, code: int, message: str) -> None:
    assert response.status_code == code, response.text
    assert _assert_torchserve_json(response) == {"status": message}


def describe(srv: Server, name: str, version: str | None = None) -> dict[str, Any]:
    response = call(srv, "GET", f"/models/{name}" + (f"/{version}" if version else ""))
    assert response.status_code == 200, response.text
    [description] = response.json()
    return description


def listed(srv: Server, query: str = "") -> dict[str, Any]:
    response = call(srv, "GET", "/models" + query)
    assert response.status_code == 200, response.text
    return _assert_torchserve_json(response)


def pending(srv: Server, name: str) -> int:
    return describe(srv, name)["jobQueueStatus"]["pendingRequests"]


def pick(description: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: description[key] for key in keys}


def ready_pids(srv: Server, name: str, version: str | None = None) -> list[int]:
    return [w["pid"] for w in describe(srv, name, version)["workers"] if w["status"] == "READY"]


def build_version(store: Path, name: str, handler: str, version: str, file_name: str) -> Path:
    """An archive of ``name`` at ``version`` stored as ``file_name``, beside other versions' files."""
    staging = store.parent / f"staging-{file_name}"
    staging.mkdir(exist_ok=True)
    built = make_mar(staging, name, handler, version=version)
    target = store / file_name
    shutil.move(built, target)
    return target


def in_threads(*calls: Callable[[], httpx.Response]) -> Callable[[], list[httpx.Response]]:
    """Start each call in its own thread; the returned function joins them and gives the replies."""
    replies: list[httpx.Response | BaseException | None] = [None] * len(calls)

    def run(i: int, fn: Callable[[], httpx.Response]) -> None:
        try:
            replies[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by join(), in the test's thread
            replies[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for thread in threads:
        thread.start()

    def join() -> list[httpx.Response]:
        for thread in threads:
            thread.join(60)
        for reply in replies:
            if not isinstance(reply, httpx.Response):
                raise AssertionError(f"request failed: {reply!r}")
        return replies  # type: ignore[return-value]

    return join


def unregister_all(srv: Server) -> None:
    for entry in listed(srv)["models"]:
        name = entry["modelName"]
        default = describe(srv, name)["modelVersion"]
        versions = [d["modelVersion"] for d in call(srv, "GET", f"/models/{name}/all").json()]
        # A default version cannot go while others exist (403), so it goes last.
        for version in sorted(versions, key=lambda v: v == default):
            reply = call(srv, "DELETE", f"/models/{name}/{version}")
            assert reply.status_code == 200, reply.text


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_server(start_module_server: ServerFactory) -> Server:
    # file:// URLs are allowed here to exercise the allow-list's positive path; http:// stays refused.
    config = "allowed_urls=file://.*\\\\.mar\n"
    return start_module_server(config, [Model("echo", "echo_handler.py", register=False)], name="mgmt")


@pytest.fixture
def mgmt(module_server: Server) -> Iterator[Server]:
    yield module_server
    unregister_all(module_server)
    # A worker killed while still loading may take a moment to vanish; one that lingers is a leak.
    wait_for(lambda: module_server.worker_pids() == [], timeout=5, what="every worker process to exit")


# -- register --------------------------------------------------------------------------------------


def test_register_from_query_string(mgmt: Server) -> None:
    reply = register(mgmt, "echo.mar", initial_workers=1)
    assert_status(reply, 200, 'Model "echo" Version: 1.0 registered with 1 initial workers')
    answer = predict(mgmt, "echo", b"hello")
    assert answer.status_code == 200 and answer.content == b"hello"
    description = describe(mgmt, "echo")
    assert (description["modelUrl"], description["minWorkers"], description["maxWorkers"]) == ("echo.mar", 1, 1)


def test_register_from_json_body(mgmt: Server) -> None:
    body = {
        "url": "echo.mar",
        "model_name": "echo_json",
        "initial_workers": 1,
        "batch_size": 3,
        "max_batch_delay": 7,
        "synchronous": True,
        "handler": None,  # JSON null means "not given"
    }
    reply = call(mgmt, "POST", "/models", json=body)
    assert_status(reply, 200, 'Model "echo_json" Version: 1.0 registered with 1 initial workers')
    description = describe(mgmt, "echo_json")
    assert (description["batchSize"], description["maxBatchDelay"], len(description["workers"])) == (3, 7, 1)
    assert predict(mgmt, "echo_json", b"json").content == b"json"

    body = {"url": "echo.mar", "model_name": "echo_json_async", "initial_workers": 1, "synchronous": False}
    headers = {"Content-Type": "application/json; charset=utf-8"}
    reply = call(mgmt, "POST", "/models", content=json.dumps(body).encode(), headers=headers)
    assert_status(reply, 202, "Processing worker updates...")
    wait_for(lambda: len(ready_pids(mgmt, "echo_json_async")) == 1, what="the worker to load")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "The JSON body must be an object"),
        (
            b"{not json",
            "Invalid JSON body: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
    ],
)
def test_register_rejects_a_bad_json_body(mgmt: Server, body: bytes, message: str) -> None:
    reply = call(mgmt, "POST", "/models", content=body, headers={"Content-Type": "application/json"})
    assert_error(reply, 400, "BadRequestException", message)


def test_register_json_body_without_url(mgmt: Server) -> None:
    reply = call(mgmt, "POST", "/models", json={"model_name": "x"})
    assert_error(reply, 400, "BadRequestException", "Parameter url is required.")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty url"),
        ("../echo.mar", "Relative path is not allowed in url: ../echo.mar"),
        ("missing.mar", "Model not found at: missing.mar"),
        # The file exists, but only the model store's own entries may be named.
        ("sub/echo.mar", "Model not found at: sub/echo.mar"),
        ("{store}/echo.mar", "Model not found at: {store}/echo.mar"),
        # "." would otherwise name the model store itself as a model directory.
        (".", "Model not found at: ."),
        ("echo\x00.mar", "Model not found at: echo\x00.mar"),
        ("http://example.com/echo.mar", "Given URL http://example.com/echo.mar does not match any allowed URL(s)"),
        ("file:///etc/passwd", "Given URL file:///etc/passwd does not match any allowed URL(s)"),
        ("file:///no/such/echo.mar", "Model not found at: file:///no/such/echo.mar"),
    ],
)
def test_register_refuses_bad_urls(mgmt: Server, url: str, message: str) -> None:
    sub = mgmt.store / "sub"
    sub.mkdir(exist_ok=True)
    shutil.copy(mgmt.store / "echo.mar", sub / "echo.mar")
    url = url.format(store=mgmt.store)
    reply = register(mgmt, url, initial_workers=0)
    assert_error(reply, 404, "ModelNotFoundException", message.format(store=mgmt.store))
    assert listed(mgmt)["models"] == []


def test_register_without_url(mgmt: Server) -> None:
    reply = register(mgmt, None, model_name="echo")
    assert_error(reply, 400, "BadRequestException", "Parameter url is required.")


def test_register_from_an_allowed_file_url(mgmt: Server) -> None:
    url = f"file://{mgmt.store}/echo.mar"
    reply = register(mgmt, url, initial_workers=1)
    assert_status(reply, 200, 'Model "echo" Version: 1.0 registered with 1 initial workers')
    assert describe(mgmt, "echo")["modelUrl"] == url
    assert predict(mgmt, "echo", b"file").content == b"file"


def test_register_twice_is_a_conflict(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    reply = register(mgmt, "echo.mar", initial_workers=0)
    assert_error(reply, 409, "ConflictStatusException", "Model version 1.0 is already registered for model echo")
    # The same archive under another name is another model.
    assert register(mgmt, "echo.mar", model_name="echo2", initial_workers=0).status_code == 200


def test_register_with_zero_workers(mgmt: Server) -> None:
    reply = register(mgmt, "echo.mar", initial_workers=0)
    assert_status(reply, 200, f'Model "echo" Version: 1.0 registered with 0 initial workers. {NO_WORKERS}')
    description = describe(mgmt, "echo")
    assert (description["workers"], description["minWorkers"], description["maxWorkers"]) == ([], 0, 0)
    assert_error(
        predict(mgmt, "echo"),
        503,
        "ServiceUnavailableException",
        'Model "echo" has no worker to serve inference request. Please use scale workers API to add workers. '
        "If this is a sequence inference, please check if it is closed, or expired; "
        "or exceeds maxSequenceJobQueueSize",
    )


def test_register_asynchronously(mgmt: Server) -> None:
    reply = register(mgmt, "echo.mar", initial_workers=1, synchronous=False)
    assert_status(reply, 202, "Processing worker updates...")
    wait_for(lambda: len(ready_pids(mgmt, "echo")) == 1, what="the worker to load")
    assert predict(mgmt, "echo", b"later").content == b"later"


@pytest.mark.parametrize("handler", ["mgmt_failing_handler.py", "mgmt_import_error_handler.py"])
def test_failed_synchronous_registration_rolls_back(mgmt: Server, handler: str) -> None:
    make_mar(mgmt.store, "broken", handler)
    reply = register(mgmt, "broken.mar", initial_workers=2)
    assert reply.status_code == 500, reply.text
    error = reply.json()
    assert error["type"] == "InternalServerException" and error["code"] == 500
    assert error["message"].startswith("Failed to start workers for model broken version: 1.0"), error
    assert_error(call(mgmt, "GET", "/models/broken"), 404, "ModelNotFoundException", "Model not found: broken")
    assert listed(mgmt)["models"] == []
    wait_for(lambda: mgmt.worker_pids() == [], timeout=5, what="the failed workers to exit")
    # Nothing half-registered holds the name: a working archive can take it at once.
    reply = register(mgmt, "echo.mar", model_name="broken", initial_workers=1)
    assert_status(reply, 200, 'Model "broken" Version: 1.0 registered with 1 initial workers')


def test_unregister_during_a_synchronous_registration(mgmt: Server) -> None:
    make_mar(mgmt.store, "slowload", "mgmt_slow_load_handler.py")
    join = in_threads(lambda: register(mgmt, "slowload.mar", initial_workers=2))
    wait_for(lambda: call(mgmt, "GET", "/models/slowload").status_code == 200, what="the registration")
    assert_status(call(mgmt, "DELETE", "/models/slowload"), 200, 'Model "slowload" unregistered')
    [reply] = join()  # must not hang on workers that were stopped before they loaded
    assert reply.status_code == 500, reply.text
    assert reply.json()["message"].startswith("Failed to start workers for model slowload version: 1.0")
    assert_error(call(mgmt, "GET", "/models/slowload"), 404, "ModelNotFoundException", "Model not found: slowload")


def test_register_with_model_name_override(mgmt: Server) -> None:
    reply = register(mgmt, "echo.mar", model_name="renamed", initial_workers=0)
    assert_status(reply, 200, f'Model "renamed" Version: 1.0 registered with 0 initial workers. {NO_WORKERS}')
    assert listed(mgmt)["models"] == [{"modelName": "renamed", "modelUrl": "echo.mar"}]


def test_register_refuses_a_bad_model_name(mgmt: Server) -> None:
    reply = register(mgmt, "echo.mar", model_name="bad name", initial_workers=0)
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"] == "BadRequestException"
    assert listed(mgmt)["models"] == []


def test_register_defaults_and_batching_parameters(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    keys = ("batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout")
    assert pick(describe(mgmt, "echo"), *keys) == {
        "batchSize": 1,
        "maxBatchDelay": 100,
        "responseTimeout": 120,
        "startupTimeout": 120,
    }
    reply = register(mgmt,
        "echo.mar", model_name="tuned", initial_workers=0, batch_size=4, max_batch_delay=25,
        response_timeout=30, startup_timeout=40,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert pick(describe(mgmt, "tuned"), *keys) == {
        "batchSize": 4,
        "maxBatchDelay": 25,
        "responseTimeout": 30,
        "startupTimeout": 40,
    }


def test_model_yaml_sets_defaults_and_api_parameters_win(mgmt: Server, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text("minWorkers: 2\nmaxWorkers: 3\nbatchSize: 4\nmaxBatchDelay: 30\nresponseTimeout: 50\n")
    make_mar(mgmt.store, "yamlmodel", "echo_handler.py", config_file=str(config))
    reply = register(mgmt, "yamlmodel.mar")
    assert_status(reply, 200, 'Model "yamlmodel" Version: 1.0 registered with 2 initial workers')
    keys = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")
    assert pick(describe(mgmt, "yamlmodel"), *keys) == {
        "minWorkers": 2,
        "maxWorkers": 3,
        "batchSize": 4,
        "maxBatchDelay": 30,
        "responseTimeout": 50,
    }
    assert len(ready_pids(mgmt, "yamlmodel")) == 2

    # marserve: an explicit API parameter beats the YAML, timeouts included (TorchServe: YAML wins).
    reply = register(mgmt,
        "yamlmodel.mar", model_name="yaml_api", initial_workers=1, batch_size=8, response_timeout=9
    )
    assert_status(reply, 200, 'Model "yaml_api" Version: 1.0 registered with 1 initial workers')
    assert pick(describe(mgmt, "yaml_api"), *keys) == {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "maxBatchDelay": 30,
        "responseTimeout": 9,
    }


@pytest.mark.parametrize(
    ("yaml_text", "workers"),
    [
        # TorchServe: YAML workers count only when minWorkers > 0 and maxWorkers >= minWorkers.
        ("minWorkers: 0\nmaxWorkers: 0\n", (1, 1)),
        ("minWorkers: 3\nmaxWorkers: 1\n", (1, 1)),
        ("minWorkers: 1\n", (1, 1)),
        ("minWorkers: 0\nmaxWorkers: 2\n", (1, 2)),
    ],
)
def test_model_yaml_worker_bounds_are_consistent(
    mgmt: Server, tmp_path: Path, yaml_text: str, workers: tuple[int, int]
) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text(yaml_text + "maxBatchDelay: 0\n")
    make_mar(mgmt.store, "bounds", "echo_handler.py", config_file=str(config))
    assert register(mgmt, "bounds.mar", synchronous=False).status_code == 202
    description = describe(mgmt, "bounds")
    assert (description["minWorkers"], description["maxWorkers"]) == workers
    # A YAML maxBatchDelay of 0 means "not set" (TorchServe), so the default applies.
    assert description["maxBatchDelay"] == 100


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", "abc", "Invalid value for batch_size: 'abc' (expected an integer)"),
        ("max_batch_delay", "1.5", "Invalid value for max_batch_delay: '1.5' (expected an integer)"),
        ("initial_workers", "two", "Invalid value for initial_workers: 'two' (expected an integer)"),
        ("response_timeout", "x", "Invalid value for response_timeout: 'x' (expected an integer)"),
        ("startup_timeout", "1e3", "Invalid value for startup_timeout: '1e3' (expected an integer)"),
        ("synchronous", "yes", "Invalid value for synchronous: 'yes' (expected true or false)"),
        ("runtime", "java", "Invalid RuntimeType value: java"),
    ],
)
def test_register_refuses_invalid_parameters(mgmt: Server, key: str, value: str, message: str) -> None:
    reply = register(mgmt, "echo.mar", **{key: value})
    assert_error(reply, 400, "BadRequestException", message)
    assert listed(mgmt)["models"] == []


def test_register_a_model_directory(mgmt: Server) -> None:
    make_mar(mgmt.store, "echo_dir", "echo_handler.py", archive_format="no-archive")
    reply = register(mgmt, "echo_dir", initial_workers=1)
    assert_status(reply, 200, 'Model "echo_dir" Version: 1.0 registered with 1 initial workers')
    assert predict(mgmt, "echo_dir", b"dir").content == b"dir"
    assert call(mgmt, "DELETE", "/models/echo_dir").status_code == 200
    # A directory is used in place, so unregistering must leave it alone.
    assert (mgmt.store / "echo_dir" / "MAR-INF" / "MANIFEST.json").is_file()


def test_register_a_tar_gz(mgmt: Server) -> None:
    archive = make_mar(mgmt.store, "echo_tgz", "echo_handler.py", archive_format="tgz")
    assert archive.name == "echo_tgz.tar.gz"
    reply = register(mgmt, "echo_tgz.tar.gz", initial_workers=1)
    assert_status(reply, 200, 'Model "echo_tgz" Version: 1.0 registered with 1 initial workers')
    assert predict(mgmt, "echo_tgz", b"tgz").content == b"tgz"


# -- describe --------------------------------------------------------------------------------------

DESCRIBE_KEYS = [
    "modelName", "modelVersion", "modelUrl", "runtime", "minWorkers", "maxWorkers", "batchSize",
    "maxBatchDelay", "responseTimeout", "startupTimeout", "maxRetryTimeoutInSec", "clientTimeoutInMills",
    "parallelType", "parallelLevel", "deviceType", "continuousBatching", "useJobTicket", "useVenv",
    "stateful", "sequenceMaxIdleMSec", "sequenceTimeoutMSec", "maxNumSequence", "maxSequenceJobQueueSize",
    "loadedAtStartup", "workers", "maxBatchesInFlight", "overlapStages", "autoscaling", "jobQueueStatus", "labels",
]  # fmt: skip
WORKER_KEYS = [
    "id", "startTime", "status", "state", "batchesInFlight", "restarts", "lastExit", "memoryUsage", "pid", "gpu", "gpuUsage",
]


def test_describe_shape(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=1, batch_size=2, max_batch_delay=10).status_code == 200
    response = call(mgmt, "GET", "/models/echo")
    assert response.status_code == 200
    [description] = _assert_torchserve_json(response)
    assert list(description) == DESCRIBE_KEYS
    [worker] = description.pop("workers")
    assert list(worker) == WORKER_KEYS
    assert worker["id"].isdigit()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", worker["startTime"]), worker["startTime"]
    assert worker["status"] == "READY"
    assert worker["pid"] in mgmt.worker_pids()
    assert isinstance(worker["memoryUsage"], int) and worker["memoryUsage"] > 0
    # The suite may run on a GPU host, where the worker gets a GPU.
    device = description.pop("deviceType")
    assert device in ("cpu", "gpu")
    assert (worker["gpu"], worker["gpuUsage"]) == (device == "gpu", "N/A")
    assert description == {
        "modelName": "echo",
        "modelVersion": "1.0",
        "modelUrl": "echo.mar",
        "runtime": "python",
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 2,
        "maxBatchDelay": 10,
        "responseTimeout": 120,
        "startupTimeout": 120,
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": 0,
        "parallelType": "",
        "parallelLevel": 0,
        "continuousBatching": False,
        "useJobTicket": False,
        "useVenv": False,
        "stateful": False,
        "sequenceMaxIdleMSec": 0,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0,
        "loadedAtStartup": False,
        "maxBatchesInFlight": 2,
        "overlapStages": False,
        "autoscaling": {
            "enabled": False, "windowMs": 1000, "cooldownMs": 30000, "scaleUps": 0, "scaleDowns": 0, "lastDecision": None,
        },
        "jobQueueStatus": {"remainingCapacity": 100, "pendingRequests": 0},
        "labels": [],  # marserve's: the version labels that name it
    }

    by_version = describe(mgmt, "echo", "1.0")
    all_versions = call(mgmt, "GET", "/models/echo/all").json()
    assert len(all_versions) == 1
    for other in (by_version, all_versions[0]):
        [other_worker] = other.pop("workers")
        assert other.pop("deviceType") == device
        assert (other_worker["id"], other_worker["pid"]) == (worker["id"], worker["pid"])
        assert other == description


def test_describe_errors(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    assert_error(call(mgmt, "GET", "/models/nope"), 404, "ModelNotFoundException", "Model not found: nope")
    assert_error(call(mgmt, "GET", "/models/nope/all"), 404, "ModelNotFoundException", "Model not found: nope")
    assert_error(call(mgmt, "GET", "/models/nope/1.0"), 404, "ModelNotFoundException", "Model not found: nope")
    assert_error(
        call(mgmt, "GET", "/models/echo/9"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 9 does not exist for model: echo",
    )


# -- scale -----------------------------------------------------------------------------------------


def test_scale_synchronously_up_and_down(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=1).status_code == 200
    reply = call(mgmt, "PUT", "/models/echo", params={"min_worker": 3, "synchronous": "true"})
    assert_status(reply, 200, "Workers scaled to 3 for model: echo")
    description = describe(mgmt, "echo")
    assert (description["minWorkers"], description["maxWorkers"]) == (3, 3)
    pids = ready_pids(mgmt, "echo")
    assert len(pids) == 3 and sorted(pids) == sorted(mgmt.worker_pids())

    reply = call(mgmt, "PUT", "/models/echo/1.0", params={"min_worker": 1, "synchronous": "true"})
    assert_status(reply, 200, "Workers scaled to 1 for model: echo, version: 1.0")
    [kept] = ready_pids(mgmt, "echo")
    # A synchronous scale-down answers once the surplus processes have exited.
    assert mgmt.worker_pids() == [kept]
    assert predict(mgmt, "echo", b"still").content == b"still"


def test_scale_asynchronously(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    reply = call(mgmt, "PUT", "/models/echo", params={"min_worker": 2})
    assert_status(reply, 202, "Processing worker updates...")
    wait_for(lambda: len(ready_pids(mgmt, "echo")) == 2, what="two workers")
    assert predict(mgmt, "echo", b"up").content == b"up"
    # Only workers above max_worker are removed.
    reply = call(mgmt, "PUT", "/models/echo", params={"min_worker": 1, "max_worker": 2, "synchronous": "true"})
    assert_status(reply, 200, "Workers scaled to 1 for model: echo")
    description = describe(mgmt, "echo")
    assert (description["minWorkers"], description["maxWorkers"], len(description["workers"])) == (1, 2, 2)


def test_scale_with_model_version_parameter(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    reply = call(mgmt, "PUT", "/models/echo", params={"min_worker": 0, "model_version": "1.0", "synchronous": "true"})
    assert_status(reply, 200, "Workers scaled to 0 for model: echo, version: 1.0")


def test_scale_errors(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    too_few = {"min_worker": 3, "max_worker": 1}
    message = "max_worker cannot be less than min_worker."
    assert_error(call(mgmt, "PUT", "/models/echo", params=too_few), 400, "BadRequestException", message)
    # The bounds are checked before the model is looked up, as in TorchServe.
    assert_error(call(mgmt, "PUT", "/models/nope", params=too_few), 400, "BadRequestException", message)
    assert_error(call(mgmt, "PUT", "/models/nope"), 404, "ModelNotFoundException", "Model not found: nope")
    assert_error(
        call(mgmt, "PUT", "/models/echo/9"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 9 does not exist for model: echo",
    )
    assert_error(
        call(mgmt, "PUT", "/models/echo", params={"min_worker": "many"}),
        400,
        "BadRequestException",
        "Invalid value for min_worker: 'many' (expected an integer)",
    )
    assert_error(
        call(mgmt, "PUT", "/models/echo", params={"min_worker": -1}),
        400,
        "BadRequestException",
        "min_worker cannot be negative.",
    )
    assert describe(mgmt, "echo")["workers"] == []


def test_scale_up_reports_workers_that_fail_to_load(mgmt: Server) -> None:
    make_mar(mgmt.store, "broken", "mgmt_failing_handler.py")
    assert register(mgmt, "broken.mar", initial_workers=0).status_code == 200
    reply = call(mgmt, "PUT", "/models/broken", params={"min_worker": 1, "synchronous": "true"})
    assert reply.status_code == 500, reply.text
    error = reply.json()
    assert (error["code"], error["type"]) == (500, "InternalServerException")
    assert error["message"].startswith("Failed to start workers for model broken version: 1.0: RuntimeError"), error
    # The model stays registered (only registration rolls back); its worker keeps retrying.
    assert describe(mgmt, "broken")["minWorkers"] == 1


def test_scale_down_answers_requests_in_flight(mgmt: Server, tmp_path: Path) -> None:
    make_mar(mgmt.store, "slow", "mgmt_slow_handler.py")
    assert register(mgmt, "slow.mar", initial_workers=2).status_code == 200
    markers = [tmp_path / "a", tmp_path / "b"]
    join = in_threads(*(lambda m=m: predict(mgmt, "slow", str(m).encode()) for m in markers))
    wait_for(lambda: all(m.exists() for m in markers), what="both requests to reach a worker")
    reply = call(mgmt, "PUT", "/models/slow", params={"min_worker": 1, "synchronous": "true"})
    assert_status(reply, 200, "Workers scaled to 1 for model: slow")
    answers = join()
    assert [(a.status_code, a.content) for a in answers] == [(200, str(m).encode()) for m in markers]
    assert len(mgmt.worker_pids()) == 1


# -- versions, set-default and unregister ----------------------------------------------------------


def test_versions_default_and_unregister(mgmt: Server) -> None:
    make_mar(mgmt.store, "ver", "mgmt_version_handler.py", version="1.0")
    build_version(mgmt.store, "ver", "mgmt_version_handler.py", "2.0", "ver_v2.mar")
    assert register(mgmt, "ver.mar", initial_workers=1).status_code == 200
    reply = register(mgmt, "ver_v2.mar", initial_workers=1)
    assert_status(reply, 200, 'Model "ver" Version: 2.0 registered with 1 initial workers')

    # The first registered version stays the default.
    assert predict(mgmt, "ver").content == b"1.0"
    assert predict(mgmt, "ver", version="2.0").content == b"2.0"
    assert predict(mgmt, "ver", version="1.0").content == b"1.0"
    assert [d["modelVersion"] for d in call(mgmt, "GET", "/models/ver/all").json()] == ["1.0", "2.0"]
    assert listed(mgmt)["models"] == [{"modelName": "ver", "modelUrl": "ver.mar"}]

    reply = call(mgmt, "PUT", "/models/ver/2.0/set-default")
    assert_status(reply, 200, 'Default version successfully updated for model "ver" to "2.0"')
    assert predict(mgmt, "ver").content == b"2.0"
    assert describe(mgmt, "ver")["modelVersion"] == "2.0"
    assert listed(mgmt)["models"] == [{"modelName": "ver", "modelUrl": "ver_v2.mar"}]

    assert_error(
        call(mgmt, "PUT", "/models/ver/9/set-default"),
        404,
        "ModelVersionNotFoundException",
        "Model version 9 does not exist for model ver",
    )
    assert_error(
        call(mgmt, "PUT", "/models/nope/1.0/set-default"), 404, "ModelNotFoundException", "Model not found: nope"
    )

    forbidden = "Cannot remove default version for model ver"
    assert_error(call(mgmt, "DELETE", "/models/ver"), 403, "InvalidModelVersionException", forbidden)
    assert_error(call(mgmt, "DELETE", "/models/ver/2.0"), 403, "InvalidModelVersionException", forbidden)

    [old_pid] = ready_pids(mgmt, "ver", "1.0")
    assert_status(call(mgmt, "DELETE", "/models/ver/1.0"), 200, 'Model "ver" unregistered')
    assert old_pid not in mgmt.worker_pids()
    assert_error(
        predict(mgmt, "ver", version="1.0"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 1.0 does not exist for model: ver",
    )
    assert predict(mgmt, "ver").content == b"2.0"

    assert_status(call(mgmt, "DELETE", "/models/ver"), 200, 'Model "ver" unregistered')
    assert_error(predict(mgmt, "ver"), 404, "ModelNotFoundException", "Model not found: ver")
    assert mgmt.worker_pids() == []
    assert_error(call(mgmt, "DELETE", "/models/ver"), 404, "ModelNotFoundException", "Model not found: ver")


def test_unregister_errors(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    assert_error(call(mgmt, "DELETE", "/models/nope"), 404, "ModelNotFoundException", "Model not found: nope")
    assert_error(
        call(mgmt, "DELETE", "/models/echo/9"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 9 does not exist for model: echo",
    )
    assert_status(call(mgmt, "DELETE", "/models/echo/1.0"), 200, 'Model "echo" unregistered')


def test_failed_new_version_keeps_the_default(mgmt: Server) -> None:
    make_mar(mgmt.store, "ver", "mgmt_version_handler.py", version="1.0")
    build_version(mgmt.store, "ver", "mgmt_failing_handler.py", "2.0", "ver_broken.mar")
    assert register(mgmt, "ver.mar", initial_workers=1).status_code == 200
    reply = register(mgmt, "ver_broken.mar", initial_workers=1)
    assert reply.status_code == 500, reply.text
    assert [d["modelVersion"] for d in call(mgmt, "GET", "/models/ver/all").json()] == ["1.0"]
    assert predict(mgmt, "ver").content == b"1.0"


@pytest.mark.parametrize("depth", [1, 2])
def test_unregister_lets_requests_in_flight_finish(mgmt: Server, tmp_path: Path, depth: int) -> None:
    make_mar(mgmt.store, "slow", "mgmt_slow_handler.py")
    assert register(mgmt, "slow.mar", initial_workers=1, max_batches_in_flight=depth).status_code == 200
    first, second = tmp_path / "first", tmp_path / "second"
    join = in_threads(*(lambda m=m: predict(mgmt, "slow", str(m).encode()) for m in (first, second)))
    # One request in the worker, and one waiting in the queue (depth 1) or held as the worker's
    # next batch (depth 2): both must be answered.
    wait_for(
        lambda: (first.exists() or second.exists())
        and pending(mgmt, "slow") == 2 - depth
        and describe(mgmt, "slow")["workers"][0]["batchesInFlight"] == depth,
        what="one request running and one waiting",
    )
    assert_status(call(mgmt, "DELETE", "/models/slow"), 200, 'Model "slow" unregistered')
    answers = join()
    assert [(a.status_code, a.content) for a in answers] == [(200, str(first).encode()), (200, str(second).encode())]
    assert_error(predict(mgmt, "slow"), 404, "ModelNotFoundException", "Model not found: slow")
    assert mgmt.worker_pids() == []


# -- routing ---------------------------------------------------------------------------------------


def test_api_description(mgmt: Server) -> None:
    for method, path in (("OPTIONS", "/"), ("GET", "/api-description"), ("OPTIONS", "/api-description")):
        response = call(mgmt, method, path)
        assert response.status_code == 200, (method, path)
        document = _assert_torchserve_json(response)
        assert document["openapi"].startswith("3.")
        assert {"/models", "/models/{model_name}"} <= set(document["paths"])


def test_per_model_api_description(mgmt: Server) -> None:
    assert register(mgmt, "echo.mar", initial_workers=0).status_code == 200
    for path in ("/models/echo", "/models/echo/1.0"):
        response = call(mgmt, "OPTIONS", path)
        assert response.status_code == 200, response.text
        document = _assert_torchserve_json(response)
        assert document["openapi"].startswith("3.")
        assert {"/models/echo", "/models/echo/{model_version}"} <= set(document["paths"])
        assert "/models" not in document["paths"]
    assert_error(call(mgmt, "OPTIONS", "/models/nope"), 404, "ModelNotFoundException", "Model not found: nope")


@pytest.mark.parametrize(
    ("method", "path", "code", "type_name", "message"),
    [
        ("GET", "/nope", 404, "ResourceNotFoundException", NOT_FOUND),
        ("GET", "/models/echo/1.0/set-default/extra", 404, "ResourceNotFoundException", NOT_FOUND),
        ("PUT", "/models", 405, "MethodNotAllowedException", NOT_ALLOWED),
        ("DELETE", "/models", 405, "MethodNotAllowedException", NOT_ALLOWED),
        ("POST", "/models/echo", 405, "MethodNotAllowedException", NOT_ALLOWED),
        ("GET", "/models/echo/1.0/set-default", 405, "MethodNotAllowedException", NOT_ALLOWED),
    ],
)
def test_unknown_routes_and_methods(
    mgmt: Server, method: str, path: str, code: int, type_name: str, message: str
) -> None:
    assert_error(call(mgmt, method, path), code, type_name, message)


# -- servers with the default configuration (the list test needs one nobody else registers on) ------


def test_list_sorting_and_pagination(shared_server: Server) -> None:
    server = shared_server
    assert listed(server) == {"models": []}
    make_mar(server.store, "echo", "echo_handler.py")
    names = ["delta", "alpha", "echo", "charlie", "bravo"]
    for name in names:
        assert register(server, "echo.mar", model_name=name, initial_workers=0).status_code == 200
    # Only default versions are listed.
    build_version(server.store, "alpha", "echo_handler.py", "2.0", "alpha_v2.mar")
    assert register(server, "alpha_v2.mar", initial_workers=0).status_code == 200

    everything = [{"modelName": n, "modelUrl": "echo.mar"} for n in sorted(names)]
    body = listed(server)
    assert list(body) == ["models"] and body["models"] == everything

    page = listed(server, "?limit=2")
    assert list(page) == ["nextPageToken", "models"]  # TorchServe's field order
    assert page == {"nextPageToken": "2", "models": everything[:2]}
    assert listed(server, "?limit=2&next_page_token=2") == {"nextPageToken": "4", "models": everything[2:4]}
    assert listed(server, "?limit=2&next_page_token=4") == {"models": everything[4:]}
    assert listed(server, "?limit=5") == {"models": everything}
    assert listed(server, "?next_page_token=99") == {"models": []}
    # Out-of-range values fall back as in TorchServe: limit to 100, the token to 0.
    for query in ("?limit=101", "?limit=-1", "?next_page_token=-3", "?next_page_token=abc"):
        assert listed(server, query) == {"models": everything}, query
    assert_error(
        call(server, "GET", "/models?limit=abc"),
        400,
        "BadRequestException",
        "Invalid value for limit: 'abc' (expected an integer)",
    )


def test_default_allowed_urls_is_empty(shared_server: Server) -> None:
    server = shared_server
    make_mar(server.store, "echo_url", "echo_handler.py")
    url = f"file://{server.store}/echo_url.mar"
    reply = register(server, url, initial_workers=0)
    assert_error(reply, 404, "ModelNotFoundException", f"Given URL {url} does not match any allowed URL(s)")


def test_model_api_can_be_disabled(tmp_path: Path) -> None:
    srv = InProcessServer(tmp_path, config="enable_model_api=false\n").start()
    try:
        make_mar(srv.store, "echo", "echo_handler.py")
        assert_error(register(srv, "echo.mar"), 405, "MethodNotAllowedException", NOT_ALLOWED)
        assert_error(call(srv, "DELETE", "/models/echo"), 405, "MethodNotAllowedException", NOT_ALLOWED)
        # Reading stays available.
        assert listed(srv) == {"models": []}
    finally:
        srv.stop()


def test_one_address_for_both_apis_serves_both_on_one_listener(tmp_path: Path) -> None:
    srv = InProcessServer(tmp_path)
    # A later key wins: management_address now names the inference listener.
    srv.config.write_text(srv.config.read_text() + f"management_address={srv.inference}\n")
    srv.management = srv.inference
    srv.start()
    try:
        make_mar(srv.store, "echo", "echo_handler.py")
        reply = register(srv, "echo.mar", initial_workers=1)
        assert reply.status_code == 200, reply.text
        assert srv.predict("echo", b"one port").content == b"one port"
        assert listed(srv) == {"models": [{"modelName": "echo", "modelUrl": "echo.mar"}]}
        assert srv.http.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
        assert call(srv, "DELETE", "/models/echo").status_code == 200
    finally:
        srv.stop()
