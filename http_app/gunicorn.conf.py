"""Gunicorn settings for the HTTP server, all derived from common.config.

Run from the repository root:  gunicorn -c http_app/gunicorn.conf.py "http_app:create_app()"
"""

import os

from common import metrics
from common.config import Settings

_settings = Settings.from_env()

bind = [f"{_settings.bind_host}:{_settings.http_port}"]
workers = _settings.http_workers
threads = _settings.http_threads
worker_class = "gthread" if _settings.http_threads > 1 else "sync"
# A request may wait for the model to load and for a slow image host before inference; the
# model client's own deadline expires first, so a worker is never killed mid-request.
timeout = int(_settings.request_deadline)
graceful_timeout = 30
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
proc_name = "instance-detector-http"
control_socket = os.path.join(_settings.run_dir, "gunicorn.ctl")


def on_starting(server):
    """In the master, before any worker exists: claim (and if new, empty) the metrics directory."""
    metrics.init_multiprocess(_settings)


def child_exit(server, worker):
    """Multiprocess bookkeeping for a worker that exited (crash, restart or shutdown)."""
    metrics.mark_worker_dead(worker.pid, _settings)
