"""Full detections, uploads and batches (docs/api.md), end to end through the real stack: the same
answers by URL and by upload, over HTTP and gRPC; masks only when asked; each bad input its
documented error; batch results streamed with their index; a batch shares the model."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import requests

from testkit.checkpoints import CLASS_A
from testkit.clients import metric_sum
from testkit.images import encode, sample_images, scene

JPEG = encode(scene(320, 240), "JPEG")
WHOLE_IMAGE = [0.0, 0.0, 320.0, 240.0]  # the forced checkpoint's one box: the whole image


@pytest.fixture(scope="module", autouse=True)
def routes(image_server):
    image_server.add("/detect/scene.jpg", JPEG)
    image_server.add("/detect/html", b"<html>not an image</html>", "text/html")


@pytest.fixture(scope="module")
def pb(grpc_stubs):
    return grpc_stubs[0]


@pytest.fixture(scope="module")
def stub(stack, grpc_stubs):
    with grpc.insecure_channel(stack.grpc_target) as channel:
        yield grpc_stubs[1].InstanceDetectorStub(channel)


def detect_http(stack, timeout=120, **kwargs) -> requests.Response:
    return requests.post(stack.http + "/v1/detect", timeout=timeout, **kwargs)


def check_instance(instance, masks=()):
    assert instance["label"] == CLASS_A
    assert instance["score"] > 0.99
    assert instance["box"] == WHOLE_IMAGE
    if not masks:
        assert "mask" not in instance
        return
    assert sorted(instance["mask"]) == sorted(masks)
    if "polygons" in masks:  # the forced mask fills the box: one outline along the image's edges
        (outline,) = instance["mask"]["polygons"]
        xs, ys = outline[0::2], outline[1::2]
        assert min(xs) <= 1 and max(xs) >= 318 and min(ys) <= 1 and max(ys) >= 238
    if "rle" in masks:
        from pycocotools import mask as coco_mask

        rle = instance["mask"]["rle"]
        assert rle["size"] == [240, 320]
        area = coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()})
        assert area > 0.95 * 320 * 240


# -- one image ------------------------------------------------------------------------------------

@pytest.mark.parametrize("masks", ["none", "polygons", "rle", "both"])
def test_detect_by_url_with_each_mask_format(stack, image_server, masks):
    body = {"url": image_server.url("/detect/scene.jpg")}
    if masks != "none":
        body["masks"] = masks
    response = detect_http(stack, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert list(answer) == ["width", "height", "instances"]
    assert (answer["width"], answer["height"]) == (320, 240)
    (instance,) = answer["instances"]
    check_instance(instance, {"none": (), "both": ("polygons", "rle")}.get(masks, (masks,)))
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize("name", ["jpeg", "png", "webp", "gif-animated", "png-16bit", "jpeg-exif-rotated"])
def test_an_upload_answers_as_its_url_does(stack, image_server, name):
    body, content_type = sample_images()[name]
    by_url = detect_http(stack, json={"url": image_server.url(f"/img/{name}"), "masks": "rle"}).json()
    multipart = detect_http(stack, files={"image": (f"{name}.img", body)}, data={"masks": "rle"})
    raw = detect_http(stack, data=body, headers={"Content-Type": content_type}, params={"masks": "rle"})
    assert multipart.status_code == 200, multipart.text
    assert raw.status_code == 200, raw.text
    assert multipart.json() == by_url == raw.json()
    assert by_url["instances"][0]["label"] == CLASS_A


def test_an_upload_over_max_request_bytes_is_taken(stack):
    """Uploads are held to MAX_UPLOAD_BYTES and FETCH_MAX_BYTES, not to MAX_REQUEST_BYTES (64 KiB)."""
    import os

    from PIL import Image

    noisy = encode(Image.frombytes("RGB", (400, 300), os.urandom(400 * 300 * 3)), "PNG")
    assert 64 * 1024 < len(noisy) < 2 * 1024 * 1024
    raw = detect_http(stack, data=noisy, headers={"Content-Type": "image/png"})
    multipart = detect_http(stack, files={"image": ("noise.png", noisy)})
    for answer in (raw, multipart):
        assert answer.status_code == 200, answer.text
        assert (answer.json()["width"], answer.json()["height"]) == (400, 300)


def test_grpc_detect_answers_as_http_does(stack, image_server, stub, pb):
    url = image_server.url("/detect/scene.jpg")
    over_http = detect_http(stack, json={"url": url, "masks": "both", "threshold": 0.5}).json()
    options = pb.DetectOptions(threshold=0.5, masks=pb.MASK_FORMAT_BOTH)
    for image in (pb.ImageInput(url=url), pb.ImageInput(data=JPEG)):
        reply = stub.Detect(pb.DetectRequest(image=image, options=options), timeout=120)
        assert (reply.width, reply.height) == (over_http["width"], over_http["height"])
        (instance,) = reply.instances
        expected = over_http["instances"][0]
        assert instance.label == expected["label"]
        assert [instance.box.x1, instance.box.y1, instance.box.x2, instance.box.y2] == expected["box"]
        assert [list(polygon.xy) for polygon in instance.mask.polygons] == expected["mask"]["polygons"]
        assert instance.mask.rle.counts == expected["mask"]["rle"]["counts"]
    plain = stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=JPEG)), timeout=120)
    assert not plain.instances[0].HasField("mask")


def test_a_class_filter_and_a_threshold_choose_the_instances(stack, image_server):
    url = image_server.url("/detect/scene.jpg")
    others = detect_http(stack, json={"url": url, "classes": ["person", "dog"]})
    assert others.status_code == 200 and others.json()["instances"] == []
    own = detect_http(stack, json={"url": url, "classes": [CLASS_A], "threshold": 0.25}).json()
    assert [instance["label"] for instance in own["instances"]] == [CLASS_A]


def test_the_model_is_described(stack):
    answer = requests.get(stack.http + "/v1/model", timeout=30).json()
    assert CLASS_A in answer["categories"] and len(answer["categories"]) == 80
    assert "N/A" not in answer["categories"] and "__background__" not in answer["categories"]
    assert answer["score_threshold"] == 0.75 and answer["min_score_threshold"] == 0.25
    assert answer["mask_formats"] == ["none", "polygons", "rle", "both"]


def test_detections_leave_the_contract_counter_alone(stack, image_server, stub, pb):
    before = stack.metric_value("app_http_inference_count")
    grpc_before = stack.metric_value("app_grpc_inference_count")
    detected = metric_sum(stack.http, "app_requests_total", protocol="http", endpoint="detect")
    assert detect_http(stack, json={"url": image_server.url("/detect/scene.jpg")}).status_code == 200
    stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=JPEG)), timeout=120)
    assert stack.metric_value("app_http_inference_count") == before
    assert stack.metric_value("app_grpc_inference_count") == grpc_before
    assert metric_sum(stack.http, "app_requests_total", protocol="http", endpoint="detect") == detected + 1


# -- bad inputs -----------------------------------------------------------------------------------

def _http_cases(image_server, closed_port):
    url = image_server.url("/detect/scene.jpg")
    big = JPEG + b"\0" * (2 * 1024 * 1024)  # over the stack's FETCH_MAX_BYTES (2 MiB)
    return [
        ("unknown-field", {"json": {"url": url, "treshold": 0.5}}, 400, "invalid_request"),
        ("no-url", {"json": {"masks": "rle"}}, 400, "invalid_request"),
        ("unknown-query-parameter", {"json": {"url": url}, "params": {"mask": "rle"}}, 400, "invalid_request"),
        ("bad-threshold", {"json": {"url": url, "threshold": 0.01}}, 400, "invalid_request"),
        ("bad-masks", {"json": {"url": url, "masks": "outline"}}, 400, "invalid_request"),
        # an unknown class is refused before the (unreachable) image is fetched
        ("unknown-class", {"json": {"url": f"http://127.0.0.1:{closed_port}/x.jpg", "classes": ["unicorn"]}},
         400, "invalid_request"),
        ("two-images", {"files": {"image": ("a.jpg", JPEG)}, "data": {"url": url}}, 400, "invalid_request"),
        ("no-image", {"files": {"other": ("a.jpg", JPEG)}}, 400, "invalid_request"),
        ("empty-upload", {"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 422, "not_an_image"),
        ("not-an-image", {"files": {"image": ("a.jpg", b"<html></html>")}}, 422, "not_an_image"),
        ("truncated", {"data": JPEG[:600], "headers": {"Content-Type": "image/jpeg"}}, 422, "not_an_image"),
        ("over-fetch-max", {"files": {"image": ("a.jpg", big)}}, 413, "too_large"),
        ("forbidden", {"json": {"url": "http://169.254.169.254/latest/meta-data"}}, 403, "forbidden_target"),
        ("fetched-html", {"json": {"url": image_server.url("/detect/html")}}, 422, "not_an_image"),
    ]


def test_each_bad_input_gets_its_documented_error(stack, image_server, closed_port):
    for name, request, status, code in _http_cases(image_server, closed_port):
        response = detect_http(stack, **request)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, name
    assert stack.predict_http(image_server.url("/detect/scene.jpg")).json() == {"objects": [CLASS_A]}


def test_an_upload_body_is_held_to_max_upload_bytes(tmp_path, checkpoints):
    from testkit.stack import Stack

    path, _ = checkpoints[CLASS_A]
    with Stack(tmp_path, WEIGHTS_FILE=path, MAX_UPLOAD_BYTES=4096).running() as small:
        response = detect_http(small, data=JPEG + b"\0" * 8192, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
        response = detect_http(small, files={"image": ("a.jpg", JPEG + b"\0" * 8192)})
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
        assert detect_http(small, data=JPEG[:3000], headers={"Content-Type": "image/jpeg"}).status_code == 422


def test_grpc_bad_inputs_get_their_status(stack, stub, pb):
    cases = [
        (pb.DetectRequest(), grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        (pb.DetectRequest(image=pb.ImageInput(data=b"")), grpc.StatusCode.INVALID_ARGUMENT, "not_an_image"),
        (pb.DetectRequest(image=pb.ImageInput(data=b"junk")), grpc.StatusCode.INVALID_ARGUMENT, "not_an_image"),
        (pb.DetectRequest(image=pb.ImageInput(data=JPEG), options=pb.DetectOptions(threshold=2)),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        (pb.DetectRequest(image=pb.ImageInput(data=JPEG), options=pb.DetectOptions(classes=["unicorn"])),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        (pb.DetectRequest(image=pb.ImageInput(data=JPEG), options=pb.DetectOptions(masks=7)),
         grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        (pb.DetectRequest(image=pb.ImageInput(data=JPEG + b"\0" * (2 * 1024 * 1024))),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
        (pb.DetectRequest(image=pb.ImageInput(url="http://10.0.0.1/x.jpg")),
         grpc.StatusCode.PERMISSION_DENIED, "forbidden_target"),
    ]
    for request, status, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Detect(request, timeout=60)
        assert caught.value.code() == status, (request, caught.value.details())
        assert caught.value.details().startswith(code + ":"), caught.value.details()


# -- batches --------------------------------------------------------------------------------------

def ndjson(response: requests.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.iter_lines() if line]


def test_a_batch_streams_one_line_per_image_with_its_index(stack, image_server):
    good = image_server.url("/detect/scene.jpg")
    urls = [good, image_server.url("/detect/html"), good, "ftp://example.com/x.jpg"]
    lines = ndjson(requests.post(stack.http + "/v1/detect/batch", json={"urls": urls, "masks": "polygons"},
                                 stream=True, timeout=300))
    assert [line["index"] for line in lines] == [0, 1, 2, 3]
    assert lines[1]["error"]["code"] == "not_an_image"
    assert lines[3]["error"]["code"] == "invalid_request"
    for line in (lines[0], lines[2]):
        check_instance(line["instances"][0], ("polygons",))


def test_a_multipart_batch_mixes_urls_and_uploads(stack, image_server):
    files = [("image", ("a.png", sample_images()["png"][0])), ("image", ("b.jpg", b"junk"))]
    response = requests.post(stack.http + "/v1/detect/batch", files=files,
                             data={"url": image_server.url("/detect/scene.jpg"), "threshold": "0.5"},
                             stream=True, timeout=300)
    lines = ndjson(response)
    assert [line["index"] for line in lines] == [0, 1, 2]  # the url field first, then the files
    assert lines[0]["instances"][0]["label"] == CLASS_A
    assert lines[1]["instances"][0]["label"] == CLASS_A
    assert lines[2]["error"]["code"] == "not_an_image"


def test_a_batch_refused_whole_gets_one_json_error(stack, image_server):
    url = image_server.url("/detect/scene.jpg")
    cases = [
        ({"urls": []}, 400, "invalid_request"),
        ({"urls": url}, 400, "invalid_request"),
        ({"urls": [url] * 33}, 413, "too_large"),  # MAX_BATCH_IMAGES is 32
        ({"urls": [url], "classes": ["unicorn"]}, 400, "invalid_request"),
        ({"images": [url]}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        response = requests.post(stack.http + "/v1/detect/batch", json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["code"] == code


def test_grpc_batch_streams_results_and_errors(stack, image_server, stub, pb):
    images = [pb.ImageInput(url=image_server.url("/detect/scene.jpg")), pb.ImageInput(data=b"junk"),
              pb.ImageInput(data=JPEG), pb.ImageInput()]
    results = list(stub.DetectBatch(pb.DetectBatchRequest(images=images), timeout=300))
    assert [result.index for result in results] == [0, 1, 2, 3]
    assert [result.WhichOneof("result") for result in results] == ["detection", "error", "detection", "error"]
    assert results[1].error.code == "not_an_image"
    assert results[3].error.code == "invalid_request"
    assert results[2].detection.instances[0].label == CLASS_A
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.DetectBatch(pb.DetectBatchRequest(images=[pb.ImageInput(data=JPEG)] * 33), timeout=60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_single_request_is_not_kept_waiting_behind_a_whole_batch(stack, image_server):
    """A batch keeps one image at the model at a time: a single request sent while it runs is
    answered long before the batch is done (a FIFO of all its images would answer it last)."""
    url = image_server.url("/detect/scene.jpg")
    events: list[tuple[str, int]] = []
    first_line = threading.Event()

    def run_batch():
        response = requests.post(stack.http + "/v1/detect/batch", json={"urls": [url] * 12},
                                 stream=True, timeout=600)
        for line in response.iter_lines():
            if line:
                events.append(("batch", json.loads(line)["index"]))
                first_line.set()

    batch = threading.Thread(target=run_batch)
    batch.start()
    assert first_line.wait(300), "the batch answered nothing"
    started = time.monotonic()
    assert stack.predict_http(url).json() == {"objects": [CLASS_A]}
    events.append(("single", int(time.monotonic() - started)))
    batch.join(600)
    order = [kind for kind, _ in events]
    assert order.count("batch") == 12
    # answered while at least half of the batch was still to come
    assert order.index("single") <= 7, events
