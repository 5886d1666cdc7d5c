"""Exceptions a handler raises to choose its response."""

from __future__ import annotations

from typing import Any


class PredictionException(Exception):
    """Fail the whole batch with ``error_code`` and ``message`` (TorchServe's ts.utils.util).

    ``type_name`` (a marserve addition) is the ``type`` clients see in the error's JSON; None keeps
    TorchServe's ``InternalServerException``.
    """

    type_name: str | None = None

    def __init__(self, message: str, error_code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.error_code = error_code


class MissingDependency(PredictionException):
    """What the handler needs is not installed on the server (captum for explanations, say)."""

    type_name = "MissingDependencyException"

    def __str__(self) -> str:
        return f"{self.message} : {self.error_code}"


_STATUS_TYPES = {400: "BadRequestException", 413: "PayloadTooLargeException"}


class RequestError(Exception):
    """One request's input is unusable: it fails alone, with ``code`` and a message naming the problem."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def body(self) -> dict[str, Any]:
        """TorchServe's error body shape, for the failed request's response."""
        return {"code": self.code, "type": _STATUS_TYPES.get(self.code, "BadRequestException"), "message": self.message}
