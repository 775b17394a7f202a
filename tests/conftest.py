"""Shared fixtures: checkpoints, the image server, and stacks started from supervisord.conf."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers import ImageServer, Stack, encode, free_port, generate_client_stubs, make_forced_checkpoint, scene

CLASS_A = "kite"
CLASS_B = "giraffe"

# Tight limits so that the hostile-input cases run quickly; production defaults are larger.
FAST_LIMITS = {
    "FETCH_CONNECT_TIMEOUT": "2",
    "FETCH_READ_TIMEOUT": "1.5",
    "FETCH_TOTAL_TIMEOUT": "4",
    "FETCH_MAX_BYTES": str(2 * 1024 * 1024),
    "MAX_IMAGE_PIXELS": str(12_000_000),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two real-architecture checkpoints forcing two different classes: {class: (path, sha256)}."""
    folder = tmp_path_factory.mktemp("weights")
    return {
        name: (folder / f"forced-{name}.pt", make_forced_checkpoint(folder / f"forced-{name}.pt", name, seed))
        for seed, name in enumerate((CLASS_A, CLASS_B))
    }


def _jpeg_with_exif_orientation() -> bytes:
    image = scene(200, 120, seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    return encode(image, "JPEG", exif=exif)


def sample_images() -> dict[str, tuple[bytes, str]]:
    """Images in every format and mode the service must accept: name -> (bytes, content type)."""
    import numpy as np

    base = scene(320, 240, seed=3)
    animated = [scene(160, 120, seed=s) for s in (4, 5, 6)]
    gif = __import__("io").BytesIO()
    animated[0].save(gif, "GIF", save_all=True, append_images=animated[1:], duration=100, loop=0)
    sixteen = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    return {
        "jpeg": (encode(base, "JPEG", quality=90), "image/jpeg"),
        "png": (encode(base, "PNG"), "image/png"),
        "webp": (encode(base, "WEBP"), "image/webp"),
        "gif-animated": (gif.getvalue(), "image/gif"),
        "rgba-png": (encode(base.convert("RGBA"), "PNG"), "image/png"),
        "palette-png": (encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
        "png-16bit": (encode(sixteen, "PNG"), "image/png"),
        "jpeg-exif-rotated": (_jpeg_with_exif_orientation(), "image/jpeg"),
        "cmyk-jpeg": (encode(base.convert("CMYK"), "JPEG"), "image/jpeg"),
    }


@pytest.fixture(scope="session")
def image_server():
    server = ImageServer()
    for name, (body, content_type) in sample_images().items():
        server.add(f"/img/{name}", body, content_type)
    yield server
    server.close()


@pytest.fixture(scope="session")
def closed_port():
    """A loopback port nobody listens on (allowlisted, to test 'connection refused')."""
    return free_port()


@pytest.fixture(scope="session")
def evaluation_port():
    """A loopback port the main stack allows, for the evaluation command's own image server."""
    return free_port()


@pytest.fixture(scope="session")
def stack(tmp_path_factory, checkpoints, image_server, closed_port, evaluation_port):
    """The main stack: class-A checkpoint with its sha256; the test's own servers allowlisted."""
    path, sha256 = checkpoints[CLASS_A]
    allowed = (image_server.port, closed_port, evaluation_port)
    running = Stack(
        tmp_path_factory.mktemp("stack-a"),
        WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
        ALLOWED_PRIVATE_TARGETS=",".join(f"127.0.0.1:{port}" for port in allowed),
        **FAST_LIMITS,
    ).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def grpc_stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc) generated like a course client: ``-I protos``."""
    generate_client_stubs(tmp_path_factory.mktemp("client-stubs"))
    import inference_pb2
    import inference_pb2_grpc

    return inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="session")
def grpc_client(grpc_stubs):
    """``call(target, url)``: Predict through client stubs; the objects, or grpc.RpcError."""
    import grpc

    pb2, pb2_grpc = grpc_stubs

    def call(target, url, timeout=120):
        with grpc.insecure_channel(target) as channel:
            reply = pb2_grpc.InstanceDetectorStub(channel).Predict(
                pb2.InstanceDetectorInput(url=url), timeout=timeout)
        return list(reply.objects)

    return call


@pytest.fixture(scope="session")
def grpc_predict(stack, grpc_client):
    """Predict on the main stack."""
    return lambda url, timeout=120: grpc_client(stack.grpc_target, url, timeout)
