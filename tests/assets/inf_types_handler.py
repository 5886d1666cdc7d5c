"""Reports what it received: each parameter's type and value, the request id and chosen headers.

Request headers also steer the response, so tests can check that per-request status, content
type and headers set through the context reach the HTTP response:
``X-Set-Status: 201 Created``, ``X-Set-Content-Type: text/csv``, ``X-Set-Header: name=value``
(the phrase's and the header value's backslash escapes are decoded, so a test can ask for a line break).
"""

import hashlib


def _describe(value):
    if isinstance(value, (bytes, bytearray)):
        return {
            "type": type(value).__name__,
            "len": len(value),
            "sha256": hashlib.sha256(value).hexdigest(),
            # latin-1 maps every byte to one code point, so small payloads show exactly
            "value": bytes(value).decode("latin-1") if len(value) <= 256 else None,
        }
    return {"type": type(value).__name__, "value": value}


def handle(data, context):
    if data is None:
        return None
    outputs = []
    for idx, row in enumerate(data):
        status = context.get_request_header(idx, "X-Set-Status")
        if status:
            code, _, phrase = status.partition(" ")
            context.set_response_status(int(code), phrase.encode().decode("unicode_escape"), idx)
        content_type = context.get_request_header(idx, "X-Set-Content-Type")
        if content_type:
            context.set_response_content_type(idx, content_type)
        header = context.get_request_header(idx, "X-Set-Header")
        if header:
            name, _, value = header.partition("=")
            context.set_response_header(idx, name, value.encode().decode("unicode_escape"))
        outputs.append(
            {
                "params": {name: _describe(value) for name, value in row.items()},
                "request_id": context.get_request_id(idx),
                "headers": {
                    key: context.get_request_header(idx, key)
                    for key in ("X-Custom", "x-custom", "Content-Type", "explain", "url_path")
                },
                "batch": len(data),
                "version": (context.manifest or {}).get("model", {}).get("modelVersion"),
            }
        )
    return outputs
