"""TorchServe's families on /metrics, written as TorchServe writes them.

TorchServe's Prometheus mode writes with Java's simpleclient 0.9: ``# HELP name Torchserve
prometheus <type> metric with unit: <unit>``, ``# TYPE name <type>``, and samples with a trailing
comma inside the braces and Java's ``Double.toString``: ``Requests2XX{Level="Host",Hostname="h",} 12.0``.
Counters keep their names (no ``_total`` is added). Dashboards and grep-based checks built on
TorchServe read these lines, so they are written here line for line; marserve's own
``marserve_*`` families are prometheus-client's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

Labels = Sequence[tuple[str, str]]

# simpleclient's default histogram buckets, which TorchServe's handler histograms use.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)


@dataclass(slots=True)
class Family:
    name: str
    kind: str  # counter, gauge or histogram
    unit: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float, suffix: str = "") -> None:
        self.samples.append((self.name + suffix, labels, value))


def render(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} Torchserve prometheus {family.kind} metric with unit: {family.unit}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for name, labels, value in family.samples:
            if labels:
                pairs = "".join(f'{key}="{_escape(text)}",' for key, text in labels)
                lines.append(f"{name}{{{pairs}}} {java_double(value)}")
            else:
                lines.append(f"{name} {java_double(value)}")
    return "".join(line + "\n" for line in lines)


def java_double(value: float) -> str:
    """``value`` as Java's ``Double.toString`` writes it: ``12.0``, ``0.25``, ``1.2345678E7``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    value = float(value)
    magnitude = abs(value)
    if magnitude == 0 or 1e-3 <= magnitude < 1e7:
        return repr(value)  # the shortest digits that read back, as Java's, in plain notation
    sign, digits, exponent = Decimal(repr(value)).as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits)).rstrip("0") or "0"
    power = len(digits) + exponent - 1
    return f"{'-' if sign else ''}{text[0]}.{text[1:] or '0'}E{power}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
