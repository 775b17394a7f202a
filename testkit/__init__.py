"""Support shared by the tests (``tests/``) and the benchmark (``bench/``); neither imports the other.

Nothing here is a mock: checkpoints are the real torchvision architecture saved with
``torch.save``, the stack is the repository's own supervisord.conf with gunicorn, the gRPC server
and the model process, and images travel over HTTP on 127.0.0.1.

- ``testkit.stack``         ``Stack`` (supervisord from supervisord.conf), ``free_port``, ``process_tree``
- ``testkit.clients``       what a course client does: ``generate_client_stubs``, ``metric_value``
- ``testkit.image_server``  ``ImageServer``: a loopback HTTP server with routes for hostile cases
- ``testkit.images``        generated pictures (``scene``, ``photo_like``, ``image_set``,
                            ``sample_images``) and ``encode``
- ``testkit.checkpoints``   real-architecture state dicts: forced-class and realistic
- ``testkit.compare``       the same-answers comparison of two detectors' outputs
- ``testkit.settings``      ``settings_for``: ``common.config.Settings`` from a few variables
- ``testkit.make_checkpoint``  ``python -m testkit.make_checkpoint /tmp/kite.pt kite``
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # supervisord, supervisorctl, grpcurl live beside python
