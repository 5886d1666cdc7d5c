"""Version policies of a watched model store (``model_store_version_policy``): which of a model's
versions in the store are served, as TF Serving's ``model_version_policy`` says it.

    {"digits": {"latest": 2}, "resnet": "all", "bert": {"specific": ["1.0", "3.0"]}, "*": {"latest": 1}}

A model without an entry gets ``"*"``'s, else ``{"latest": 1}``. Imported by server/config.py to
check the key, so it imports nothing of the server's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_KEY = "*"


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1  # latest: how many
    versions: frozenset[str] = frozenset()  # specific: which

    def wanted(self, versions: Iterable[str], order: Callable[[str], Any]) -> set[str]:
        """The versions of ``versions`` this policy serves; ``order`` sorts them oldest first."""
        present = set(versions)
        if self.kind == "all":
            return present
        if self.kind == "specific":
            return present & self.versions
        return set(sorted(present, key=order)[-self.count :])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.count}"
        if self.kind == "specific":
            return "specific " + ", ".join(sorted(self.versions))
        return "all"


LATEST_ONE = VersionPolicy()


def parse_policy(value: object) -> VersionPolicy:
    """One model's policy: ``"all"``, ``{"latest": N}`` (N >= 1) or ``{"specific": [versions]}``;
    raises ValueError saying what is expected."""
    if value == "all" or value == {"all": True} or value == {"all": {}}:
        return VersionPolicy("all")
    if isinstance(value, dict) and len(value) == 1:
        ((kind, arg),) = value.items()
        if kind == "latest":
            if type(arg) is not int or not 1 <= arg <= 1000:
                raise ValueError(f"latest must be an integer from 1 to 1000, not {arg!r}")
            return VersionPolicy("latest", count=arg)
        if kind == "specific":
            if not isinstance(arg, list) or not arg or not all(isinstance(v, str | int) and str(v) for v in arg):
                raise ValueError(f"specific must be a non-empty list of versions, not {arg!r}")
            return VersionPolicy("specific", versions=frozenset(str(v) for v in arg))
    raise ValueError(f'expected "all", {{"latest": N}} or {{"specific": [versions]}}, not {value!r}')


def parse_policies(data: Mapping[str, Any]) -> dict[str, VersionPolicy]:
    """Every model's policy; a ValueError names the model whose entry is wrong."""
    policies = {}
    for name, value in data.items():
        try:
            policies[name] = parse_policy(value)
        except ValueError as exc:
            raise ValueError(f"model {name}: {exc}") from None
    return policies


def policy_for(policies: Mapping[str, VersionPolicy], name: str) -> VersionPolicy:
    return policies.get(name) or policies.get(DEFAULT_KEY) or LATEST_ONE
