"""`stats`, `info` and `job` tables in units a person reads (the raw values stay for --json)."""

import time

from llmos.shell import views


def test_bytes_durations_times_and_floats_are_humane():
    now = time.time()
    shown = dict(views.mapping("stats", {
        "rss": 3 * 2**30 + 2**29, "uptime": 3725.4, "received": 12, "ratio": 0.123456,
        "devices": {"torch:cpu": {"rss": 512 * 2**20, "state": "READY"}},
        "active": {}, "created_at": now - 90, "error": None, "drivers": ["torch", "openvino"],
    }).tables[0].rows)
    assert shown["rss"] == "3.5 GiB" and shown["devices.torch:cpu.rss"] == "512.0 MiB"
    assert shown["uptime"] == "1h 2m 5s" and shown["received"] == "12"
    assert shown["ratio"] == "0.1235" and shown["devices.torch:cpu.state"] == "READY"
    assert shown["active"] == "-" and shown["error"] == "-"
    assert shown["created_at"].endswith("(2m ago)") and shown["drivers"] == "torch, openvino"


def test_json_keeps_the_raw_values():
    data = {"rss": 1234567, "uptime": 5.25}
    assert views.mapping("stats", data).data == data
