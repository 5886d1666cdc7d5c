"""Make the Python modules of the vendored ``.proto`` files again: ``python -m server.grpc.protos.generate``.

Runs grpcio-tools' ``protoc`` (``--python_out`` and ``--pyi_out``) on each file in this directory,
then points each module at marserve's own descriptor pool (``_pool.POOL``) instead of protobuf's
default one, which is the only change made to what ``protoc`` writes. Needs grpcio-tools and
googleapis-common-protos (for ``google/rpc/status.proto``), both in the ``test`` extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("


def include_dirs() -> list[Path]:
    """grpcio-tools' bundled ``google/protobuf`` files, and googleapis-common-protos' ``google/rpc``."""
    import google.rpc.status_pb2
    import grpc_tools

    return [Path(grpc_tools.__file__).parent / "_proto", Path(google.rpc.status_pb2.__file__).parents[2]]


def generate(out: Path = HERE) -> list[Path]:
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", *(f"-I{d}" for d in include_dirs())]
    command += [f"--python_out={out}", f"--pyi_out={out}", *PROTOS]
    subprocess.run(command, check=True, cwd=HERE)
    written = []
    for proto in PROTOS:
        module = out / proto.replace(".proto", "_pb2.py")
        text = module.read_text()
        if text.count(_DEFAULT_POOL) != 1:
            raise SystemExit(f"{module}: protoc's output changed shape; update generate.py")
        text = text.replace(_DEFAULT_POOL, "_POOL.AddSerializedFile(")
        # After protoc's own imports, so that the pool holds the files this one imports.
        text = re.sub(r"(# @@protoc_insertion_point\(imports\)\n)", r"\1\nfrom ._pool import POOL as _POOL\n", text, count=1)
        module.write_text(text)
        written += [module, module.with_suffix(".pyi")]
    return written


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
