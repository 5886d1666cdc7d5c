"""Streams words, for the streaming tests: no model, a generator per request.

A request's body says what to do: ``words N [every S] [die_after K] [pad B] [json]``: N words, one
every S seconds, as text (or as JSON objects with ``json``), each padded to B bytes; with
``die_after K`` the worker exits after K words. Any other body is answered in one piece, as its upper-case. Each word a request's stream
sends is appended to ``$TMPDIR/stream_progress.log`` with its request id, and a stream whose client
left says so there, so tests can tell what the handler did.
"""

import os
import tempfile
import time


def _log(line):
    with open(os.path.join(tempfile.gettempdir(), "stream_progress.log"), "a") as log:
        log.write(line + "\n")


def _words(context, idx, count, every, die_after, as_json, pad):
    request_id = context.get_request_id(idx)
    try:
        for i in range(count):
            if context.cancelled(idx):
                _log(f"{request_id} cancelled at {i}")
                return
            if die_after is not None and i == die_after:
                os._exit(9)
            _log(f"{request_id} word {i}")
            word = f"w{i}".ljust(pad, ".")
            yield {"word": word, "index": i} if as_json else word + " "
            time.sleep(every)
    finally:
        _log(f"{request_id} closed")


def handle(data, context):
    if data is None:
        return None
    outputs = []
    for idx, row in enumerate(data):
        body = bytes(row.get("body") or b"").decode()
        parts = body.split()
        if parts[:1] != ["words"]:
            outputs.append(body.upper())
            continue
        options = dict(zip(parts[2::2], parts[3::2]))
        outputs.append(
            _words(
                context, idx, int(parts[1]), float(options.get("every", "0")),
                int(options["die_after"]) if "die_after" in options else None, "json" in parts,
                int(options.get("pad", "0")),
            )
        )
    return outputs
