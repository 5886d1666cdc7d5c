"""Token authorization, TorchServe's scheme: an inference key, a management key and an API key.

Clients send ``Authorization: Bearer <key>``. The inference and management keys expire after
``token_expiration_min``; the API key never expires and is what ``GET /token`` needs to rotate the
other two. The keys are published to ``key_file.json`` (TorchServe's name and JSON shape, mode
0600) in the server's working directory, for whoever may read that file.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, UTC
from pathlib import Path

from ..config import Address, ServerConfig

KEY_FILE_NAME = "key_file.json"
INFERENCE = "inference"
MANAGEMENT = "management"
API = "API"
ROTATABLE = (MANAGEMENT, INFERENCE)

# 32 random bytes: 256 bits, 43 URL-safe characters (TorchServe uses 6 bytes).
KEY_BYTES = 32
_BEARER = re.compile(rb"Bearer\s+(\S+)", re.IGNORECASE)
REFUSED = "Token Authentication failed. Token either incorrect, expired, or not provided correctly"


@dataclass
class _Key:
    value: bytes
    expires_at: float  # epoch seconds; inf: never


class TokenAuth:
    """The three keys, checked in constant time, and the key file that publishes them."""

    def __init__(self, key_file: Path, expiration_min: int, clock: Callable[[], float] = time.time) -> None:
        self.key_file = key_file
        self._lifetime = expiration_min * 60
        self._clock = clock
        self._published = False
        self._keys = {API: _Key(_new_key(), math.inf)}
        for kind in ROTATABLE:
            self.rotate(kind)

    def allows(self, kind: str, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the live ``kind`` key."""
        match = _BEARER.fullmatch(authorization) if authorization is not None else None
        if match is None:
            return False
        key = self._keys[kind]
        return hmac.compare_digest(match.group(1), key.value) and self._clock() < key.expires_at

    def allows_request(self, kind: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether a request's raw headers (lower-cased names, as servers parse them) carry the key."""
        return self.allows(kind, next((v for k, v in headers if k == b"authorization"), None))

    def rotate(self, kind: str) -> None:
        """A new ``kind`` key (management or inference) with a fresh expiry; the file follows."""
        if kind not in ROTATABLE:
            raise ValueError(f"not a rotatable key: {kind}")
        keys = {**self._keys, kind: _Key(_new_key(), self._clock() + self._lifetime)}
        if self._published:
            self._write(keys)  # first: if it fails, clients keep the key they can read
        self._keys = keys

    def publish(self) -> None:
        """Write the key file; rotations rewrite it from now on."""
        self._write(self._keys)
        self._published = True

    def withdraw(self) -> None:
        """Delete the key file (on a clean stop, as TorchServe's ``--stop`` does)."""
        if self._published:
            self._published = False
            self.key_file.unlink(missing_ok=True)

    def _write(self, keys: dict[str, _Key]) -> None:
        # TorchServe's shape and key order; the API key has no expiry.
        content = {
            kind: {"key": keys[kind].value.decode(), "expiration time": _instant(keys[kind].expires_at)}
            for kind in (MANAGEMENT, INFERENCE)
        }
        content[API] = {"key": keys[API].value.decode()}
        text = json.dumps(content, indent=2) + "\n"
        # A private temp file renamed over the old one: no reader ever sees a partial file, and the
        # keys never sit in a file that others may read, whatever the umask.
        # mkstemp: os.open with O_CREAT | O_EXCL and mode 0600.
        fd, temp = tempfile.mkstemp(prefix=f".{KEY_FILE_NAME}.", dir=self.key_file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temp, self.key_file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _new_key() -> bytes:
    return secrets.token_urlsafe(KEY_BYTES).encode()


def _instant(epoch: float) -> str:
    """Java's ``Instant.toString()``, as TorchServe writes expiry times: ``...T21:12:24.801167Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a listener reachable from this machine only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # another host name: it may resolve to anything
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def bound_addresses(config: ServerConfig) -> dict[str, Address]:
    """The listeners the server opens, by API."""
    addresses = {"inference": config.inference_address, "management": config.management_address}
    if config.enable_metrics_api:
        addresses["metrics"] = config.metrics_address
    return addresses


def exposed_addresses(config: ServerConfig) -> dict[str, Address]:
    """The listeners bound beyond loopback, by API."""
    return {api: a for api, a in bound_addresses(config).items() if not is_loopback(a.host)}


def tokens_required(config: ServerConfig) -> bool:
    """An explicit ``disable_token_authorization`` decides; unset, any non-loopback listener does."""
    if config.disable_token_authorization is not None:
        return not config.disable_token_authorization
    return bool(exposed_addresses(config))
