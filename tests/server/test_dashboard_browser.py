"""The dashboard in headless Chromium: what a person sees, while traffic flows and a worker dies.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no
extra package). ``scripts/test`` installs Debian's ``chromium`` where it can; without it these tests
skip, saying so. ``MARSERVE_DASHBOARD_SCREENSHOT=path.png`` also writes the screenshot there, after
a minute of traffic so that the latency chart has a history (the README's is made this way).
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import http.server
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.apis.dashboard import page
from tests.conftest import Model, Server, ServerFactory, wait_for

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed: scripts/test installs Debian's package (apt-get install -y chromium) "
    "where it runs as root; elsewhere install it, or point $CHROMIUM at a Chromium binary",
)
SCREENSHOT_TO = os.environ.get("MARSERVE_DASHBOARD_SCREENSHOT")


class Browser:
    """One headless Chromium with one page, driven over the DevTools protocol on a pipe."""

    def __init__(self, log: Path, width: int = 1280, height: int = 900) -> None:
        assert CHROMIUM is not None
        self.profile = tempfile.mkdtemp(prefix="marserve-chromium-")
        # Chromium reads commands from fd 3 and writes replies to fd 4; the pipes move up out of the
        # way first, and bash (dash cannot name fds above 9) puts them in place for the exec.
        to_browser, self._commands = (self._high(fd) for fd in os.pipe())
        self._replies, from_browser = (self._high(fd) for fd in os.pipe())
        flags = (
            "--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --disable-background-networking "
            "--disable-component-update --disable-sync --no-first-run --no-default-browser-check "
            f"--hide-scrollbars --user-data-dir={self.profile} --remote-debugging-pipe"
        )
        command = f"exec {CHROMIUM} {flags} about:blank 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-"
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                ["bash", "-c", command], pass_fds=(to_browser, from_browser), stdout=out, stderr=subprocess.STDOUT
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._ids = 0
        self.events: list[dict[str, Any]] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    @staticmethod
    def _high(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(fd)
        return moved

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed its pipe (exit {self.process.poll()})")
                self._buffer += chunk
            line, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(line)
            if reply.get("id") == self._ids:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]
            if "method" in reply:
                self.events.append(reply)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, self.session, **params)

    def open(self, url: str, *, scripts: bool = True) -> None:
        self.call("Emulation.setScriptExecutionDisabled", value=not scripts)
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.js("document.readyState") == "complete", 15, f"{url} to load")

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """What the page reported as wrong: exceptions, console errors (a CSP refusal is one)."""
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"]))
            elif event["method"] == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                found.append(event["params"]["entry"]["text"])
        return found

    def screenshot(self, path: Path) -> None:
        """The whole page, however long."""
        height = self.js("document.documentElement.scrollHeight")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=int(height), deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        shutil.rmtree(self.profile, ignore_errors=True)


class Traffic:
    """Requests to each model, a few a second, in a thread, until stopped."""

    def __init__(self, server: Server, bodies: dict[str, bytes], every: float = 0.05) -> None:
        self.server, self.bodies, self.every = server, bodies, every
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # http.client rather than httpx: httpx logs every request, and these are many.
        host, port = self.server.inference.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            while not self._stop.is_set():
                for name, body in self.bodies.items():
                    try:
                        connection.request("POST", f"/predictions/{name}", body)
                        connection.getresponse().read()
                        self.sent += 1
                    except (OSError, http.client.HTTPException):
                        connection.close()
                self._stop.wait(self.every)
        finally:
            connection.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module")
def srv(start_module_server: ServerFactory) -> Server:
    models = [
        Model("echo", "echo_handler.py", batch_size=4, max_batch_delay=10),
        Model("slow", "inf_batch_handler.py", version="2.0"),
    ]
    return start_module_server(models=models, name="dashboard-browser")


@pytest.fixture(scope="module")
def traffic(srv: Server) -> Iterator[Traffic]:
    flow = Traffic(srv, {"echo": b"hello", "slow": b"sleep:0.03"})
    yield flow
    flow.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chrome = Browser(tmp_path / "chromium.log")
    yield chrome
    chrome.close()


def models_shown(browser: Browser) -> dict[str, dict[str, Any]]:
    """Each model version section as the page shows it: its rate, and its workers' rows."""
    return browser.js(  # type: ignore[no-any-return]
        """Object.fromEntries([...document.querySelectorAll('section.model')].map(s => [
            s.dataset.model + ':' + s.dataset.version, {
              rate: s.querySelector('.requests .v').dataset.value,
              rateText: s.querySelector('.requests .v').textContent,
              p50: s.querySelector('.p50 .v').textContent,
              workers: [...s.querySelectorAll('tr[data-worker]')].map(r => ({
                id: r.dataset.worker, state: r.querySelector('.state').textContent, pid: r.querySelector('.pid').textContent,
                restarts: r.querySelector('.restarts').textContent, exit: r.querySelector('.exit').title}))}]))"""
    )


