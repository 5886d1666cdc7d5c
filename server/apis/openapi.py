"""OpenAPI 3.0.1 descriptions of the three APIs, served on ``OPTIONS /``."""

from __future__ import annotations

from typing import Any

from ..version import TORCHSERVE_VERSION, marserve_version

_MODEL = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_COMPONENTS = {
    "schemas": {
        "Error": {
            "type": "object",
            "required": ["code", "type", "message"],
            "properties": {"code": {"type": "integer"}, "type": {"type": "string"}, "message": {"type": "string"}},
        }
    }
}


def _doc(title: str, paths: dict[str, Any]) -> dict[str, Any]:
    return {
        "openapi": "3.0.1",
        "info": {
            "title": title,
            "description": f"marserve, a model server compatible with TorchServe {TORCHSERVE_VERSION}'s APIs",
            "version": marserve_version(),
        },
        "paths": paths,
        "components": _COMPONENTS,
    }


def _op(summary: str, *params: dict[str, Any], body: bool = False, ok: str = "OK") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "parameters": list(params), "responses": {"200": {"description": ok}, "default": _ERROR}}
    if body:
        op["requestBody"] = {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}}
    return op


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind}}


def inference_openapi() -> dict[str, Any]:
    predict = _op("Predictions on the model's default version", _MODEL, body=True)
    return _doc(
        "marserve inference API",
        {
            "/": {"options": _op("This API description")},
            "/ping": {"get": _op("Health check")},
            "/predictions/{model_name}": {"post": predict, "put": predict},
            "/predictions/{model_name}/{model_version}": {"post": _op("Predictions on a version", _MODEL, _VERSION, body=True)},
            "/explanations/{model_name}": {"post": _op("Explanations", _MODEL, body=True)},
        },
    )


def management_openapi() -> dict[str, Any]:
    register = [_query(n) for n in ("url", "model_name", "handler", "runtime")] + [
        _query(n, "integer")
        for n in ("batch_size", "max_batch_delay", "initial_workers", "response_timeout", "startup_timeout")
    ] + [_query("synchronous", "boolean")]
    scale = [_query("min_worker", "integer"), _query("max_worker", "integer"), _query("synchronous", "boolean")]
    return _doc(
        "marserve management API",
        {
            "/": {"options": _op("This API description")},
            "/models": {
                "get": _op("List models", _query("limit", "integer"), _query("next_page_token")),
                "post": _op("Register a model", *register),
            },
            "/models/{model_name}": {
                "get": _op("Describe the default version", _MODEL),
                "put": _op("Scale workers", _MODEL, *scale),
                "delete": _op("Unregister the default version", _MODEL),
            },
            "/models/{model_name}/{model_version}": {
                "get": _op("Describe a version (or all)", _MODEL, _VERSION),
                "put": _op("Scale a version's workers", _MODEL, _VERSION, *scale),
                "delete": _op("Unregister a version", _MODEL, _VERSION),
            },
            "/models/{model_name}/{model_version}/set-default": {"put": _op("Set the default version", _MODEL, _VERSION)},
        },
    )


def metrics_openapi() -> dict[str, Any]:
    return _doc("marserve metrics API", {"/": {"options": _op("This API description")}, "/metrics": {"get": _op("Prometheus metrics", _query("name[]"))}})


def for_model(document: dict[str, Any], name: str, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """``document`` narrowed to the per-model paths under ``prefixes``, with ``name`` filled in.

    TorchServe answers ``OPTIONS`` on a model's own paths with such a description.
    """
    return {
        **document,
        "paths": {
            path.replace("{model_name}", name): operations
            for path, operations in document["paths"].items()
            if path.startswith(prefixes)
        },
    }
