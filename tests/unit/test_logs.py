"""Request ids, request records and the two log formats."""

from __future__ import annotations

import json
import logging

import pytest

from common.logs import JsonFormatter, TextFormatter
from common.observe import request_id


@pytest.mark.parametrize("offered", ["abc-123", "trace.42:a/b", "x" * 128, "0af7651916cd43dd8448eb211c80319c"])
def test_sane_request_ids_are_honoured(offered):
    assert request_id(offered) == offered


@pytest.mark.parametrize("offered", [None, "", "has space", "x" * 129, "new\nline", "quote\"d", "ünï"])
def test_other_request_ids_are_replaced(offered):
    made = request_id(offered)
    assert made != offered and len(made) == 32 and int(made, 16) >= 0
    assert request_id(offered) != made  # a new one each time


def _record(message="http 200 ok", **request_fields):
    record = logging.LogRecord("common.requests", logging.INFO, __file__, 1, message, (), None)
    if request_fields:
        record.request = request_fields
    return record


def test_json_lines_carry_the_request_fields_at_the_top_level():
    line = JsonFormatter("http").format(_record(request_id="r1", protocol="http", stages={"fetch": 0.01},
                                               objects=2, reason="bad"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["process"] == "http" and entry["level"] == "INFO" and entry["logger"] == "common.requests"
    assert (entry["request_id"], entry["stages"], entry["objects"]) == ("r1", {"fetch": 0.01}, 2)
    assert entry["message"] == "http 200 ok" and entry["time"].endswith("+00:00")


def test_json_lines_carry_tracebacks_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter("model").format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_text_lines_append_the_request_fields():
    line = TextFormatter("grpc").format(_record("grpc OK ok", request_id="r2", stages={"fetch": 0.5},
                                               reason="two words"))
    assert "[grpc:" in line and line.endswith('request_id=r2 stages=fetch:0.5 reason="two words"')
