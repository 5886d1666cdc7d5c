"""TLS: https addresses served with certificate_file and private_key_file, on all three APIs."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import InProcessServer, Server, make_mar

OPENSSL = "/usr/bin/openssl"


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl CLI."""
    if not Path(OPENSSL).exists():
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key_file), "-out", str(cert_file), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert_file, key_file


def tls_server(root: Path, cert: tuple[Path, Path], https: tuple[bool, bool, bool]) -> Server:
    """A Server whose addresses are https where ``https`` says (inference, management, metrics);
    its client trusts ``cert``."""
    srv = InProcessServer(root, config=f"certificate_file={cert[0]}\nprivate_key_file={cert[1]}\n")
    text = srv.config.read_text()
    for key, secure in zip(("inference", "management", "metrics"), https):
        if secure:
            plain = getattr(srv, key)
            setattr(srv, key, plain.replace("http://", "https://"))
            text = text.replace(f"{key}_address={plain}", f"{key}_address={getattr(srv, key)}")
    srv.config.write_text(text)
    return srv


def trusting_client(srv: Server, cert: tuple[Path, Path]) -> None:
    srv.http.close()
    srv.http = httpx.Client(verify=ssl.create_default_context(cafile=cert[0]), timeout=30)


@pytest.fixture
def trust(cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx's default clients read SSL_CERT_FILE (a subprocess Server's start polls /ping with one).
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))


@pytest.fixture
def https_server(tmp_path: Path, cert: tuple[Path, Path], trust: None) -> Iterator[Server]:
    srv = tls_server(tmp_path, cert, (True, True, True))
    trusting_client(srv, cert)
    srv.start()
    yield srv
    srv.stop()


def test_all_three_apis_over_https(https_server: Server, cert: tuple[Path, Path]) -> None:
    srv = https_server
    assert srv.inference.startswith("https://") and srv.management.startswith("https://")
    make_mar(srv.store, "echo", "echo_handler.py")
    assert srv.register("echo.mar").status_code == 200
    response = srv.predict("echo", b"over tls")
    assert (response.status_code, response.content) == (200, b"over tls")
    assert response.extensions["http_version"] == b"HTTP/1.1"
    assert srv.http.get(f"{srv.management}/models").json()["models"][0]["modelName"] == "echo"
    metrics = srv.http.get(f"{srv.metrics}/metrics")
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text
    # TLS really is on: a client that does not trust the certificate is refused, and plain
    # http to an https port gets no HTTP answer.
    # (An SSLContext with no CA loaded: the default one would read SSL_CERT_FILE, set above.)
    with httpx.Client(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), timeout=10) as untrusting:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.get(f"{srv.inference}/ping")
    for address in (srv.inference, srv.management, srv.metrics):
        with pytest.raises(httpx.HTTPError):
            httpx.get(address.replace("https://", "http://") + "/ping", timeout=10)


def test_only_https_addresses_use_tls(tmp_path: Path, cert: tuple[Path, Path], trust: None) -> None:
    srv = tls_server(tmp_path, cert, (True, False, False))
    trusting_client(srv, cert)
    srv.start()
    try:
        assert srv.http.get(f"{srv.inference}/ping").status_code == 200
        with httpx.Client(timeout=10) as plain:
            assert plain.get(f"{srv.management}/models").status_code == 200
            assert plain.get(f"{srv.metrics}/metrics").status_code == 200
    finally:
        srv.stop()


def run_serve(srv: Server) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        srv.command("--start", "--foreground"), env=srv.env, cwd=srv.root, capture_output=True, text=True, timeout=60
    )


def test_https_without_certificate_stops_startup(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    srv.config.write_text(srv.config.read_text().replace("inference_address=http://", "inference_address=https://"))
    result = run_serve(srv)
    assert result.returncode == 1
    assert result.stderr == (
        "serve: error: invalid configuration: "
        "inference_address is https, which needs certificate_file and private_key_file\n"
    )
    srv.http.close()


def test_unusable_certificate_stops_startup(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    srv = tls_server(tmp_path, (broken, cert[1]), (False, True, False))
    result = run_serve(srv)
    assert result.returncode == 1
    assert f"cannot use certificate_file {broken} with private_key_file {cert[1]}" in result.stdout + result.stderr
    srv.http.close()
