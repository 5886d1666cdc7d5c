"""Answers each request with as many bytes as its body asks for (a decimal number), so tests
can make responses of any size from small requests."""


def handle(data, context):
    if data is None:
        return None
    return [b"x" * int(row.get("body") or row.get("data")) for row in data]
