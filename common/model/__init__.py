"""The model: weights, the detector and its detect paths, and where it runs.

A server gets its model from ``open_model(settings)``: under supervisord (``MODEL_PROCESS=1``) a
``RemoteModel``, the client of the stack's one model process (``python -m common.model.server``);
otherwise a ``LocalModel`` loaded in this process. Both offer the ``Model`` interface. Importing
this package does not import torch: a server whose model lives in the model process never does.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from common.config import Settings
from common.model.detection import ClientAlive, Detection, DetectOptions
from common.model.local import LocalModel
from common.model.remote import RemoteModel


class Model(Protocol):
    def start(self) -> None:
        """Begin loading, if this object loads the model itself (returns at once)."""

    def status(self) -> tuple[str, str]:
        """(state, message): state is 'ready', 'loading' or 'failed'."""

    def check_usable(self) -> None:
        """Raise ``NotReady`` at once if the model cannot answer (e.g. its weights failed to load)."""

    def categories(self) -> list[str] | None:
        """The names the model can report (no placeholders); None while it is not loaded."""

    def detect(
        self,
        image: Image.Image,
        client_alive: ClientAlive | None = None,
        options: DetectOptions | None = None,
    ) -> Detection:
        """The instances above the threshold, best first (names; with ``options``, full
        detections as they ask); waits (up to ``MODEL_WAIT_TIMEOUT``) while the model is still
        loading. ``Cancelled`` if ``client_alive`` turns False before the pass starts;
        ``InvalidRequest`` for a class the model does not have."""


__all__ = ["ClientAlive", "DetectOptions", "Detection", "Model", "open_model"]


def open_model(settings: Settings) -> Model:
    """The model a server uses, as configured; not yet started."""
    return RemoteModel(settings) if settings.model_process else LocalModel(settings)
