"""The data plane both servers call.

- ``predict(url, record)``: the course contract, category names of the image at a URL;
- ``detect(source, options, record)``: full detections of one image, by URL or upload;
- ``start_batch(sources, options, ...)``: many images, results as each one is done.

Each path: input checks -> model usable? -> admission -> SSRF-guarded fetch (or the upload) ->
decode -> the model. The model is given (``common.model.open_model`` chooses it from the
settings), so this module knows nothing of where it runs. Each image is recorded
(``common.observe``): the servers open the record, this module fills in its host, stages and
object count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

from PIL import Image

from common.admission import Admission
from common.config import Settings
from common.decode import decode_image
from common.errors import DetectionError, InvalidRequest, NotAnImage, NotReady, TooLarge
from common.fetch import ImageFetcher, validate_url
from common.model import ClientAlive, Detection, DetectOptions, Model
from common.model.detection import check_classes
from common.observe import RequestRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSource:
    """An image to detect in: a URL to fetch, or the uploaded bytes (one of the two)."""

    url: object = None  # as the client sent it: checked by validate_url
    data: bytes | None = None
    name: str = ""  # an upload's file name, if it had one
    problem: str = ""  # why the client's description of the image is unusable (an InvalidRequest)

    @property
    def uploaded(self) -> bool:
        return self.data is not None


# Opens the record of a batch's image ``index`` (the server's Observer.request, with an id of its own).
OpenRecord = Callable[[int], AbstractContextManager[RequestRecord]]


class DetectionService:
    def __init__(self, settings: Settings, model: Model):
        self.settings = settings
        self.model = model
        self.fetcher = ImageFetcher(settings)
        self.admission = Admission(settings)

    def start_loading(self) -> DetectionService:
        self.model.start()
        return self

    def status(self) -> tuple[str, str]:
        """(state, message): state is 'ready', 'loading' or 'failed'."""
        return self.model.status()

    def is_ready(self) -> bool:
        return self.status()[0] == "ready"

    def categories(self) -> list[str]:
        """The names the served model can report; ``NotReady`` while it is not loaded."""
        categories = self.model.categories()
        if categories is None:
            raise NotReady(f"model not loaded: {self.status()[1]}")
        return categories

    # -- one image -------------------------------------------------------------------------

    def predict(
        self, url: object, record: RequestRecord, client_alive: ClientAlive | None = None
    ) -> list[str]:
        """The category names of the image at ``url`` (above ``SCORE_THRESHOLD``, best first)."""
        return self.detect(ImageSource(url=url), None, record, client_alive).objects

    def detect(
        self,
        source: ImageSource,
        options: DetectOptions | None,
        record: RequestRecord,
        client_alive: ClientAlive | None = None,
    ) -> Detection:
        """One image: names only (``options`` None) or full detections as ``options`` ask."""
        source = self.check_source(source, record)
        self.check_options(options)
        self.model.check_usable()  # a model that cannot answer fails the request before any fetch
        with self.admission.admitted(), record.in_flight():  # Overloaded: shed before any fetch
            image = self.load_image(source, record)
            return self.run_model(image, options, record, client_alive)

    # -- many images -----------------------------------------------------------------------

    def start_batch(
        self,
        sources: list[ImageSource],
        options: DetectOptions,
        open_record: OpenRecord,
        client_alive: ClientAlive | None = None,
    ) -> BatchRun:
        """Check the batch whole and admit it (errors raise here, before anything is fetched); the
        returned ``BatchRun`` yields each image's result as it is done."""
        if not sources:
            raise InvalidRequest("the batch has no images")
        if len(sources) > self.settings.max_batch_images:
            raise TooLarge(
                f"the batch has {len(sources)} images, more than "
                f"{self.settings.max_batch_images} (MAX_BATCH_IMAGES)"
            )
        self.check_options(options)
        self.model.check_usable()
        return BatchRun(self, sources, options, open_record, client_alive)

    # -- steps (public: a batch runs them image by image) ----------------------------------

    def check_source(self, source: ImageSource, record: RequestRecord) -> ImageSource:
        if source.problem:
            raise InvalidRequest(source.problem)
        if source.data is None:
            url = validate_url(source.url, self.settings.max_url_length)
            record.image_host = urlsplit(url).hostname or ""
            return ImageSource(url=url)
        record.image_host = "upload"
        if not source.data:
            raise NotAnImage("the uploaded image is empty")
        if len(source.data) > self.settings.fetch_max_bytes:
            raise TooLarge(f"the uploaded image is larger than {self.settings.fetch_max_bytes} bytes")
        return source

    def check_options(self, options: DetectOptions | None) -> None:
        """Unknown classes fail before any fetch, once the model's names are known (the model
        checks them again in any case)."""
        if options is not None and options.classes:
            known = self.model.categories()
            if known is not None:
                check_classes(options.classes, known)

    def load_image(self, source: ImageSource, record: RequestRecord) -> Image.Image:
        """Fetch (unless uploaded) and decode, each stage timed in ``record``."""
        with record.stage("fetch"):
            data = source.data if source.data is not None else self.fetcher.fetch(str(source.url))
        with record.stage("decode"):
            return decode_image(
                data, self.settings.max_image_pixels, "the upload" if source.uploaded else "the URL's body"
            )

    def run_model(
        self,
        image: Image.Image,
        options: DetectOptions | None,
        record: RequestRecord,
        client_alive: ClientAlive | None,
    ) -> Detection:
        detection = self.model.detect(image, client_alive, options)
        record.stages["queue_wait"] = detection.queue_seconds
        record.stages["inference"] = detection.pass_seconds
        record.objects = len(detection.objects if detection.instances is None else detection.instances)
        return detection