def updates(browser: Browser) -> int:
    return int(browser.js("document.body.dataset.updates || '0'"))


def test_the_page_shows_both_models_their_workers_and_their_traffic(srv: Server, traffic: Traffic, browser: Browser) -> None:
    browser.open(f"{srv.metrics}/dashboard?refresh=0.5")
    # Refreshed by the script (not only rendered by the server), with rates from two polls or more.
    wait_for(lambda: updates(browser) >= 3, 20, "the script to refresh the page")

    def busy() -> dict[str, dict[str, Any]] | None:
        shown = models_shown(browser)
        rates = [float(m["rate"] or 0) for m in shown.values()]
        return shown if len(rates) == 2 and all(r > 0 for r in rates) else None

    shown: Any = wait_for(busy, 20, "non-zero request rates for both models")
    assert set(shown) == {"echo:1.0", "slow:2.0"}
    for name, m in shown.items():
        assert [w["state"] for w in m["workers"]] == ["READY"], (name, m)
        assert m["rateText"].endswith("/s") and m["p50"].endswith("ms"), m
    assert int(shown["echo:1.0"]["workers"][0]["pid"]) in srv.worker_pids()
    text = browser.js("document.getElementById('app').textContent")
    for words in ("Open connections", "Responses", "Refused", "Host CPU", "Uptime", "Batch sizes, last minute"):
        assert words in text
    assert "live" in browser.js("document.getElementById('live').textContent")
    assert browser.errors() == []  # the script ran under the page's content security policy


def test_a_killed_worker_is_shown_restarting_then_ready(srv: Server, traffic: Traffic, browser: Browser) -> None:
    browser.open(f"{srv.metrics}/dashboard?refresh=0.5")
    wait_for(lambda: updates(browser) >= 1, 20, "the script to refresh the page")
    (before,) = models_shown(browser)["echo:1.0"]["workers"]
    assert before["state"] == "READY"
    seen: list[str] = []

    def replaced(restarts: str) -> Any:
        def shown() -> dict[str, Any] | None:
            (now,) = models_shown(browser)["echo:1.0"]["workers"]
            if not seen or seen[-1] != now["state"]:
                seen.append(now["state"])
            return now if now["state"] == "READY" and now["restarts"] == restarts else None

        return wait_for(shown, 60, "the page to show the worker READY again")

    # The first death of a worker that had served is repaired at once (forked from the worker
    # template); a second soon after waits its backoff, and the page shows it RESTARTING.
    os.kill(int(before["pid"]), signal.SIGKILL)
    middle = replaced("1")
    assert middle["pid"] != before["pid"] and "SIGKILL" in middle["exit"]
    seen.clear()
    os.kill(int(middle["pid"]), signal.SIGKILL)
    after = replaced("2")
    assert "RESTARTING" in seen, seen  # shown while it was being replaced
    assert seen[-1] == "READY" and after["pid"] != middle["pid"]
    assert "SIGKILL" in after["exit"]
    assert browser.errors() == []


def test_without_javascript_the_page_still_reads(srv: Server, traffic: Traffic, browser: Browser) -> None:
    browser.open(f"{srv.metrics}/dashboard", scripts=False)
    shown = models_shown(browser)
    assert set(shown) == {"echo:1.0", "slow:2.0"}
    assert all(w["state"] in ("READY", "RESTARTING", "STARTING") for m in shown.values() for w in m["workers"])
    assert updates(browser) == 0
    assert "as of" in browser.js("document.getElementById('live').textContent")


