"""Exceptions a handler raises to choose its response."""

from __future__ import annotations


class PredictionException(Exception):
    """Fail the whole batch with ``error_code`` and ``message`` (TorchServe's ts.utils.util)."""

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"
