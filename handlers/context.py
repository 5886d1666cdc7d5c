"""The ``Context`` handed to handlers, with TorchServe's members (ts/context.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


class RequestHeaders(dict):  # type: ignore[type-arg]
    """A request's headers, looked up without regard to case.

    ASGI servers lowercase header names, while TorchServe handlers look them up as clients
    spell them (``"Content-Type"``). Keys keep the case they were stored with.
    """

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        super().__init__()
        self._keys: dict[str, str] = {}
        self.update(items)

    def _key(self, key: Any) -> Any:
        return self._keys.get(key.lower(), key) if isinstance(key, str) else key

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, str):
            stored = self._keys.get(key.lower())
            if stored is not None and stored != key:
                super().__delitem__(stored)
            self._keys[key.lower()] = key
        super().__setitem__(key, value)

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._key(key))

    def __delitem__(self, key: Any) -> None:
        key = self._key(key)
        super().__delitem__(key)
        if isinstance(key, str):
            del self._keys[key.lower()]

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._key(key), default)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for items in (*args, kwargs):
            for key, value in items.items() if isinstance(items, Mapping) else items:
                self[key] = value

    def copy(self) -> RequestHeaders:
        return RequestHeaders(self)


class RequestProcessor:
    """One request's headers in, and its status and headers out."""

    def __init__(self, request_header: Mapping[str, Any]) -> None:
        self._status_code = 200
        self._reason_phrase: str | None = None
        self._response_header: dict[str, str] = {}
        self._request_header = (
            request_header if isinstance(request_header, RequestHeaders) else RequestHeaders(request_header)
        )

    def get_request_property(self, key: str) -> Any:
        return self._request_header.get(key)

    def get_request_properties(self) -> dict[str, Any]:
        return self._request_header

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = code
        self._reason_phrase = reason_phrase

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str | None:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self._response_header

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


class Context:
    """What a handler knows about its model, its worker and the batch in hand."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any] | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
        metrics: Any = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "MMS",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] = []
        self._metrics = metrics
        self.model_yaml_config = model_yaml_config or {}
        self.stopping_criteria = None
        self.cl_socket = None
        #: Set by the worker for each batch: sends one piece of request ``idx``'s streamed response
        #: (``ts.handler_utils.utils.send_intermediate_predict_response`` calls it).
        self.piece_sink: Callable[[int, Any], None] | None = None
        #: Set by the worker for each batch: whether request ``idx``'s client has gone.
        self.client_gone: Callable[[int], bool] = _never

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    @property
    def metrics(self) -> Any:
        return self._metrics

    @metrics.setter
    def metrics(self, metrics: Any) -> None:
        self._metrics = metrics

    def get_request_id(self, idx: int = 0) -> str | None:
        return self.request_ids.get(idx) if self.request_ids else None

    def get_request_header(self, idx: int, key: str) -> Any:
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self.request_processor[idx].get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> str | None:
        return self.get_response_headers(idx).get("content-type")

    def get_response_status(self, idx: int) -> tuple[int, str | None]:
        processor = self.request_processor[idx]
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor:
            self.request_processor[idx].report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self.request_processor:
            processor.report_status(code, phrase)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self.request_processor[idx].get_response_headers()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.request_processor[idx].add_response_property(key, value)

    def cancelled(self, idx: int = 0) -> bool:
        """Whether request ``idx``'s client has gone (a marserve addition): a streaming handler
        may stop generating for it. Its pieces are dropped either way."""
        return self.client_gone(idx)

    def send_piece(self, idx: int, value: Any) -> None:
        """Send one piece of request ``idx``'s streamed response now (bytes, str, or anything
        JSON can say), with the response's status and headers as set so far."""
        if self.piece_sink is None:
            raise RuntimeError("streamed responses are sent only while a worker runs a batch")
        self.piece_sink(idx, value)

    def get_sequence_id(self, idx: int) -> str | None:
        sequence_id: str | None = self.get_request_header(idx, "ts_request_sequence_id")
        return sequence_id


def _never(idx: int) -> bool:
    return False
