"""A listening socket whose connections go through a ``Door``, and its orderly stop."""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from pathlib import Path

from ..config import Address
from .connection import Door, HttpConnection


class ListenError(Exception):
    """A listener that cannot start; the message is one line that says which and why."""


def tls_context(certificate_file: Path, private_key_file: Path) -> ssl.SSLContext:
    """The server side of TLS for https addresses; ListenError if the files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certificate_file, private_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ListenError(
            f"cannot use certificate_file {certificate_file} with private_key_file {private_key_file}: {exc}"
        ) from None
    return context


class Listener:
    """One API's port (``api`` names it in messages: inference, management, metrics)."""

    def __init__(self, api: str, address: Address, door: Door, tls: ssl.SSLContext | None = None) -> None:
        self.api = api
        self.address = address
        self.door = door
        self.tls = tls
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        door = self.door
        try:
            self._server = await loop.create_server(
                lambda: HttpConnection(door, loop), self.address.host, self.address.port, ssl=self.tls, backlog=2048
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "address already in use"
            raise ListenError(
                f"cannot listen on {self.address.host}:{self.address.port} ({self.api}_address): {reason.lower()}"
            ) from None

    async def stop(self, timeout: float) -> None:
        """Stop accepting; let requests being answered finish for up to ``timeout`` seconds."""
        if self._server is None:
            return
        self._server.close()
        door = self.door
        door.closing = True
        for connection in list(door.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while door.connections and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(door.connections):
            connection.abort()
        await self._server.wait_closed()
