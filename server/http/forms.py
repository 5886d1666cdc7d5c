"""Request bodies to handler inputs: raw bodies, multipart forms and URL-encoded forms (§3.1).

Values stay the exact bytes the client sent: form values are never decoded to text and
re-encoded here (the worker decodes by content type), so binary fields survive.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from ..errors import BadRequest

# Form caps: a form with thousands of parts is an attack, not an inference request. Each part's
# size is bounded by max_request_size, and its header block by python-multipart (8 headers of at
# most 4 KiB each).
MAX_PARTS = 64
MAX_FIELDS = 1000

Param = tuple[str, str | None, bytes]


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# "; key=value" with the value a token or a quoted string whose backslash escapes any character
# (RFC 9110 §5.6.6); python-multipart's own parser reads a quoted string ending in an escaped
# backslash as unterminated, so a name like "a\\" swallowed the parameters after it.
_PARAM = re.compile(rb';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.DOTALL)
_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)


def header_params(value: bytes) -> dict[bytes, bytes]:
    """A header's parameters by lower-cased name, quoted values unquoted; the first of a name wins."""
    params: dict[bytes, bytes] = {}
    for match in _PARAM.finditer(value):
        raw = match.group(2).strip()
        if len(raw) >= 2 and raw.startswith(b'"') and raw.endswith(b'"'):
            raw = _ESCAPE.sub(rb"\1", raw[1:-1])
        params.setdefault(match.group(1).lower(), raw)
    return params


def request_params(content_type: str | None, body: bytes) -> list[Param]:
    """The handler's input dict for one request, as (name, content type, bytes) triples (§3.1)."""
    mime = _mime(content_type)
    if mime == "multipart/form-data":
        return parse_multipart(content_type or "", body)
    if mime == "application/x-www-form-urlencoded":
        return parse_urlencoded(body)
    # Like TorchServe (HttpUtil.getMimeType), the parameter carries the mime type alone.
    return [("body", mime or None, body)]


def parse_urlencoded(body: bytes) -> list[Param]:
    # Split no further than the cap: a body of separators must not become millions of objects.
    pieces = body.split(b"&", MAX_FIELDS)
    if len(pieces) > MAX_FIELDS:
        raise BadRequest(f"Invalid form request: more than {MAX_FIELDS} fields")
    fields = [field for field in pieces if field]
    params: list[Param] = []
    for field in fields:
        name, _, value = field.partition(b"=")
        name, value = unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))
        params.append((_text(name), None, value))
    return params


def parse_multipart(content_type: str, body: bytes) -> list[Param]:
    """Every part as (name, its own content type or None, its bytes), with or without a filename.

    Starlette's form parser is not used: it decodes parts without a filename to text (mangling
    binary), drops their content type, and caps them at 1 MiB.
    """
    boundary = header_params(content_type.encode("latin-1", "replace")).get(b"boundary")
    if not boundary:
        raise BadRequest("Invalid multipart/form request: no boundary")
    params: list[Param] = []
    headers: dict[bytes, bytes] = {}
    field, value = bytearray(), bytearray()
    chunks: list[bytes] = []
    ended = False

    def on_part_begin() -> None:
        headers.clear()
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(field).strip().lower()] = bytes(value).strip()
        field.clear()
        value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if len(params) >= MAX_PARTS:
            raise BadRequest(f"Invalid multipart/form request: more than {MAX_PARTS} parts")
        name = header_params(headers.get(b"content-disposition", b"")).get(b"name")
        if name is None:
            raise BadRequest("Invalid multipart/form request: a part has no name")
        part_type = _mime(_text(headers.get(b"content-type", b""))) or None
        params.append((_text(name), part_type, b"".join(chunks)))

    def on_end() -> None:
        nonlocal ended
        ended = True

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise BadRequest(f"Invalid multipart/form request: {exc}") from None
    if not ended:
        raise BadRequest("Invalid multipart/form request: the body ends before the closing boundary")
    return params
