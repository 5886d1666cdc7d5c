"""A handler that cannot even be imported: its dependency does not exist."""

import marserve_no_such_module  # noqa: F401


def handle(data, context):
    return [b"unreachable" for _ in data or []]
