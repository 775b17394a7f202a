"""Between the gRPC messages (``protos/inference.proto``) and the data plane's types.

Requests become what the HTTP adapter makes of JSON: the options are checked by the same
``common.api.Options``, the image becomes an ``ImageSource``. Answers are built from the same
``Detection``, and read back (by the CLI, and by the round-trip test) as ``common.api``'s
``DetectResponse``, so that both protocols answer the same thing.
"""

from __future__ import annotations

from pydantic import ValidationError

from common import api, errors
from common.config import Settings
from common.model import Detection, DetectOptions
from common.model.detection import MASK_FORMATS, PIXEL_DECIMALS, SCORE_DECIMALS
from common.pipeline import ImageSource
from grpc_app.stubs import inference_pb2


def options(message: inference_pb2.DetectOptions, settings: Settings) -> DetectOptions:
    """A request's ``DetectOptions`` message, checked as a JSON body's options are."""
    if message.masks not in range(len(MASK_FORMATS)):  # proto3 keeps unknown enum numbers
        raise errors.InvalidRequest(f"unknown mask format {message.masks}")
    values: dict[str, object] = {
        "classes": api.listed_names(message.classes),
        "masks": MASK_FORMATS[message.masks],
    }
    if message.HasField("threshold"):
        values["threshold"] = message.threshold
    try:
        checked = api.Options.model_validate(values, strict=True, context={"settings": settings})
    except ValidationError as exc:
        raise api.validation_problem(exc, "options") from None
    return checked.detect_options(settings)


def mask_format(masks: str) -> int:
    """The ``MaskFormat`` number of a mask format's name ('none', 'polygons', 'rle', 'both')."""
    return inference_pb2.MaskFormat.Value(f"MASK_FORMAT_{masks.upper()}")


def source(image: inference_pb2.ImageInput) -> ImageSource:
    which = image.WhichOneof("source")
    if which is None:  # refused when its turn comes: in a batch, the other images carry on
        return ImageSource(problem="the image has neither 'url' nor 'data'")
    return ImageSource(url=image.url) if which == "url" else ImageSource(data=image.data)


def detection_message(detection: Detection) -> inference_pb2.DetectResponse:
    message = inference_pb2.DetectResponse(width=detection.width, height=detection.height)
    for instance in detection.instances or []:
        item = message.instances.add(label=instance.label, score=instance.score)
        item.box.x1, item.box.y1, item.box.x2, item.box.y2 = instance.box
        if instance.polygons is not None:
            for polygon in instance.polygons:
                item.mask.polygons.add(xy=polygon)
        if instance.rle is not None:
            item.mask.rle.size[:] = instance.rle["size"]
            item.mask.rle.counts = instance.rle["counts"]
    return message


def batch_result(index: int, result: Detection | errors.DetectionError) -> inference_pb2.DetectBatchResult:
    if isinstance(result, errors.DetectionError):
        error = inference_pb2.ErrorStatus(code=result.code, message=result.message)
        return inference_pb2.DetectBatchResult(index=index, error=error)
    return inference_pb2.DetectBatchResult(index=index, detection=detection_message(result))


def detection_answer(message: inference_pb2.DetectResponse, masks: str) -> api.DetectResponse:
    """A ``DetectResponse`` message as HTTP answers it, for a request that asked for ``masks``
    (a message cannot tell an empty list of outlines from none asked for). Scores and corners are
    rounded as the service rounds them, undoing float32's blur."""
    asked = DetectOptions(0.0, (), masks)
    instances = []
    for item in message.instances:
        mask = None
        if asked.wants_masks:
            polygons = [list(polygon.xy) for polygon in item.mask.polygons] if asked.polygons else None
            rle = None
            if asked.rle and item.mask.HasField("rle"):
                rle = api.Rle(size=list(item.mask.rle.size), counts=item.mask.rle.counts)
            mask = api.Mask(polygons=polygons, rle=rle)
        box = [round(value, PIXEL_DECIMALS) for value in (item.box.x1, item.box.y1, item.box.x2, item.box.y2)]
        score = round(item.score, SCORE_DECIMALS)
        instances.append(api.InstanceOut(label=item.label, score=score, box=box, mask=mask))
    return api.DetectResponse(width=message.width, height=message.height, instances=instances)
