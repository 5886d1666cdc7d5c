"""Loopback ports for the servers that tests and benchmarks start.

A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, which every outgoing
connection (a test's client, haproxy's health checks, a worker's socket) also draws its source port
from. Between the moment a port is chosen and the moment a server binds it, or while a server is
restarted on the same ports, such a connection can take it, and the server fails with "address
already in use" (CI saw exactly this). So ports are drawn below the ephemeral range, where the kernel
never picks a source port, and never handed out twice in one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port that nothing listens on, outside the ephemeral range where possible."""
    high = _ephemeral_start()
    low = max(10000, high - 12000)
    if high - low >= 1000:
        for _ in range(200):
            port = random.randrange(low, high)
            if port not in _handed and _bindable(port):
                _handed.add(port)
                return port
    # An unusual ephemeral range (or a crowded one below it): the kernel's choice.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed.add(port)
    return port