class Static:
    """An HTTP server answering ``/dashboard`` and ``/dashboard/status`` from one fixed status."""

    def __init__(self, status: dict[str, Any]) -> None:
        body = json.dumps(status).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/dashboard/status"):
                    content, kind = body, "application/json"
                else:
                    content, kind = page.render(status, refresh=0.25, nonce="n").encode(), "text/html; charset=utf-8"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_script_draws_exactly_what_the_server_draws(srv: Server, traffic: Traffic, browser: Browser) -> None:
    """page.py and dashboard.js render the same status to the same markup, chart and numbers included."""
    wait_for(lambda: srv.http.get(f"{srv.metrics}/dashboard/status").json()["models"][0]["history"], 30, "a history point")
    status = srv.http.get(f"{srv.metrics}/dashboard/status").json()
    # What this host lacks, and what must be escaped, and numbers that end in a half.
    status["server"]["hostname"] = "<b>host</b> & 'friends'"
    status["server"]["gpus"] = [{"id": "0", "utilization_percent": 37.25, "memory_used_bytes": 3 * 2**30, "memory_percent": 12.25}]
    status["models"].append({**status["models"][0], "name": "none", "workers": [], "history": [], "latency_ms": None})
    static = Static(status)
    try:
        browser.open(f"{static.url}/dashboard", scripts=False)
        served = browser.js("document.getElementById('app').innerHTML.trim()")
        browser.open(f"{static.url}/dashboard")
        wait_for(lambda: updates(browser) >= 1, 20, "the script to redraw the page")
        drawn = browser.js("document.getElementById('app').innerHTML.trim()")
    finally:
        static.close()
    assert "<path" in served and "GPU 0" in served and "&lt;b&gt;host" in served
    assert drawn == served
    assert browser.errors() == []


def test_works_behind_a_proxy_under_a_prefix(srv: Server, traffic: Traffic, browser: Browser, tmp_path: Path) -> None:
    """Relative URLs: served as /ops/marserve/dashboard/ by a proxy, the page polls through the proxy."""

    target = srv.metrics
    seen: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            if not self.path.startswith("/ops/marserve/"):
                self.send_error(404)
                return
            reply = httpx.get(target + self.path.removeprefix("/ops/marserve"))
            self.send_response(reply.status_code)
            for name in ("content-type", "content-security-policy"):
                if name in reply.headers:
                    self.send_header(name, reply.headers[name])
            self.send_header("content-length", str(len(reply.content)))
            self.end_headers()
            self.wfile.write(reply.content)

        def log_message(self, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        browser.open(f"http://127.0.0.1:{proxy.server_address[1]}/ops/marserve/dashboard/?refresh=0.5")
        wait_for(lambda: updates(browser) >= 2, 20, "the script to refresh the page through the proxy")
        assert "/ops/marserve/dashboard/status" in seen
        assert all(p.startswith("/ops/marserve/") for p in seen if p != "/favicon.ico"), seen
        assert set(models_shown(browser)) == {"echo:1.0", "slow:2.0"}
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_screenshot_is_saved(srv: Server, traffic: Traffic, browser: Browser, tmp_path: Path) -> None:
    browser.open(f"{srv.metrics}/dashboard?refresh=0.5")
    # Long enough for points on the latency chart (one per 5 s of polling); two minutes for the README's.
    seconds = 120 if SCREENSHOT_TO else 12
    deadline = time.monotonic() + seconds
    wait_for(lambda: time.monotonic() > deadline, seconds + 5, "the chart to fill")
    assert browser.js("document.querySelectorAll('#latency path').length") >= 2  # p50 and p99 of a model at least
    shot = tmp_path / "dashboard.png"
    browser.screenshot(shot)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    print(f"dashboard screenshot: {shot}")
    if SCREENSHOT_TO:
        shutil.copyfile(shot, SCREENSHOT_TO)
    assert browser.errors() == []
