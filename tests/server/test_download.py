"""Registering from http:// URLs against a real server and a real archive host on 127.0.0.1.

The archive host is a ``http.server`` in a thread that records every request it gets, so a test
can prove that a refused URL never reached the network.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import InProcessServer, Server, ServerFactory, make_mar, wait_for

MAX_DOWNLOAD = 64 * 1024
TOO_BIG = 4 * MAX_DOWNLOAD


class ArchiveHost:
    """Serves ``/models/<anything>.mar`` as one archive, plus the special paths ``_route`` lists."""

    def __init__(self, archive: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.archive = archive
        self.paths: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                host.paths.append(self.path)
                try:
                    host._route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server under test hung up, as it should for an oversized body

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _route(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.partition("?")[0]
        if path.startswith("/redirect-to/"):
            request.send_response(302)
            request.send_header("Location", path[len("/redirect-to/") :].replace("PORT", str(self.port)))
            request.send_header("Content-Length", "0")
            request.end_headers()
        elif path == "/models/big.mar":
            # Declares its size: refused before a byte of the body is read.
            request.send_response(200)
            request.send_header("Content-Length", str(TOO_BIG))
            request.end_headers()
            request.wfile.write(b"\0" * TOO_BIG)
        elif path == "/models/stream.mar":
            # HTTP/1.0 without Content-Length: the body ends when the connection closes.
            request.send_response(200)
            request.end_headers()
            for _ in range(TOO_BIG // 4096):
                request.wfile.write(b"\0" * 4096)
        elif path == "/models/garbage.mar":
            self._send(request, 200, b"not an archive")
        elif path.startswith("/models/") and path.endswith(".mar"):
            self._send(request, 200, self.archive)
        else:
            self._send(request, 404, b"no such file")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArchiveHost]:
    built = make_mar(tmp_path_factory.mktemp("archives"), "echo", "echo_handler.py")
    archive_host = ArchiveHost(built.read_bytes())
    yield archive_host
    archive_host.close()


# Regexes in config.properties: "\\." is an escaped "\." for the regex.
ALLOWED = ",".join(
    [
        r"http://127\\.0\\.0\\.1:\\d+/(models|redirect-to)/.*",
        r"http://localhost:\\d+/models/.*",
        r"http://169\\.254\\.169\\.254/.*",
        r"http://\\[fd00:ec2::254\\]/.*",
        r"http://\\[::ffff:169\\.254\\.169\\.254\\]/.*",
        r"http://100\\.100\\.100\\.200/.*",
        r"http://0\\.0\\.0\\.0:\\d+/.*",
        r"http://224\\.0\\.0\\.1/.*",
        r"http://169\\.254\\.1\\.1/.*",
        r"http://\\[fe80::1\\]/.*",
        r"ftp://127\\.0\\.0\\.1/.*",
    ]
)


@pytest.fixture(scope="module")
def module_server(start_module_server: ServerFactory) -> Server:
    return start_module_server(f"allowed_urls={ALLOWED}\nmax_download_size={MAX_DOWNLOAD}\n", name="download")


@pytest.fixture
def srv(module_server: Server, host: ArchiveHost) -> Iterator[Server]:
    host.paths.clear()
    yield module_server
    for entry in module_server.http.get(f"{module_server.management}/models").json()["models"]:
        reply = module_server.http.delete(f"{module_server.management}/models/{entry['modelName']}")
        assert reply.status_code == 200, reply.text


def assert_error(reply: httpx.Response, code: int, type_name: str, message: str) -> None:
    assert reply.status_code == code, reply.text
    assert reply.json() == {"code": code, "type": type_name, "message": message}


def store_files(srv: Server) -> list[str]:
    """The model store's entries, hidden partial downloads included."""
    return sorted(p.name for p in srv.store.iterdir())


def failed(url: str, reason: str) -> str:
    return f"Failed to download archive from: {url}: {reason}"


# -- the allow-list and the other checks come first ------------------------------------------------


def test_a_url_outside_allowed_urls_never_reaches_the_network(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/private/echo.mar"
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 404, "ModelNotFoundException", f"Given URL {url} does not match any allowed URL(s)")
    assert host.paths == []
    assert store_files(srv) == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/models/../models/echo.mar", "Relative path is not allowed in url: {url}"),
        ("/models/sub/..", "Relative path is not allowed in url: {url}"),
    ],
)
def test_dot_dot_is_refused_before_anything(srv: Server, host: ArchiveHost, path: str, message: str) -> None:
    url = host.base + path
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 404, "ModelNotFoundException", message.format(url=url))
    assert host.paths == []
    assert store_files(srv) == []


def test_a_url_without_a_file_name_is_refused(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/models/"
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 400, "DownloadArchiveException", failed(url, "the URL's path does not end in a file name"))
    assert host.paths == []


