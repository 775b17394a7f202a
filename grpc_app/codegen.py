"""Generate the Python gRPC stubs from protos/ (the one code-generation step).

    python -m grpc_app.codegen

Runs grpcio-tools' protoc exactly as course clients do (``-I protos``), writing
``inference_pb2.py`` and ``inference_pb2_grpc.py`` into grpc_app/generated/ (not committed,
never hand-edited). Setup, the tests and the Dockerfile all call this module.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "generated"


def generate(out_dir: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> Path:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(path) for path in proto_dir.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    return out_dir


if __name__ == "__main__":
    print(f"generated stubs in {generate()}", file=sys.stderr)
