"""``inference.GRPCInferenceService``, the Open Inference Protocol over gRPC
(``protos/open_inference_grpc.proto``): each method turns its message into one call on the
``DetectionService`` through ``common.open_inference``, as the REST routes of ``http_app.v2`` do,
and leaves through ``grpc_app.servicer.answering``.

Outputs are answered in ``raw_output_contents`` (as Triton does, and as tritonclient reads them);
the input is read from ``raw_input_contents`` or from ``contents.bytes_contents``.
"""

from __future__ import annotations

from common import errors, open_inference
from common.config import Settings
from common.observe import Observer
from common.open_inference import Tensor
from common.pipeline import DetectionService
from grpc_app.servicer import REQUEST_ID_KEY, answering, grpc_status, offered_id, parsed
from grpc_app.stubs import open_inference_grpc_pb2 as pb2
from grpc_app.stubs import open_inference_grpc_pb2_grpc as pb2_grpc

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def message_limits(settings: Settings) -> dict[str, int]:
    """ModelInfer may carry an image, as an upload does."""
    return {f"/{SERVICE_NAME}/ModelInfer": settings.max_upload_bytes}


def _parameter(value: pb2.InferParameter) -> object:
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _input(request: pb2.ModelInferRequest) -> Tensor:
    if len(request.inputs) != 1:
        raise errors.InvalidRequest(f"give one input, 'image' or 'url', not {len(request.inputs)}")
    given = request.inputs[0]
    described = open_inference.check_input(
        {"name": given.name, "datatype": given.datatype, "shape": list(given.shape)}
    )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise errors.InvalidRequest("raw_input_contents must have one entry per input")
        data = open_inference.deserialize_bytes(request.raw_input_contents[0], described.name)
    else:
        data = list(given.contents.bytes_contents)
    return Tensor(described.name, "BYTES", [1], data)


class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: DetectionService):
        self.service = service
        self.settings = service.settings
        self.observer = Observer("grpc", lambda exc: grpc_status(exc).name)

    def _ready(self) -> bool:
        return self.service.is_ready()

    def ServerLive(self, request, context):
        return pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb2.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request, context):
        with answering(context, "ModelReady"):
            request = parsed(request)
            open_inference.check_model(self.settings, request.name, request.version)
        return pb2.ModelReadyResponse(ready=self._ready())

    def ServerMetadata(self, request, context):
        return pb2.ServerMetadataResponse(**open_inference.server_metadata())

    def ModelMetadata(self, request, context):
        with answering(context, "ModelMetadata"):
            request = parsed(request)
            open_inference.check_model(self.settings, request.name, request.version)
        described = open_inference.model_metadata(self.settings)
        return pb2.ModelMetadataResponse(
            name=described["name"],
            versions=described["versions"],
            platform=described["platform"],
            inputs=[pb2.ModelMetadataResponse.TensorMetadata(**item) for item in described["inputs"]],
            outputs=[pb2.ModelMetadataResponse.TensorMetadata(**item) for item in described["outputs"]],
        )

    def ModelInfer(self, request, context):
        with (
            answering(context, "ModelInfer"),
            self.observer.request(offered_id(context), "v2_infer") as record,
        ):
            context.send_initial_metadata(((REQUEST_ID_KEY, record.request_id),))
            request = parsed(request)
            open_inference.check_model(self.settings, request.model_name, request.model_version)
            tensor = _input(request)
            parameters = open_inference.parameters_of(
                {name: _parameter(value) for name, value in request.parameters.items()}, self.settings
            )
            requested = open_inference.check_outputs([output.name for output in request.outputs]) or None
            call = open_inference.infer_call(tensor, parameters, requested, self.settings)
            detection = self.service.detect(call.source, call.options, record, context.is_active)
        tensors = open_inference.output_tensors(detection, call)
        return pb2.ModelInferResponse(
            model_name=self.settings.v2_model_name,
            model_version=open_inference.MODEL_VERSION,
            id=request.id,
            outputs=[
                pb2.ModelInferResponse.InferOutputTensor(
                    name=item.name, datatype=item.datatype, shape=item.shape
                )
                for item in tensors
            ],
            raw_output_contents=[open_inference.raw_data(item) for item in tensors],
        )