BatchResult = tuple[int, Detection | DetectionError]


class BatchRun:
    """A running batch: iterate for ``(index, Detection or DetectionError)`` as each image is done;
    ``close()`` (or the end of the iteration) gives back its admission slot.

    The batch holds one admission slot throughout and keeps one image at the model at a time,
    fetching and decoding the next one meanwhile: single requests from other clients queue
    behind at most one of its passes, not behind all of them."""

    def __init__(
        self,
        service: DetectionService,
        sources: list[ImageSource],
        options: DetectOptions,
        open_record: OpenRecord,
        client_alive: ClientAlive | None,
    ):
        self.service, self.sources, self.options = service, sources, options
        self.open_record, self.client_alive = open_record, client_alive
        self._resources = ExitStack()
        self._resources.enter_context(service.admission.admitted())  # Overloaded: refused whole
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-fetch")
        self._resources.callback(self._fetcher.shutdown, wait=False, cancel_futures=True)

    def close(self) -> None:
        self._resources.close()

    def __iter__(self) -> Iterator[BatchResult]:
        try:
            ahead = self._prepare(0)
            for index in range(len(self.sources)):
                if self.client_alive is not None and not self.client_alive():
                    return
                current = ahead
                if index + 1 < len(self.sources):
                    ahead = self._prepare(index + 1)
                yield index, self._finish(index, current)
        finally:
            self.close()

    def _prepare(self, index: int) -> Future:
        """Checks, fetch and decode of image ``index`` on the fetch thread: (image or error, record
        fields)."""

        def load() -> tuple[Image.Image | DetectionError, RequestRecord]:
            scratch = RequestRecord("batch", "")
            try:
                source = self.service.check_source(self.sources[index], scratch)
                return self.service.load_image(source, scratch), scratch
            except DetectionError as exc:
                return exc, scratch

        return self._fetcher.submit(load)

    def _finish(self, index: int, prepared: Future) -> Detection | DetectionError:
        loaded, scratch = prepared.result()
        try:
            with self.open_record(index) as record, record.in_flight():
                record.image_host = scratch.image_host
                record.stages.update(scratch.stages)
                if isinstance(loaded, DetectionError):
                    raise loaded
                return self.service.run_model(loaded, self.options, record, self.client_alive)
        except DetectionError as exc:
            return exc
        except Exception:  # recorded as internal by the record; the other images carry on
            log.exception("unhandled error in a batch's image %d", index)
            return DetectionError("internal error; see the service log")
