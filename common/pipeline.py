"""The data plane both servers call: ``DetectionService.predict(url, record) -> [category names]``.

URL -> validate -> model usable? -> admission -> SSRF-guarded fetch -> decode -> the model -> COCO
names. The model is given (``common.model.open_model`` chooses it from the settings), so this
module knows nothing of where it runs. Each request is recorded (``common.observe``): the servers
open the record, this module fills in its host, stages and object count.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from common.admission import Admission
from common.config import Settings
from common.decode import decode_image
from common.fetch import ImageFetcher, validate_url
from common.model import ClientAlive, Model
from common.observe import RequestRecord


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

    def predict(
        self, url: object, record: RequestRecord, client_alive: ClientAlive | None = None
    ) -> list[str]:
        url = validate_url(url, self.settings.max_url_length)
        record.image_host = urlsplit(url).hostname or ""
        self.model.check_usable()  # a model that cannot answer fails the request before any fetch
        with self.admission.admitted(), record.in_flight():  # Overloaded: shed before any fetch
            with record.stage("fetch"):
                data = self.fetcher.fetch(url)
            with record.stage("decode"):
                image = decode_image(data, self.settings.max_image_pixels)
            del data
            detection = self.model.detect(image, client_alive)
        record.stages["queue_wait"] = detection.queue_seconds
        record.stages["inference"] = detection.pass_seconds
        record.objects = len(detection.objects)
        return detection.objects
