"""LitServe serving a model archive's handler, for scripts/benchmark_server.py: the Python peer
that users would pick instead of marserve or TorchServe, doing the same work per request.

Run with .venv-litserve's interpreter (scripts/litserve-venv): LitServe and its FastAPI and uvicorn
from that venv, torch and Pillow from .venv, and the archive's handler loaded from this checkout
the way a marserve worker loads it (as scripts/bench/handler_loop.py does), so the three servers
run the same preprocess, inference and postprocess. The route is ``POST /predictions/<model>``
with the raw body (``application/octet-stream``: FastAPI hands LitServe the bytes, without JSON
or a form); LitServe's own batching (``max_batch_size``, ``batch_timeout``) makes the batches, and
each inference worker calls ``handle`` once a batch. The echo handler's answer goes back as the
raw bytes; any other handler's as JSON, as marserve and TorchServe send it.

    .venv-litserve/bin/python scripts/bench/litserve_app.py --archive store/echo.mar --port 8090 \
        [--batch-size 8] [--max-batch-delay 10] [--workers 1]
"""

# No "from __future__ import annotations": LitServe reads decode_request's annotation as an object.
import argparse
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
from fastapi import Body
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[2]


def load_archive(archive_path: str, batch_size: int) -> tuple[Any, Any, Any]:
    """``(entry, context, archive)`` of a model archive, as server/workers/child/main.py loads it."""
    sys.path.insert(0, str(ROOT))
    import handlers
    from archiver import open_archive
    from handlers.context import Context
    from server.workers.child.loader import load_handler

    archive = open_archive(Path(archive_path).resolve())
    manifest = archive.manifest.model_dump(by_alias=True, exclude_none=True)
    model_dir = str(archive.model_dir)
    os.chdir(model_dir)
    sys.path.insert(0, handlers.COMPAT_PATH)
    sys.path.insert(0, model_dir)
    initialize, entry = load_handler(archive.manifest.model.handler)
    context = Context(
        model_name=archive.manifest.model.model_name,
        model_dir=model_dir,
        manifest=manifest,
        batch_size=batch_size,
        gpu=None,
        mms_version="0.12.0",
        limit_max_image_pixels=True,
        model_yaml_config={},
    )
    initialize(context)
    return entry, context, archive


class ArchiveAPI(ls.LitAPI):
    """Calls the archive's handler once a batch (LitServe spawns its inference workers: this class
    and its settings are pickled, and each worker loads the handler in ``setup``)."""

    def __init__(self, archive: str, batch_size: int, echo: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.archive_path = archive
        self.handler_batch_size = batch_size
        self.echo = echo

    def setup(self, device: str) -> None:
        self.entry, self.context, self.archive = load_archive(self.archive_path, self.handler_batch_size)
        from handlers.context import RequestHeaders, RequestProcessor

        self.processor = RequestProcessor(RequestHeaders({"body": {"content-type": "application/octet-stream"}}))

    # The annotation makes the route's body the raw bytes (FastAPI reads a non-JSON body as is).
    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")]) -> bytes:
        return request

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return inputs

    def predict(self, x: Any) -> Any:
        bodies = x if isinstance(x, list) else [x]
        data = [{"body": bytearray(body)} for body in bodies]
        self.context.request_ids = {i: str(i) for i in range(len(data))}
        self.context.request_processor = [self.processor] * len(data)
        outputs = self.entry(data, self.context)
        return outputs if isinstance(x, list) else outputs[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> Any:
        if self.echo:
            return Response(content=bytes(output), media_type="application/octet-stream")
        return output


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-batch-delay", type=int, default=0, help="ms (LitServe's batch_timeout)")
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes (workers_per_device)")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ transport instead of its queues")
    args = parser.parse_args()

    # The model's name, read without loading the handler (that happens in each worker's setup).
    sys.path.insert(0, str(ROOT))
    from archiver import open_archive

    probe = open_archive(Path(args.archive).resolve())
    model = probe.manifest.model.model_name
    echo = Path(probe.manifest.model.handler).stem == "echo_handler"
    probe.cleanup()

    api = ArchiveAPI(
        args.archive, args.batch_size, echo,
        max_batch_size=args.batch_size, batch_timeout=args.max_batch_delay / 1000, api_path=f"/predictions/{model}",
    )  # fmt: skip
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=120, fast_queue=args.fast_queue
    )
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
