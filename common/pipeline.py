"""The data plane both servers call: ``DetectionService.predict(url) -> [category names]``.

URL -> validate -> SSRF-guarded fetch -> decode -> the model -> COCO names. The model is given
(``common.model.open_model`` chooses it from the settings), so this module knows nothing of where
it runs.
"""

from __future__ import annotations

from common.config import Settings
from common.decode import decode_image
from common.fetch import ImageFetcher, validate_url
from common.model import Model


class DetectionService:
    def __init__(self, settings: Settings, model: Model):
        self.settings = settings
        self.model = model
        self.fetcher = ImageFetcher(settings)

    def start_loading(self) -> DetectionService:
        self.model.start()
        return self

    def status(self) -> tuple[str, str]:
        """(state, message): state is 'ready', 'loading' or 'failed'."""
        return self.model.status()

    def predict(self, url: object) -> list[str]:
        url = validate_url(url, self.settings.max_url_length)
        self.model.check_usable()  # a model that cannot answer fails the request before any fetch
        image = decode_image(self.fetcher.fetch(url), self.settings.max_image_pixels)
        return self.model.detect(image)
