"""top's view is a pure function of two samples: tested without a kernel or a terminal."""

from llmos.shell import render
from llmos.shell.top import TopSample, gather

HOST = {"cpu_percent": 37.0, "memory_total": 8 * 2**30, "memory_used": 3 * 2**30,
        "load": [1.5, 1.0, 0.5]}
DEVICE = {"name": "torch:cpu", "state": "READY", "pid": 42, "threads": 2, "rss": 450 * 2**20,
          "loaded": ["minilm:1"], "inflight": 1, "restarts": 0}
MODELS = [{"model": "minilm", "version": 1, "serving": True, "loaded_on": ["torch:cpu"]},
          {"model": "minilm", "version": 2, "serving": False, "loaded_on": []}]
JOB = {"id": 7, "owner": "alice", "syscall": "infer", "model": "minilm", "state": "RUNNING",
       "priority": 0, "device": "torch:cpu", "cpu_seconds": 1.5, "peak_memory": 2**20,
       "created_at": 1.0, "error": None}


def stats(finished, received, uptime=100.0):
    return {"uptime": uptime, "pid": 1234, "rss": 50 * 2**20, "received": received,
            "rejected": 2, "replies": received, "dropped_replies": 0, "queued": 3,
            "active": {"RUNNING": 1, "QUEUED": 3}, "finished": {"DONE": finished - 1, "FAILED": 1},
            "clients": {"alice": 4}, "devices": {}}


def sample(at, finished, received):
    return TopSample(at, stats(finished, received), [DEVICE], MODELS, [JOB], HOST)


def test_rates_are_over_the_time_between_samples():
    view = gather(sample(12.0, finished=50, received=400), sample(10.0, finished=40, received=300))
    assert view.data["throughput"] == {"jobs_per_second": 5.0, "requests_per_second": 50.0}
    assert "throughput 5.00 jobs/s, 50.00 requests/s" in view.text
    assert "3 queued, 1 running, 50 finished" in view.text
    assert "host cpu 37%, memory 3.0 GiB / 8.0 GiB, load 1.50 1.00 0.50" in view.text


def test_the_first_sample_averages_over_the_uptime():
    view = gather(sample(10.0, finished=50, received=400), None)
    assert view.data["throughput"] == {"jobs_per_second": 0.5, "requests_per_second": 4.0}


def test_tables_show_devices_loaded_models_queues_and_jobs():
    view = gather(sample(12.0, 50, 400), None)
    tables = {t.title: t for t in view.tables}
    assert tables["devices"].rows == (("torch:cpu", "READY", 1, "450.0 MiB", "minilm:1", 0),)
    assert tables["loaded models"].rows == (("minilm:1", "*", "torch:cpu"),)
    assert tables["queues"].rows == (("alice", 4),)
    assert [row[0] for row in tables["unfinished jobs"].rows] == [7]
    assert view.data["loaded"] == [MODELS[0]]


def test_the_view_renders_for_a_terminal():
    text = render.to_ansi(gather(sample(12.0, 50, 400), None), width=100)
    assert "torch:cpu" in text and "\x1b[" in text
