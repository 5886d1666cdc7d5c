"""Replicas behind a real load balancer (haproxy, loopback only): every request is answered while
each server in turn is stopped (SIGTERM, as Kubernetes stops a pod) and started again."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.conftest import make_mar


def _scale_out() -> ModuleType:
    bench = Path(__file__).parents[2] / "scripts" / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))  # scale_out imports its neighbour ports.py, as when run as a script
    path = bench / "scale_out.py"
    spec = importlib.util.spec_from_file_location("scale_out", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


scale_out = _scale_out()
pytestmark = pytest.mark.skipif(
    not scale_out.haproxy_available(), reason="haproxy is not installed (scripts/test installs Debian's package)"
)


class Load:
    """Clients sending requests through the balancer until stopped, recording every answer."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.answers: list[int | str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(self.url, content=f"client {index}".encode())
                    self.answers.append(response.status_code if response.content == f"client {index}".encode() else response.text)
                except httpx.HTTPError as exc:
                    self.answers.append(repr(exc))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_every_request_is_answered_through_a_rolling_restart(tmp_path: Path) -> None:
    store = tmp_path / "model-store"
    store.mkdir()
    # Answers after a short pause (30 ms), so that requests are in flight when a server stops.
    handler = tmp_path / "pause_handler.py"
    handler.write_text(
        "import time\n\n\ndef handle(data, context):\n    if data is None:\n        return None\n"
        "    time.sleep(0.03)\n    return [row.get('body') for row in data]\n"
    )
    make_mar(store, "echo", str(handler))
    backends = [scale_out.Backend(tmp_path / f"s{i}", store, "echo=echo.mar") for i in range(3)]
    balancer = scale_out.Balancer(tmp_path, backends)
    try:
        for backend in backends:
            backend.start()
        balancer.start()
        with Load(f"{balancer.url}/predictions/echo") as load:
            time.sleep(1)
            for backend in backends:
                # Kubernetes' rolling update: stop one (it drains), start its replacement, wait
                # until it is ready, go on to the next.
                before = len(load.answers)
                assert backend.stop() == 0, backend.log.read_text()[-3000:]
                backend.start()
                time.sleep(1)  # haproxy's checks see it up (rise 2, every 300 ms)
                assert len(load.answers) > before, "requests kept being answered"
        failures = [a for a in load.answers if a != 200]
        assert not failures, f"{len(failures)} of {len(load.answers)} failed: {failures[:5]}"
        assert len(load.answers) > 100
    finally:
        balancer.stop()
        for backend in backends:
            backend.stop()
