"""The server's one error hierarchy. Each class carries its HTTP status and TorchServe's ``type``.

    ServerError                       500  InternalServerException    (base; also any unexpected failure)
    ├── BadRequest                    400  BadRequestException
    │   ├── InvalidModel              400  InvalidModelException      (bad archive or manifest)
    │   ├── DownloadFailed            400  DownloadArchiveException   (an allowed URL that could not be fetched)
    │   └── DependencyInstallFailed   400  ModelException             (pip failed on a model's requirements)
    ├── Unauthorized                  401  InvalidKeyException        (missing or wrong token)
    ├── Forbidden                     403  InvalidModelVersionException
    ├── NotFound                      404  ResourceNotFoundException  (unknown path)
    │   ├── ModelNotFound             404  ModelNotFoundException
    │   ├── ModelVersionNotFound      404  ModelVersionNotFoundException
    │   └── ArchiveNotFound           404  ModelNotFoundException     (a register URL naming no archive)
    ├── MethodNotAllowed              405  MethodNotAllowedException
    ├── RequestTimeout                408  RequestTimeoutException
    ├── Conflict                      409  ConflictStatusException
    ├── PayloadTooLarge               413  PayloadTooLargeException
    ├── ServiceUnavailable            503  ServiceUnavailableException (no worker, queue full)
    ├── ArchiveExists                 500  InternalServerException    (a download's file is already in the store)
    └── WorkerError                   any  InternalServerException    (what a worker or its handler reported)
        └── WorkerDied                500  InternalServerException    ("Worker died."; 507 when OOM-killed)

On TorchServe's routes an error renders as ``{"code", "type", "message"}`` (``http.responses.torchserve_error``);
another protocol's routes render it in their own dialect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class ServerError(Exception):
    status_code = 500
    type_name = "InternalServerException"
    #: Response headers the error needs besides the JSON body's (a 401's challenge).
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code

    def to_dict(self) -> dict[str, object]:
        return {"code": self.status_code, "type": self.type_name, "message": self.message}



class BadRequest(ServerError):
    status_code = 400
    type_name = "BadRequestException"


class InvalidModel(BadRequest):
    type_name = "InvalidModelException"


class Unauthorized(ServerError):
    status_code = 401
    type_name = "InvalidKeyException"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


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


class ArchiveNotFound(NotFound):
    """A register URL that names no usable archive; TorchServe reports these as ModelNotFoundException."""

    type_name = "ModelNotFoundException"


class DownloadFailed(BadRequest):
    """TorchServe's DownloadArchiveException, with the reason after its message."""

    type_name = "DownloadArchiveException"

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"Failed to download archive from: {url}: {reason}")


class ArchiveExists(ServerError):
    """The file a URL would be downloaded to is already in the model store (TorchServe: 500)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Model file already exists {name}")


class DependencyInstallFailed(BadRequest):
    """TorchServe's ModelException for a failed pip install, with pip's reason after its message."""

    type_name = "ModelException"

    def __init__(self, model_name: str, reason: str) -> None:
        super().__init__(f"Custom pip package installation failed for model {model_name}: {reason}")


class WorkerError(ServerError):
    """A failure a worker or its handler reported: the status is whatever it reported."""

    def __init__(
        self, message: str, status_code: int = 500, metrics: Sequence[dict[str, Any]] = (), type_name: str | None = None
    ) -> None:
        super().__init__(message, status_code)
        # Metrics the handler recorded before failing still count.
        self.metrics = list(metrics)
        if type_name:
            # A handler may name what went wrong (handlers.errors.PredictionException.type_name).
            self.type_name = type_name


class WorkerDied(WorkerError):
    """The worker process went away (crash, kill, broken socket) with requests in hand."""

    def __init__(self, status_code: int = 500) -> None:
        # TorchServe's message either way; 507 tells clients the kernel's OOM killer took it.
        super().__init__("Worker died.", status_code)
