"""Rollouts: a model's labels, its weighted traffic split, and its shadow version.

Pure state and arithmetic, owned per model by the registry (``ModelRegistry``): which version a
request that names a label, or no version at all, is sent to, and which requests are also
mirrored to a shadow version. Nothing here touches workers, queues or HTTP.

- **Labels** (``prod``, ``canary``) name a version, as TF Serving's version labels do.
- **The split** weighs versions for requests that name no version (KServe's canary percent). A
  request with an ``x-route-key`` header is hashed onto the split, so that one key always reaches
  the same version (A/B tests); without one, the pick is random.
- **The shadow** version gets a copy of ``percent`` of the requests the split or the default
  version serve; its answers are measured and dropped (server/models/shadow.py).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest

#: A label: TF Serving's are free strings; these must also be one URL path segment without a colon
#: (``/v1/models/m/labels/prod:predict``).
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_WEIGHT = 1_000_000


@dataclass(frozen=True)
class ShadowSetting:
    version: str
    percent: float  # 0 < percent <= 100


@dataclass
class ShadowStats:
    """What the shadow's copies came to since the shadow was set (server/models/shadow.py)."""

    mirrored: int = 0  # copies sent
    refused: int = 0  # copies its queue refused at once (no worker, queue full): errors too
    errors: int = 0  # copies answered with a status of 400 or more, or refused
    answered: int = 0  # copies answered below 400
    compared: int = 0  # answered by both with JSON, so compared
    differ: int = 0  # of those, different
    shadow_seconds: float = 0.0  # the shadow's latency, summed over answered copies
    primary_seconds: float = 0.0  # the primary's, over the same requests

    def as_json(self) -> dict[str, Any]:
        answered = self.answered or 1
        return {
            "mirrored": self.mirrored,
            "errors": self.errors,
            "refused": self.refused,
            "answered": self.answered,
            "compared": self.compared,
            "differ": self.differ,
            "differRate": round(self.differ / self.compared, 6) if self.compared else 0.0,
            "errorRate": round(self.errors / self.mirrored, 6) if self.mirrored else 0.0,
            "meanLatencyMs": round(1000 * self.shadow_seconds / answered, 3),
            "primaryMeanLatencyMs": round(1000 * self.primary_seconds / answered, 3),
        }


@dataclass
class Rollout:
    """One model's labels, split and shadow. The registry keeps every version they name registered
    (``names``), so a lookup here never finds a version that is gone."""

    labels: dict[str, str] = field(default_factory=dict)  # label -> version
    split: dict[str, int] = field(default_factory=dict)  # version -> weight; empty: no split
    shadow: ShadowSetting | None = None
    # The split as cumulative weights, rebuilt when it changes: the request path bisects nothing.
    _cumulative: list[tuple[int, str]] = field(default_factory=list, repr=False)

    def set_split(self, weights: dict[str, int]) -> None:
        self.split = dict(weights)
        total = 0
        self._cumulative = []
        for version, weight in sorted(self.split.items(), key=lambda item: version_key(item[0])):
            if weight > 0:
                total += weight
                self._cumulative.append((total, version))

    def pick(self, route_key: bytes | None) -> str:
        """The split's version for one request; the split must not be empty."""
        total = self._cumulative[-1][0]
        if route_key is None:
            point = random.randrange(total)
        else:
            # blake2b, not hash(): the same key must land on the same version after a restart too.
            point = int.from_bytes(hashlib.blake2b(route_key, digest_size=8).digest(), "big") % total
        for bound, version in self._cumulative:
            if point < bound:
                return version
        return self._cumulative[-1][1]  # unreachable: point < total

    def names(self, version: str) -> list[str]:
        """What names ``version``: ``label <l>``, ``the traffic split``, ``the shadow``."""
        named = [f"label {label}" for label, v in sorted(self.labels.items()) if v == version]
        if version in self.split:
            named.append("the traffic split")
        if self.shadow is not None and self.shadow.version == version:
            named.append("the shadow")
        return named

    def drop(self, version: str) -> list[str]:
        """Forget every mention of ``version`` (its files left the store); returns what named it."""
        named = self.names(version)
        self.labels = {label: v for label, v in self.labels.items() if v != version}
        if version in self.split:
            rest = {v: w for v, w in self.split.items() if v != version}
            self.set_split(rest if any(w > 0 for w in rest.values()) else {})
        if self.shadow is not None and self.shadow.version == version:
            self.shadow = None
        return named

    def empty(self) -> bool:
        return not self.labels and not self.split and self.shadow is None

    def as_json(self) -> dict[str, Any]:
        """The snapshot's form (server/models/snapshot.py)."""
        saved: dict[str, Any] = {}
        if self.labels:
            saved["labels"] = dict(self.labels)
        if self.split:
            saved["traffic"] = dict(self.split)
        if self.shadow is not None:
            saved["shadow"] = {"version": self.shadow.version, "percent": self.shadow.percent}
        return saved


def check_label(label: str) -> str:
    if not _LABEL.fullmatch(label):
        raise BadRequest(
            f"Invalid label: {label!r} (expected letters, digits, '_', '.' or '-', at most 64, not starting with '.' or '-')"
        )
    return label


def parse_weights(data: object) -> dict[str, int]:
    """``PUT /models/{m}/traffic``'s body: ``{version: weight}``, integer weights >= 0 with a
    positive sum; ``{}`` is no split."""
    if not isinstance(data, dict):
        raise BadRequest('The traffic split must be a JSON object of weights per version, e.g. {"1.0": 90, "2.0": 10}')
    weights: dict[str, int] = {}
    for version, weight in data.items():
        if type(weight) is not int or not 0 <= weight <= MAX_WEIGHT:
            raise BadRequest(f"Invalid weight for version {version}: {weight!r} (expected an integer from 0 to {MAX_WEIGHT})")
        weights[version] = weight
    if weights and not any(weights.values()):
        raise BadRequest("The traffic split's weights add up to 0: give one version a positive weight, or send {} to remove the split")
    return weights


def parse_shadow(data: object) -> ShadowSetting | None:
    """``PUT /models/{m}/shadow``'s body: ``{"version": v, "percent": p}``; ``{}`` is no shadow."""
    if not isinstance(data, dict):
        raise BadRequest('The shadow must be a JSON object, e.g. {"version": "2.0", "percent": 10}')
    if not data:
        return None
    unknown = sorted(set(data) - {"version", "percent"})
    if unknown:
        raise BadRequest(f"Unknown shadow field: {unknown[0]!r} (expected version and percent)")
    version, percent = data.get("version"), data.get("percent", 100)
    if not isinstance(version, str) or not version:
        raise BadRequest("The shadow needs a version: a registered version of the model")
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 < percent <= 100:
        raise BadRequest(f"Invalid shadow percent: {percent!r} (expected a number above 0 and at most 100)")
    return ShadowSetting(version, float(percent))


def sampled(percent: float) -> bool:
    """Whether this request is one of the ``percent`` mirrored."""
    return percent >= 100 or random.random() * 100 < percent


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Orders versions as people number them: ``2.0`` < ``10.0`` < ``10.0.1``; numeric parts before
    words at the same place, so ``1.0`` < ``1.0-rc`` sorts deterministically either way."""
    parts = re.split(r"[.\-_+]", version)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)
