"""Prometheus metrics, declared once per server in their own registry (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)

    def render(self, names: list[str]) -> tuple[bytes, str]:
        registry = self.registry.restricted_registry(names) if names else self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST
