"""Property tests of request-body decoding: the frontend's (server/forms.py: raw, multipart and
URL-encoded bodies to handler parameters) and the worker's (decode_value: JSON and text).

On arbitrary bytes and content types decoding gives parameters or a BadRequest, never another
exception; valid forms built from random fields decode back to exactly those fields.
"""

from __future__ import annotations

import json
import math
import re
from urllib.parse import quote_from_bytes

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from server.errors import BadRequest
from server.http.forms import MAX_FIELDS, MAX_PARTS, parse_multipart, parse_urlencoded, request_params
from server.workers.child.service import decode_value

SETTINGS = settings(max_examples=300, deadline=None)

# Header values reach the decoder as latin-1 text, as the server reads them off the wire.
header_text = st.binary(max_size=60).map(lambda raw: raw.decode("latin-1"))
# RFC 2046 boundary characters; a boundary may not end with a space.
boundaries = st.text(alphabet="abcXYZ0123456789'()+_,-./:=? ", min_size=1, max_size=70).filter(
    lambda b: not b.endswith(" ")
)
content_types = st.one_of(
    st.none(),
    header_text,
    st.sampled_from(
        ["application/json", "text/plain; charset=utf-8", "application/x-www-form-urlencoded", "image/png"]
    ),
    boundaries.map(lambda b: f'multipart/form-data; boundary="{b}"'),
    st.builds(lambda p: "multipart/form-data" + p, header_text),
)


def multipart_noise(boundary: str) -> st.SearchStrategy[bytes]:
    """Bytes that look like multipart: boundary lines, part headers and data in any order."""
    piece = st.sampled_from(
        [
            f"--{boundary}\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
            b'Content-Disposition: form-data; name="a"\r\n',
            b'Content-Disposition: form-data; filename="x"\r\n',
            b"Content-Type: text/plain\r\n",
            b"Content-Disposition\r\n",
            b"\r\n",
            b"--",
        ]
    ) | st.binary(max_size=20)
    return st.lists(piece, max_size=20).map(b"".join)


@SETTINGS
@given(content_types, st.binary(max_size=400))
@example("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n")
@example("multipart/form-data; boundary=B", b"--B--\r\n")
@example("multipart/form-data; boundary=", b"")
def test_any_body_decodes_or_is_a_bad_request(content_type: str | None, body: bytes) -> None:
    check_decodes(content_type, body)


@SETTINGS
@given(boundaries, st.data())
def test_multipart_lookalikes_decode_or_are_bad_requests(boundary: str, data: st.DataObject) -> None:
    check_decodes(f"multipart/form-data; boundary={boundary}", data.draw(multipart_noise(boundary)))


def check_decodes(content_type: str | None, body: bytes) -> None:
    try:
        params = request_params(content_type, body)
    except BadRequest as exc:
        assert exc.status_code == 400 and "\n" not in exc.message
        return
    for name, part_type, value in params:
        assert isinstance(name, str) and isinstance(value, bytes)
        assert part_type is None or (isinstance(part_type, str) and part_type == part_type.strip().lower())


# ---------------------------------------------------------------- round trips

# Form-field names as clients send them: any text but line breaks (a header cannot hold them).
names = st.text(max_size=20).filter(lambda n: not any(c in n for c in "\r\n"))
part_types = st.one_of(
    st.none(), st.sampled_from(["text/plain", "application/json", "image/png", "application/octet-stream"])
)
filenames = st.one_of(st.none(), st.text(alphabet="abc.-_ ", max_size=10))
fields = st.lists(
    st.tuples(names, part_types, st.binary(max_size=200), filenames),
    max_size=MAX_PARTS,
)


def quoted(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


def build_multipart(boundary: str, parts: list[tuple[str, str | None, bytes, str | None]]) -> bytes:
    body = b""
    for name, part_type, value, filename in parts:
        disposition = b"Content-Disposition: form-data; name=" + quoted(name)
        if filename is not None:
            disposition += b"; filename=" + quoted(filename)
        body += f"--{boundary}\r\n".encode() + disposition + b"\r\n"
        if part_type is not None:
            body += f"Content-Type: {part_type}\r\n".encode()
        body += b"\r\n" + value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@SETTINGS
@given(boundaries, fields)
@example("B", [('a"b', None, b"", None), ("a\\", None, b"", None), ("x;y=z", "text/plain", b"\r\n--", "f.txt")])
def test_multipart_round_trips(boundary: str, parts: list[tuple[str, str | None, bytes, str | None]]) -> None:
    assume(all(f"\r\n--{boundary}".encode() not in b"\r\n" + value for _, _, value, _ in parts))
    body = build_multipart(boundary, parts)
    content_types = [f'Multipart/Form-Data; boundary="{boundary}"']
    if re.fullmatch(r"[A-Za-z0-9'+_.-]+", boundary):  # a token may also go unquoted
        content_types.append(f"multipart/form-data; boundary={boundary}")
    for content_type in content_types:
        decoded = request_params(content_type, body)
        assert decoded == [(name, part_type, value) for name, part_type, value, _ in parts]


def test_multipart_name_ending_in_a_backslash_before_another_parameter() -> None:
    body = build_multipart("B", [("a\\", None, b"v", "f.txt")])
    assert parse_multipart("multipart/form-data; boundary=B", body) == [("a\\", None, b"v")]


def test_multipart_part_cap() -> None:
    parts = [("p", None, b"v", None)] * (MAX_PARTS + 1)
    try:
        parse_multipart("multipart/form-data; boundary=B", build_multipart("B", parts))
    except BadRequest as exc:
        assert f"more than {MAX_PARTS} parts" in exc.message
    else:
        raise AssertionError("a form with too many parts was accepted")


@SETTINGS
@given(st.lists(st.tuples(st.text(max_size=15), st.binary(max_size=40)), max_size=40), st.booleans())
def test_urlencoded_round_trips(pairs: list[tuple[str, bytes]], plus_for_space: bool) -> None:
    def encode(raw: bytes) -> str:
        return quote_from_bytes(raw, safe=" " if plus_for_space else "").replace(" ", "+")

    body = "&".join(f"{encode(name.encode())}={encode(value)}" for name, value in pairs).encode()
    assert parse_urlencoded(body) == [(name, None, value) for name, value in pairs]
    assert request_params("application/x-www-form-urlencoded; charset=utf-8", body) == parse_urlencoded(body)


def test_urlencoded_field_cap() -> None:
    try:
        parse_urlencoded(b"&".join([b"a=1"] * (MAX_FIELDS + 1)))
    except BadRequest as exc:
        assert f"more than {MAX_FIELDS} fields" in exc.message
    else:
        raise AssertionError("a form with too many fields was accepted")


@SETTINGS
@given(content_types, st.binary(max_size=200))
def test_raw_bodies_pass_through_untouched(content_type: str | None, body: bytes) -> None:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    assume(mime not in ("multipart/form-data", "application/x-www-form-urlencoded"))
    assert request_params(content_type, body) == [("body", mime or None, body)]


# ---------------------------------------------------------------- the worker's decoding

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(
    st.one_of(st.none(), header_text, st.sampled_from(["application/json", "text/plain", "TEXT/csv; x=y"])),
    st.binary(max_size=300),
    st.booleans(),
)
@example("application/json", b"[" * 100_000, True)
@example("application/json; charset=utf-8", b'{"a": ' * 50_000, True)
def test_worker_decoding_never_raises(content_type: str | None, raw: bytes, decode: bool) -> None:
    value = decode_value(memoryview(raw), content_type, decode)
    if isinstance(value, bytearray):
        assert value == raw


@SETTINGS
@given(json_values, st.sampled_from(["application/json", "Application/JSON; charset=utf-8"]))
def test_worker_json_round_trips(value: object, content_type: str) -> None:
    decoded = decode_value(memoryview(json.dumps(value).encode()), content_type, True)
    assert decoded == value or (isinstance(value, float) and math.isclose(decoded, value))  # type: ignore[arg-type]


@SETTINGS
@given(st.text(max_size=100))
def test_worker_text_round_trips(text: str) -> None:
    assert decode_value(memoryview(text.encode()), "text/plain; charset=utf-8", True) == text
