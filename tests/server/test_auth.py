"""Token authorization (surface §5.8): real servers for the HTTP behaviour, an injected clock for expiry."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.http.auth import TokenAuth, is_loopback, tokens_required
from server.config import ServerConfig
from tests.conftest import Server, ServerFactory, make_mar, wait_for

FAILED = {
    "code": 401,
    "type": "InvalidKeyException",
    "message": "Token Authentication failed. Token either incorrect, expired, or not provided correctly",
}


def keys(server: Server) -> dict[str, Any]:
    return json.loads((server.root / "key_file.json").read_text())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == FAILED
    assert response.text == json.dumps(FAILED, indent=2) + "\n"


def wait_for_log(server: Server, text: str, timeout: float = 5.0) -> str:
    wait_for(lambda: text in server.log.read_text(), timeout, f"{text!r} in the log")
    return server.log.read_text()


# Servers here are serve processes: token authorization writes key_file.json into the server's
# working directory, which only a process of its own has.


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    server = start_module_server("disable_token_authorization=false\n", name="auth", subprocess=True)
    make_mar(server.store, "echo", "echo_handler.py")
    registered = server.http.post(
        f"{server.management}/models", params={"url": "echo.mar"}, headers=bearer(keys(server)["management"]["key"])
    )
    assert registered.status_code == 200, registered.text
    return server


@pytest.fixture(scope="module")
def shared_server(start_module_server: ServerFactory) -> Server:
    """The default server, as a serve process, so that where its key file would be is its own."""
    return start_module_server(subprocess=True)


# -- on loopback, by default, tokens are off ---------------------------------------------------------


def test_default_loopback_server_needs_no_token(shared_server: Server) -> None:
    assert shared_server.http.get(f"{shared_server.management}/models").status_code == 200
    assert shared_server.http.post(f"{shared_server.inference}/predictions/nope").status_code == 404
    assert not (shared_server.root / "key_file.json").exists()
    # Nothing to rotate: /token is not a route (TorchServe: 404 too).
    assert shared_server.http.get(f"{shared_server.management}/token", params={"type": "inference"}).status_code == 404


# -- tokens on ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer not-the-key",
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer {inference} extra",
        "{inference}",
        "Bearer {management}",  # another API's key
        "Bearer {API}",
        "Bearer caf\u00e9",
    ],
)
def test_predictions_without_the_inference_key_get_401(srv: Server, header: str | None) -> None:
    current = {kind: entry["key"] for kind, entry in keys(srv).items()}
    headers = {} if header is None else {"Authorization": header.format(**current).encode()}
    assert_refused(srv.http.post(f"{srv.inference}/predictions/echo", content=b"hi", headers=headers))
    # Unknown models and paths too: without the key, nothing says what exists.
    assert_refused(srv.http.post(f"{srv.inference}/predictions/nope", headers=headers))
    assert_refused(srv.http.request("OPTIONS", f"{srv.inference}/predictions/echo", headers=headers))


@pytest.mark.parametrize("key", [None, "wrong", "inference", "API"])
def test_management_without_the_management_key_gets_401(srv: Server, key: str | None) -> None:
    headers = {} if key is None else bearer(keys(srv).get(key, {"key": key})["key"])
    assert_refused(srv.http.get(f"{srv.management}/models", headers=headers))
    assert_refused(srv.http.get(f"{srv.management}/models/echo", headers=headers))
    assert_refused(srv.http.post(f"{srv.management}/models", params={"url": "echo.mar"}, headers=headers))
    assert_refused(srv.http.delete(f"{srv.management}/models/echo", headers=headers))


def test_the_right_keys_are_accepted(srv: Server) -> None:
    current = keys(srv)
    predicted = srv.http.post(f"{srv.inference}/predictions/echo", content=b"hi", headers=bearer(current["inference"]["key"]))
    assert predicted.status_code == 200 and predicted.content == b"hi"
    # Any spacing after "Bearer", and the scheme in any case (RFC 7235).
    spaced = {"Authorization": f"bearer   {current['inference']['key']}"}
    assert srv.http.post(f"{srv.inference}/predictions/echo", content=b"x", headers=spaced).status_code == 200
    listed = srv.http.get(f"{srv.management}/models", headers=bearer(current["management"]["key"]))
    assert listed.status_code == 200
    assert listed.json()["models"][0]["modelName"] == "echo"


def test_health_descriptions_and_metrics_need_no_token(srv: Server) -> None:
    assert srv.http.get(f"{srv.inference}/ping").json() == {"status": "Healthy"}
    for base in (srv.inference, srv.management, srv.metrics):
        assert srv.http.request("OPTIONS", f"{base}/").json()["openapi"] == "3.0.1"
    assert srv.http.get(f"{srv.inference}/api-description").status_code == 200
    assert srv.http.get(f"{srv.metrics}/metrics").status_code == 200


def test_refusals_are_access_logged(srv: Server) -> None:
    refused = srv.http.post(f"{srv.inference}/predictions/echo", content=b"hi")
    request_id = refused.headers["x-request-id"]
    log = wait_for_log(srv, request_id)
    assert '"POST /predictions/echo" 401' in next(line for line in log.splitlines() if request_id in line)


def test_key_file_is_private_and_holds_torchserve_shape(srv: Server) -> None:
    path = srv.root / "key_file.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    content = keys(srv)
    assert list(content) == ["management", "inference", "API"]
    assert list(content["API"]) == ["key"]
    for kind in ("management", "inference"):
        assert list(content[kind]) == ["key", "expiration time"]
        expires = datetime.strptime(content[kind]["expiration time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        left = expires.replace(tzinfo=UTC) - datetime.now(UTC)
        assert 0 < left.total_seconds() <= 60 * 60  # token_expiration_min defaults to 60
    values = [content[kind]["key"] for kind in content]
    assert len(set(values)) == 3
    for value in values:
        assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) * 8 >= 128


def test_get_token_rotates_a_key_with_the_api_key(srv: Server) -> None:
    before = keys(srv)
    api = bearer(before["API"]["key"])
    rotated = srv.http.get(f"{srv.management}/token", params={"type": "inference"}, headers=api)
    assert rotated.status_code == 200
    assert rotated.text == "\n"  # TorchServe's body; the key is in the file
    after = keys(srv)
    assert after["inference"]["key"] != before["inference"]["key"]
    assert after["management"] == before["management"] and after["API"] == before["API"]
    assert stat.S_IMODE((srv.root / "key_file.json").stat().st_mode) == 0o600
    assert not [p for p in srv.root.iterdir() if p.name.startswith(".key_file.json")], "temp file left behind"
    old = srv.http.post(f"{srv.inference}/predictions/echo", content=b"hi", headers=bearer(before["inference"]["key"]))
    assert_refused(old)
    new = srv.http.post(f"{srv.inference}/predictions/echo", content=b"hi", headers=bearer(after["inference"]["key"]))
    assert new.status_code == 200

    assert srv.http.get(f"{srv.management}/token", params={"type": "management"}, headers=api).status_code == 200
    assert_refused(srv.http.get(f"{srv.management}/models", headers=bearer(after["management"]["key"])))
    assert srv.http.get(f"{srv.management}/models", headers=bearer(keys(srv)["management"]["key"])).status_code == 200


def test_get_token_needs_the_api_key_and_a_type(srv: Server) -> None:
    current = keys(srv)
    for key in (None, current["management"]["key"], current["inference"]["key"]):
        headers = {} if key is None else bearer(key)
        assert_refused(srv.http.get(f"{srv.management}/token", params={"type": "inference"}, headers=headers))
    assert keys(srv) == current
    api = bearer(current["API"]["key"])
    missing = srv.http.get(f"{srv.management}/token", headers=api)
    assert missing.status_code == 400
    assert missing.json() == {
        "code": 400, "type": "BadRequestException", "message": "Parameter type is required: management or inference"
    }
    for bad in ("API", "Inference", ""):
        wrong = srv.http.get(f"{srv.management}/token", params={"type": bad}, headers=api)
        assert wrong.status_code == 400
        assert wrong.json()["type"] == "BadRequestException"
    assert keys(srv) == current


# -- when tokens are on, and the key file's life ---------------------------------------------------------


def _bind_all_interfaces(server: Server) -> None:
    # Listens on every interface, but the test talks to it only through 127.0.0.1.
    with server.config.open("a") as config:
        config.write(f"inference_address=http://0.0.0.0:{server.ports[0]}\n")


def test_non_loopback_bind_turns_tokens_on_with_a_warning(tmp_path: Path) -> None:
    server = Server(tmp_path)
    _bind_all_interfaces(server)
    server.start()
    try:
        log = wait_for_log(server, "listening beyond loopback")
        line = next(line for line in log.splitlines() if "listening beyond loopback" in line)
        assert "WARNING" in line and f"0.0.0.0:{server.ports[0]}" in line
        assert "token authorization is on" in line and str(tmp_path / "key_file.json") in line
        assert_refused(server.http.get(f"{server.management}/models"))
        assert server.http.get(f"{server.management}/models", headers=bearer(keys(server)["management"]["key"])).status_code == 200
    finally:
        server.stop()
    assert not (tmp_path / "key_file.json").exists()


def test_tokens_disabled_on_a_non_loopback_bind_warn_louder(tmp_path: Path) -> None:
    server = Server(tmp_path, args=("--disable-token-auth",))
    _bind_all_interfaces(server)
    server.start()
    try:
        assert server.http.get(f"{server.management}/models").status_code == 200
        log = wait_for_log(server, "SECURITY")
        line = next(line for line in log.splitlines() if "SECURITY" in line)
        assert "ERROR" in line and "token authorization disabled" in line
        assert not (tmp_path / "key_file.json").exists()
    finally:
        server.stop()


def test_serve_stop_deletes_the_key_file(tmp_path: Path) -> None:
    server = Server(tmp_path, "disable_token_authorization=false\n")
    started = subprocess.run(server.command("--start"), env=server.env, cwd=server.root, capture_output=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        assert (tmp_path / "key_file.json").exists()
    finally:
        stopped = subprocess.run(server.command("--stop"), env=server.env, cwd=server.root, capture_output=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / "key_file.json").exists()


def test_unwritable_key_file_fails_the_start_in_one_line(tmp_path: Path) -> None:
    server = Server(tmp_path, "disable_token_authorization=false\n")
    (tmp_path / "key_file.json").mkdir()  # a directory cannot be replaced by the key file
    result = subprocess.run(
        server.command("--start", "--foreground"), env=server.env, cwd=server.root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert "cannot write the token key file" in result.stdout + result.stderr


# -- TokenAuth on its own: expiry with an injected clock, parsing, the decision ------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _published(tmp_path: Path, clock: Clock, minutes: int = 1) -> tuple[TokenAuth, dict[str, Any]]:
    auth = TokenAuth(tmp_path / "key_file.json", minutes, clock=clock)
    auth.publish()
    return auth, json.loads((tmp_path / "key_file.json").read_text())


def test_keys_expire_after_token_expiration_min_but_the_api_key_never(tmp_path: Path) -> None:
    clock = Clock()
    auth, content = _published(tmp_path, clock, minutes=2)
    inference = f"Bearer {content['inference']['key']}".encode()
    api = f"Bearer {content['API']['key']}".encode()
    assert content["inference"]["expiration time"] == "2023-11-14T22:15:20.000000Z"  # start + 2 min
    clock.now += 119.9
    assert auth.allows("inference", inference)
    clock.now += 0.1
    assert not auth.allows("inference", inference)
    clock.now += 10 * 365 * 86400
    assert auth.allows("API", api)
    auth.rotate("inference")
    renewed = json.loads((tmp_path / "key_file.json").read_text())["inference"]
    assert auth.allows("inference", f"Bearer {renewed['key']}".encode())
    clock.now += 120
    assert not auth.allows("inference", f"Bearer {renewed['key']}".encode())


def test_a_rotation_that_cannot_be_written_keeps_the_old_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    auth, content = _published(home, Clock())
    (home / "key_file.json").unlink()
    home.rmdir()
    with pytest.raises(OSError):
        auth.rotate("management")
    assert auth.allows("management", f"Bearer {content['management']['key']}".encode())


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        _published(tmp_path, Clock())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key_file.json").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key_file.json"]


def test_withdraw_deletes_the_key_file(tmp_path: Path) -> None:
    auth, _ = _published(tmp_path, Clock())
    auth.withdraw()
    assert not (tmp_path / "key_file.json").exists()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("localhost", True), ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
        ("example.com", False), ("", False),
    ],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("settings", "required"),
    [
        ({}, False),
        ({"disable_token_authorization": "false"}, True),
        ({"inference_address": "http://0.0.0.0:8080"}, True),
        ({"metrics_address": "http://[::]:8082"}, True),
        ({"metrics_address": "http://0.0.0.0:8082", "enable_metrics_api": "false"}, False),
        ({"management_address": "http://localhost:8081"}, False),
        ({"inference_address": "http://0.0.0.0:8080", "disable_token_authorization": "true"}, False),
    ],
)
def test_when_tokens_are_required(settings: dict[str, str], required: bool) -> None:
    assert tokens_required(ServerConfig.from_properties(settings)) is required
