"""Gunicorn settings for the HTTP server, all derived from common.config.

Run from the repository root:  gunicorn -c http_app/gunicorn.conf.py "http_app:create_app()"
"""

import os

from common import api, metrics
from common.config import Settings
from common.logs import stack_formatter

_settings = Settings.from_env()

bind = [f"{_settings.bind_host}:{_settings.http_port}"]
workers = _settings.http_workers
threads = _settings.http_threads
worker_class = "gthread" if _settings.http_threads > 1 else "sync"
# A request may wait for the model to load and for a slow image host before inference; the
# model client's own deadline expires first, so a worker is never killed mid-request.
timeout = int(_settings.request_deadline)
graceful_timeout = 30
# Idle keep-alive connections stay open longer than any Retry-After and than the usual load
# balancer idle timeouts (60 s), so that a client never sends on a connection being closed.
keepalive = 75
# gunicorn's default, stated here because the schema bounds query strings by it (common.api)
limit_request_line = api.REQUEST_LINE_BYTES
# In JSON mode the app's own line per request (common.observe) replaces the access log.
accesslog = "-" if _settings.log_format == "text" else None
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
# gunicorn's own lines in the stack's format (JSON or text), like every other process's
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "stack": {"()": stack_formatter, "process_name": "http", "log_format": _settings.log_format}
    },
    "handlers": {
        "error_console": {
            "class": "logging.StreamHandler",
            "formatter": "stack",
            "stream": "ext://sys.stderr",
        },
        "console": {"class": "logging.StreamHandler", "formatter": "stack", "stream": "ext://sys.stdout"},
    },
    # the app installs its own handler on the root logger (common.logs); gunicorn's default would
    # print every line a second time
    "root": {"level": _settings.log_level, "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": _settings.log_level, "handlers": ["error_console"], "propagate": False},
        # access lines are INFO: at WARNING (JSON mode) the app's own request line stands alone
        "gunicorn.access": {
            "level": "INFO" if accesslog else "WARNING",
            "handlers": ["console"],
            "propagate": False,
        },
    },
}
proc_name = "instance-detector-http"
control_socket = os.path.join(_settings.run_dir, "gunicorn.ctl")


def on_starting(server):
    """In the master, before any worker exists: claim (and if new, empty) the metrics directory."""
    metrics.init_multiprocess(_settings)


def child_exit(server, worker):
    """Multiprocess bookkeeping for a worker that exited (crash, restart or shutdown)."""
    metrics.mark_worker_dead(worker.pid, _settings)
