"""The registry's read-only status, in process: registrations with no workers start no process."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from server.config import ServerConfig
from server.errors import ModelNotFound, ModelVersionNotFound
from server.models.registry import ModelRegistry, RegisterRequest
from server.models.status import VersionStatus
from tests.conftest import make_mar


def test_status_of_versions_and_defaults(tmp_path: Path) -> None:
    make_mar(tmp_path, "echo", "echo_handler.py", version="2.0").rename(tmp_path / "echo2.mar")
    make_mar(tmp_path, "alpha", "echo_handler.py", version="3")
    make_mar(tmp_path, "echo", "echo_handler.py", version="1.0")
    registry = ModelRegistry(
        ServerConfig.from_properties({"model_store": str(tmp_path)}), environ={}, workdir=tmp_path
    )

    async def main() -> None:
        for url in ("echo.mar", "echo2.mar", "alpha.mar"):
            await registry.register(RegisterRequest(url=url, initial_workers=0, batch_size=4))
        every = registry.status()
        assert [(s.name, s.version, s.is_default) for s in every] == [
            ("alpha", "3", True), ("echo", "1.0", True), ("echo", "2.0", False),
        ]  # fmt: skip
        (echo,) = registry.status("echo")
        assert echo == VersionStatus(
            name="echo", version="1.0", url="echo.mar", runtime="python", handler=echo.handler,
            settings=echo.settings, loaded_at_startup=False, is_default=True, queue_length=0,
            queue_capacity=100, workers=(),
        )  # fmt: skip
        assert echo.handler.endswith("echo_handler.py") and echo.settings.batch_size == 4
        assert [s.version for s in registry.status("echo", "all")] == ["1.0", "2.0"]
        assert registry.status("echo", "2.0")[0].url == "echo2.mar"
        with pytest.raises(ModelNotFound):
            registry.status("nope")
        with pytest.raises(ModelNotFound):
            registry.status("nope", "all")
        with pytest.raises(ModelVersionNotFound):
            registry.status("echo", "9")
        await registry.set_default("echo", "2.0")
        assert [s.is_default for s in registry.status("echo", "all")] == [False, True]
        # A status is a copy: a later scale changes the version's settings, not the status taken.
        await registry.scale("echo", "1.0", 0, 3, synchronous=True)
        with pytest.raises(dataclasses.FrozenInstanceError):
            echo.settings.max_workers = 3  # type: ignore[misc]
        assert echo.settings.max_workers == 0
        assert registry.status("echo", "1.0")[0].settings.max_workers == 3
        assert registry.registered_with(registry.get("echo", "1.0")).initial_workers == 0
        await registry.shutdown(1)
        assert registry.status() == []

    asyncio.run(main())