def test_only_http_and_https_are_downloaded(srv: Server) -> None:
    url = "ftp://127.0.0.1/models/echo.mar"
    reply = srv.register(url, initial_workers=0)
    assert_error(
        reply, 400, "DownloadArchiveException", failed(url, "only http://, https:// and s3:// URLs can be downloaded")
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/x.mar", "169.254.169.254: a cloud metadata address"),
        ("http://[fd00:ec2::254]/x.mar", "fd00:ec2::254: a cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/x.mar", "::ffff:169.254.169.254: a cloud metadata address"),
        ("http://100.100.100.200/x.mar", "100.100.100.200: a cloud metadata address"),
        ("http://0.0.0.0:{port}/models/x.mar", "0.0.0.0: an unspecified address"),
        ("http://224.0.0.1/x.mar", "224.0.0.1: a multicast address"),
        ("http://169.254.1.1/x.mar", "169.254.1.1: a link-local address"),
        ("http://[fe80::1]/x.mar", "fe80::1: a link-local address"),
    ],
)
def test_forbidden_addresses_are_refused_without_connecting(
    srv: Server, host: ArchiveHost, url: str, why: str
) -> None:
    url = url.format(port=host.port)
    started = time.monotonic()
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 400, "DownloadArchiveException", failed(url, f"refused to connect to {why}"))
    # Connecting to an unanswering address would take the 10 s connect timeout at least;
    # 0.0.0.0 would even reach the archive host.
    assert time.monotonic() - started < 8
    assert host.paths == []
    assert store_files(srv) == []


# -- downloads -------------------------------------------------------------------------------------


def test_an_allowed_url_is_downloaded_registered_and_served(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/models/served.mar?token=abc"
    reply = srv.register(url, model_name="served", initial_workers=1)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"status": 'Model "served" Version: 1.0 registered with 1 initial workers'}
    assert host.paths == ["/models/served.mar?token=abc"]
    # Saved in the model store under the URL's file name, as TorchServe does.
    assert store_files(srv) == ["served.mar"]
    assert (srv.store / "served.mar").read_bytes() == host.archive
    assert srv.predict("served", b"downloaded").content == b"downloaded"
    [description] = srv.http.get(f"{srv.management}/models/served").json()
    assert description["modelUrl"] == url

    # The same file name again: TorchServe's 500, and the existing file is left alone.
    reply = srv.register(url, model_name="again", initial_workers=0)
    assert_error(reply, 500, "InternalServerException", "Model file already exists served.mar")
    assert host.paths == ["/models/served.mar?token=abc"]

    # Unregistering removes the downloaded archive, so the URL can be registered again.
    assert srv.http.delete(f"{srv.management}/models/served").status_code == 200
    assert store_files(srv) == []
    assert srv.register(url, model_name="served", initial_workers=0).status_code == 200


def test_a_redirect_to_the_same_host_is_followed(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/redirect-to/http://127.0.0.1:PORT/models/moved.mar"
    reply = srv.register(url, model_name="moved", initial_workers=0)
    assert reply.status_code == 200, reply.text
    assert host.paths == [url[len(host.base) :], "/models/moved.mar"]
    # The file is named after the URL that was registered, not the redirect's target.
    assert store_files(srv) == ["moved.mar"]


def test_a_relative_redirect_is_followed(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/redirect-to//models/relative.mar"
    reply = srv.register(url, model_name="relative", initial_workers=0)
    assert reply.status_code == 200, reply.text
    assert store_files(srv) == ["relative.mar"]


def test_a_redirect_to_another_host_is_refused(srv: Server, host: ArchiveHost) -> None:
    # localhost is the same machine, and allowed, but another host name: a redirect may not switch.
    url = f"{host.base}/redirect-to/http://localhost:PORT/models/other.mar"
    reply = srv.register(url, initial_workers=0)
    target = f"http://localhost:{host.port}/models/other.mar"
    assert_error(
        reply, 400, "DownloadArchiveException", failed(url, f"refused a redirect to another host: {target}")
    )
    assert host.paths == [url[len(host.base) :]]
    assert store_files(srv) == []


def test_a_redirect_outside_allowed_urls_is_refused(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/redirect-to/http://127.0.0.1:PORT/private/echo.mar"
    reply = srv.register(url, initial_workers=0)
    target = f"http://127.0.0.1:{host.port}/private/echo.mar"
    message = failed(url, f"refused a redirect to {target}: it does not match any allowed URL(s)")
    assert_error(reply, 400, "DownloadArchiveException", message)
    assert host.paths == [url[len(host.base) :]]


def test_a_redirect_loop_ends(srv: Server, host: ArchiveHost) -> None:
    # Each hop redirects to the same URL again.
    url = f"{host.base}/redirect-to/http://127.0.0.1:PORT/redirect-to/loop.mar"
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 400, "DownloadArchiveException", failed(url, "more than 5 redirects"))
    assert len(host.paths) == 6
    assert store_files(srv) == []


@pytest.mark.parametrize("name", ["big.mar", "stream.mar"])
def test_an_archive_over_max_download_size_is_refused(srv: Server, host: ArchiveHost, name: str) -> None:
    url = f"{host.base}/models/{name}"
    reply = srv.register(url, initial_workers=0)
    message = failed(url, f"the archive is larger than max_download_size ({MAX_DOWNLOAD} bytes)")
    assert_error(reply, 400, "DownloadArchiveException", message)
    # No partial file is left, not even a hidden one.
    assert store_files(srv) == []


def test_an_http_error_is_a_download_failure(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/models/missing.txt"
    reply = srv.register(url, initial_workers=0)
    assert_error(reply, 400, "DownloadArchiveException", failed(url, "the server answered 404 Not Found"))
    assert store_files(srv) == []


def test_an_unreachable_host_is_a_download_failure(srv: Server) -> None:
    # Port 1: nothing listens there (binding it takes root), so the connection is refused.
    url = "http://127.0.0.1:1/models/gone.mar"
    reply = srv.register(url, initial_workers=0)
    assert reply.status_code == 400, reply.text
    assert reply.json()["message"].startswith(failed(url, "could not connect to 127.0.0.1"))
    assert store_files(srv) == []


def test_a_downloaded_file_that_is_no_archive_is_removed(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/models/garbage.mar"
    reply = srv.register(url, initial_workers=0)
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"] == "InvalidModelException"
    assert store_files(srv) == []


def test_a_failed_load_removes_the_downloaded_file(srv: Server, host: ArchiveHost) -> None:
    url = f"{host.base}/models/badhandler.mar"
    reply = srv.register(url, model_name="badhandler", handler="no_such_handler_module", initial_workers=1)
    assert reply.status_code == 500, reply.text
    assert reply.json()["message"].startswith("Failed to start workers for model badhandler")
    assert store_files(srv) == []


def test_an_existing_store_file_is_never_overwritten(srv: Server, host: ArchiveHost) -> None:
    (srv.store / "kept.mar").write_bytes(b"the admin's own file")
    try:
        reply = srv.register(f"{host.base}/models/kept.mar", initial_workers=0)
        assert_error(reply, 500, "InternalServerException", "Model file already exists kept.mar")
        # Checked before any request is made.
        assert host.paths == []
        assert (srv.store / "kept.mar").read_bytes() == b"the admin's own file"
    finally:
        (srv.store / "kept.mar").unlink()


def test_a_url_registered_at_startup_is_downloaded(tmp_path: Path, host: ArchiveHost) -> None:
    url = f"{host.base}/models/startup.mar"
    config = f"allowed_urls={ALLOWED}\nload_models=startup={url}\n"
    srv = InProcessServer(tmp_path, config=config).start()
    try:
        wait_for(lambda: srv.predict("startup", b"up").status_code == 200, 30, "the model to serve")
        assert store_files(srv) == ["startup.mar"]
    finally:
        srv.stop()
    # Kept at shutdown, as TorchServe keeps it.
    assert store_files(srv) == ["startup.mar"]


# -- https -----------------------------------------------------------------------------------------


@pytest.fixture
def tls_host(tmp_path: Path, host: ArchiveHost) -> Iterator[tuple[ArchiveHost, Path]]:
    """An https archive host whose self-signed certificate names localhost only."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    archive_host = ArchiveHost(host.archive, tls=context)
    yield archive_host, cert
    archive_host.close()


def test_https_verifies_the_host_name_while_connecting_to_the_checked_address(
    tmp_path: Path, tls_host: tuple[ArchiveHost, Path]
) -> None:
    archive_host, cert = tls_host
    allowed = r"https://(localhost|127\\.0\\.0\\.1):\\d+/models/.*"
    # A serve process: the frontend trusts the certificate authorities its own environment names.
    srv = Server(tmp_path / "server", config=f"allowed_urls={allowed}\n")
    srv.env["SSL_CERT_FILE"] = str(cert)  # trust the test's certificate authority
    srv.start()
    try:
        # The connection goes to 127.0.0.1, while SNI and verification use the name localhost.
        url = f"https://localhost:{archive_host.port}/models/tls.mar"
        reply = srv.register(url, model_name="tls", initial_workers=0)
        assert reply.status_code == 200, reply.text
        assert store_files(srv) == ["tls.mar"]
        # The certificate names localhost, not 127.0.0.1: verification is on.
        url = f"https://127.0.0.1:{archive_host.port}/models/bare.mar"
        reply = srv.register(url, model_name="bare", initial_workers=0)
        assert reply.status_code == 400, reply.text
        assert reply.json()["message"].startswith(failed(url, "could not connect to 127.0.0.1: "))
        assert "CERTIFICATE_VERIFY_FAILED" in reply.json()["message"]
        assert store_files(srv) == ["tls.mar"]
    finally:
        srv.stop()


def test_a_downloaded_model_is_restored_from_the_store_after_a_restart(tmp_path: Path, host: ArchiveHost) -> None:
    config = f"allowed_urls={ALLOWED}\n"
    srv = InProcessServer(tmp_path, config=config).start()
    try:
        url = f"{host.base}/models/kept.mar"
        assert srv.register(url, model_name="kept", initial_workers=1).status_code == 200
    finally:
        srv.stop()
    host.paths.clear()
    srv = InProcessServer(tmp_path, config=config).start()
    try:
        wait_for(lambda: srv.predict("kept", b"back").status_code == 200, 30, "the model to serve")
        # Registered again from the file kept in the store: nothing fetched, no "already exists".
        assert host.paths == []
        assert store_files(srv) == ["kept.mar"]
    finally:
        srv.stop()
