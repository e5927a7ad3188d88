"""Cancel, renice, deadlines and queue limits on a real kernel whose device is kept busy.

A 256-text embed job (long texts) occupies the only device for seconds; jobs submitted
behind it stay QUEUED long enough to act on them. Batches are limited to 8 texts so that
8-text jobs never merge and their order shows the scheduler's decisions.
"""

import time

import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel.testing import running_kernel, wait_for

LONG_TEXT = "the committee discussed the quarterly budget and the new hiring plan " * 12


@pytest.fixture(scope="module")
def busy_kernel():
    from tests.conftest import short_home

    home = short_home()
    with running_kernel(home, "--max-jobs-per-client", "5", "--max-batch-size", "8",
                        "--policy", "priority", "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
        yield kernel


def occupy(client):
    """Submit the blocker and wait until it runs; returns its pending request."""
    blocker = client.submit("infer", {"model": "minilm", "task": "embed",
                                      "inputs": [LONG_TEXT] * 256}, events=True)
    job_id = blocker.job_id()
    wait_for(lambda: client.job(job_id)["state"] == "RUNNING", "the blocker to run",
             interval=0.01)
    return blocker


def small(client, tag, **options):
    return client.submit("infer", {"model": "minilm", "task": "embed",
                                   "inputs": [f"{tag} {i}" for i in range(8)], **options},
                         events=True)


def test_cancel_a_queued_job(busy_kernel):
    with busy_kernel.client() as client:
        blocker = occupy(client)
        victim = small(client, "victim")
        victim_id = victim.job_id()
        assert client.job(victim_id)["state"] == "QUEUED"
        assert client.cancel(victim_id)["state"] == "CANCELLED"
        with pytest.raises(KernelError) as info:
            victim.result()
        assert info.value.code is ErrorCode.CANCELLED
        with pytest.raises(KernelError) as again:
            client.cancel(victim_id)
        assert again.value.code is ErrorCode.BAD_REQUEST
        assert blocker.result()["embeddings"].shape == (256, 384)


def test_renice_moves_a_queued_job_ahead(busy_kernel):
    with busy_kernel.client() as client:
        blocker = occupy(client)
        first = small(client, "first", priority=5)
        second = small(client, "second", priority=5)
        second_id = second.job_id()
        assert client.renice(second_id, -10)["priority"] == -10
        blocker.result()
        first_job, second_job = first.result()["job"], second.result()["job"]
        started = {j: client.job(j)["started_at"] for j in (first_job, second_job)}
    assert started[second_job] < started[first_job]


def test_a_job_past_its_deadline_times_out(busy_kernel):
    with busy_kernel.client() as client:
        blocker = occupy(client)
        late = small(client, "late", timeout=0.3)
        with pytest.raises(KernelError) as info:
            late.result()
        assert info.value.code is ErrorCode.TIMEOUT
        assert client.job(late.job_id())["state"] == "TIMED_OUT"
        blocker.result()


def test_a_client_past_its_queue_limit_gets_busy_at_once(busy_kernel):
    with busy_kernel.client(name="greedy") as client:
        blocker = occupy(client)
        queued = [small(client, f"q{i}") for i in range(4)]  # 1 running + 4 queued = limit 5
        started = time.monotonic()
        with pytest.raises(KernelError) as info:
            client.embed("minilm", ["one too many"])
        refused_in = time.monotonic() - started
        assert info.value.code is ErrorCode.BUSY and "limit 5" in info.value.message
        assert refused_in < 1.0  # answered at once, not after the queue drained
        with busy_kernel.client(name="polite") as other:
            assert other.embed("minilm", ["another client is not limited"]).shape == (1, 384)
        blocker.result()
        for pending in queued:
            assert pending.result()["embeddings"].shape == (8, 384)


def test_control_syscalls_answer_while_work_runs(busy_kernel):
    with busy_kernel.client() as client:
        blocker = occupy(client)
        started = time.monotonic()
        client.ping()
        client.stats()
        client.jobs()
        control_time = time.monotonic() - started
        assert client.job(blocker.job_id())["state"] == "RUNNING"
        blocker.result()
    assert control_time < 0.5
