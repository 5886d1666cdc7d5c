"""``ts.handler_utils.timer``: the ``@timed`` decorator (metric ``ts_handler_<fn>`` when profiling)."""

from handlers.utils import timed

__all__ = ["timed"]
