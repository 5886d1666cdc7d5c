"""``ts.metrics.unit``: the short -> long unit names (``Units().units``)."""

from handlers.metrics import UNITS


class Units:
    def __init__(self) -> None:
        self.units = dict(UNITS)


__all__ = ["Units"]
