"""The server's one error hierarchy. Each class carries its HTTP status and TorchServe's ``type``.

    ServerError                       500  (base; also any unexpected failure)
    ├── BadRequest                    400  BadRequestException
    │   └── InvalidModel              400  InvalidModelException      (bad archive or manifest)
    ├── Unauthorized                  401  InvalidKeyException        (missing or wrong token)
    ├── Forbidden                     403  InvalidModelVersionException
    ├── NotFound                      404  ResourceNotFoundException  (unknown path)
    │   ├── ModelNotFound             404  ModelNotFoundException
    │   └── ModelVersionNotFound      404  ModelVersionNotFoundException
    ├── MethodNotAllowed              405  MethodNotAllowedException
    ├── RequestTimeout                408  RequestTimeoutException
    ├── Conflict                      409  ConflictStatusException
    ├── PayloadTooLarge               413  PayloadTooLargeException
    ├── ServiceUnavailable            503  ServiceUnavailableException (no worker, queue full)
    └── InternalServerError           any  InternalServerException    (what a worker or handler reported)

Every error renders as TorchServe's body: ``{"code", "type", "message"}``.
"""

from __future__ import annotations

import json


class ServerError(Exception):
    status_code = 500
    type_name = "InternalServerException"
    #: Response headers the error needs besides the JSON body's (a 401's challenge).
    headers: dict[str, str] = {}

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    def to_dict(self) -> dict[str, object]:
        return {"code": self.status_code, "type": self.type_name, "message": self.message}

    def body(self) -> bytes:
        """TorchServe's JSON for this error: 2-space indent and a trailing newline."""
        return (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()


class BadRequest(ServerError):
    status_code = 400
    type_name = "BadRequestException"


class InvalidModel(BadRequest):
    type_name = "InvalidModelException"


class Unauthorized(ServerError):
    status_code = 401
    type_name = "InvalidKeyException"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServerError):
    status_code = 403
    type_name = "InvalidModelVersionException"


class NotFound(ServerError):
    status_code = 404
    type_name = "ResourceNotFoundException"

    def __init__(self, message: str = "Requested resource is not found, please refer to API document.") -> None:
        super().__init__(message)


class ModelNotFound(NotFound):
    type_name = "ModelNotFoundException"

    def __init__(self, name: str) -> None:
        super().__init__(f"Model not found: {name}")


class ModelVersionNotFound(NotFound):
    type_name = "ModelVersionNotFoundException"

    def __init__(self, name: str, version: str, message: str | None = None) -> None:
        super().__init__(message or f"Model version: {version} does not exist for model: {name}")


class MethodNotAllowed(ServerError):
    status_code = 405
    type_name = "MethodNotAllowedException"

    def __init__(self, message: str = "Requested method is not allowed, please refer to API document.") -> None:
        super().__init__(message)


class RequestTimeout(ServerError):
    status_code = 408
    type_name = "RequestTimeoutException"


class Conflict(ServerError):
    status_code = 409
    type_name = "ConflictStatusException"


class PayloadTooLarge(ServerError):
    status_code = 413
    type_name = "PayloadTooLargeException"


class ServiceUnavailable(ServerError):
    status_code = 503
    type_name = "ServiceUnavailableException"


class InternalServerError(ServerError):
    """A failure reported by a worker or a handler; the status is whatever it reported."""


def worker_died() -> InternalServerError:
    return InternalServerError("Worker died.", 500)
