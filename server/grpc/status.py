"""gRPC status codes: from the HTTP statuses marserve's errors carry, and back for counting.

``code_for`` is TorchServe's mapping (``GRPCUtils.getGRPCStatusCode``), which its services apply to
what a worker or the management API answered; KServe's model server maps the same way (400 to
INVALID_ARGUMENT, 404 to NOT_FOUND, 503 to UNAVAILABLE). ``http_status`` goes the other way, for
the status-class counters (``Requests2XX``, ...) and the access log, as google.rpc.Code documents it.
"""

from __future__ import annotations

from grpc import StatusCode

_BY_HTTP = {
    400: StatusCode.INVALID_ARGUMENT,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.NOT_FOUND,
    409: StatusCode.ABORTED,
    413: StatusCode.RESOURCE_EXHAUSTED,
    416: StatusCode.OUT_OF_RANGE,
    429: StatusCode.RESOURCE_EXHAUSTED,
    499: StatusCode.CANCELLED,
    501: StatusCode.UNIMPLEMENTED,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
}

_HTTP = {
    StatusCode.OK: 200,
    StatusCode.CANCELLED: 499,
    StatusCode.UNKNOWN: 500,
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.DEADLINE_EXCEEDED: 504,
    StatusCode.NOT_FOUND: 404,
    StatusCode.ALREADY_EXISTS: 409,
    StatusCode.PERMISSION_DENIED: 403,
    StatusCode.UNAUTHENTICATED: 401,
    StatusCode.RESOURCE_EXHAUSTED: 429,
    StatusCode.FAILED_PRECONDITION: 400,
    StatusCode.ABORTED: 409,
    StatusCode.OUT_OF_RANGE: 400,
    StatusCode.UNIMPLEMENTED: 501,
    StatusCode.INTERNAL: 500,
    StatusCode.UNAVAILABLE: 503,
    StatusCode.DATA_LOSS: 500,
}


def code_for(status: int) -> StatusCode:
    """The gRPC code for an HTTP status, as TorchServe maps them: the table above, then any other
    2xx OK, 4xx FAILED_PRECONDITION, 5xx INTERNAL, anything else UNKNOWN."""
    code = _BY_HTTP.get(status)
    if code is not None:
        return code
    if 200 <= status < 300:
        return StatusCode.OK
    if 400 <= status < 500:
        return StatusCode.FAILED_PRECONDITION
    if 500 <= status < 600:
        return StatusCode.INTERNAL
    return StatusCode.UNKNOWN


def http_status(code: StatusCode) -> int:
    """The HTTP status a gRPC code stands for (google.rpc.Code's table)."""
    return _HTTP.get(code, 500)
