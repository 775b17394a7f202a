"""The gRPC transport: ``DetectBatch``, its stream of results written as the HTTP API writes them."""

from __future__ import annotations

from collections.abc import Iterator

from client.transport import BatchResult, Failure, Options, ServiceError

# DetectBatch results carry masks; gRPC's default 4 MiB limit on received messages is too tight.
GRPC_MAX_RECEIVE = 64 * 1024 * 1024


class GrpcTransport:
    def __init__(self, target: str, timeout: float):
        import grpc

        from grpc_app import convert
        from grpc_app.stubs import inference_pb2, inference_pb2_grpc

        self.grpc, self.pb2, self.convert = grpc, inference_pb2, convert
        self.target = target
        self.timeout = timeout
        channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", GRPC_MAX_RECEIVE)]
        )
        self.stub = inference_pb2_grpc.InstanceDetectorStub(channel)

    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        pb2 = self.pb2
        images = [pb2.ImageInput(url=url) for url in urls] + [
            pb2.ImageInput(data=data) for _, data in uploads
        ]
        masks = self.convert.mask_format(options.masks)
        request = pb2.DetectBatchRequest(
            images=images,
            options=pb2.DetectOptions(threshold=options.threshold, classes=options.classes, masks=masks),
        )
        try:
            # a deadline for the whole stream, scaled so that each image gets --timeout as over HTTP
            for result in self.stub.DetectBatch(request, timeout=self.timeout * len(images)):
                if result.WhichOneof("result") == "error":
                    yield result.index, Failure(result.error.code, result.error.message)
                else:
                    answer = self.convert.detection_answer(result.detection, options.masks)
                    yield result.index, answer.json_dict()
        except self.grpc.RpcError as exc:
            raise ServiceError(f"{exc.code().name} from {self.target}: {exc.details()}") from None
