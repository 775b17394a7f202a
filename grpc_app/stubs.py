"""Import the generated stubs under the names clients use (``inference_pb2``, ``inference_pb2_grpc``,
and the Open Inference Protocol's ``open_inference_grpc_pb2`` and ``open_inference_grpc_pb2_grpc``).

protoc's ``-I protos`` output imports ``inference_pb2`` as a top-level module, so its folder
goes on sys.path rather than being a package of ours.
"""

import sys

from grpc_app.codegen import OUT_DIR

if not (OUT_DIR / "open_inference_grpc_pb2_grpc.py").exists():
    raise ImportError(f"gRPC stubs are missing in {OUT_DIR}: run `python -m grpc_app.codegen`")
if str(OUT_DIR) not in sys.path:
    sys.path.insert(0, str(OUT_DIR))

import inference_pb2
import inference_pb2_grpc
import open_inference_grpc_pb2
import open_inference_grpc_pb2_grpc

__all__ = ["inference_pb2", "inference_pb2_grpc", "open_inference_grpc_pb2", "open_inference_grpc_pb2_grpc"]
