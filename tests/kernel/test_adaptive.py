"""Adaptive batching (kernel/scheduler/adaptive.py) alone and inside the Scheduler."""

from __future__ import annotations

from llmos.kernel.jobs import Job
from llmos.kernel.scheduler import BatchingConfig, Devices, Scheduler
from llmos.kernel.scheduler.adaptive import DELAY_SHARE, MAX_DELAY, AdaptiveBatching
from llmos.kernel.scheduler.fifo import FifoPolicy
from llmos.kernel.testing import StubKind

KEY = ("m:1", "embed")
CEILING = BatchingConfig(32, 0.002, adaptive=True)


def job(queued_at: float = 0.0, n: int = 1, batching: BatchingConfig = CEILING) -> Job:
    made = Job("infer", "c", {"handle": "m:1", "task": "embed", "inputs": ["x"] * n},
               kind=StubKind(batch_key=lambda j: (j.args["handle"], j.args["task"]),
                             batching=lambda j: batching))
    made.queued_at = queued_at
    return made


def one_device() -> Devices:
    return Devices({"dev": 1})


def scheduler() -> Scheduler:
    return Scheduler(FifoPolicy())


def test_one_client_runs_alone_at_once():
    adaptive = AdaptiveBatching()
    adaptive.slots("dev", 1)
    adaptive.queued(1, KEY, 1, now=0.0)
    assert adaptive.config(KEY, CEILING, now=0.0).max_batch_size == 1


def test_outstanding_inputs_split_into_one_group_per_stream_plus_one():
    for streams, size in ((1, 16), (2, 11), (3, 8)):
        adaptive = AdaptiveBatching()
        adaptive.slots("dev", streams)
        for i in range(32):
            adaptive.queued(i, KEY, 1, now=0.0)
        adaptive.started([0], KEY, "dev", now=0.0)
        assert adaptive.config(KEY, CEILING, now=0.0).max_batch_size == size


def test_the_ceiling_bounds_the_size_and_a_backlog_reaches_it():
    adaptive = AdaptiveBatching()
    for i in range(500):
        adaptive.queued(i, KEY, 1, now=0.0)
    assert adaptive.config(KEY, CEILING, now=0.0).max_batch_size == 32


def test_the_peak_follows_a_rise_at_once_and_decays_after_a_fall():
    adaptive = AdaptiveBatching()
    for i in range(32):
        adaptive.queued(i, KEY, 1, now=0.0)
    adaptive.started(list(range(32)), KEY, "dev", now=0.0)
    adaptive.finished(range(32), now=0.05)
    assert adaptive.config(KEY, CEILING, now=0.05).max_batch_size == 16  # peak remembered
    assert adaptive.config(KEY, CEILING, now=1.0).max_batch_size == 8  # halved after 1 s
    assert adaptive.config(KEY, CEILING, now=10.0).max_batch_size == 1


def test_the_delay_is_a_share_of_the_measured_batch_time():
    adaptive = AdaptiveBatching()
    adaptive.queued(1, KEY, 1, now=0.0)
    assert adaptive.config(KEY, CEILING, now=0.0).max_queue_delay == CEILING.max_queue_delay
    adaptive.started([1], KEY, "dev", now=0.0)
    adaptive.finished([1], now=0.04)
    assert adaptive.config(KEY, CEILING, now=0.04).max_queue_delay == DELAY_SHARE * 0.04
    adaptive.queued(2, KEY, 1, now=1.0)
    adaptive.started([2], KEY, "dev", now=1.0)
    adaptive.finished([2], now=11.0)
    assert adaptive.config(KEY, CEILING, now=11.0).max_queue_delay == MAX_DELAY


def test_a_requeued_job_is_counted_once_and_a_dropped_one_not_at_all():
    adaptive = AdaptiveBatching()
    adaptive.queued(1, KEY, 3, now=0.0)
    adaptive.started([1], KEY, "dev", now=0.0)
    adaptive.queued(1, KEY, 3, now=0.1)  # its host died: back in the queue
    assert adaptive.keys[KEY].outstanding == 3
    adaptive.finished([1], now=0.2)  # the lost task's end: the job is queued, still counted
    assert adaptive.keys[KEY].outstanding == 3
    adaptive.dropped(1)
    assert adaptive.keys[KEY].outstanding == 0
    assert not adaptive.jobs


def test_batches_never_reported_finished_are_forgotten():
    adaptive = AdaptiveBatching()
    adaptive.queued(1, KEY, 1, now=0.0)
    adaptive.started([1], KEY, "dev", now=0.0)
    adaptive.queued(2, KEY, 1, now=1000.0)
    adaptive.started([2], KEY, "dev", now=1000.0)
    assert list(adaptive.jobs) == [2] and list(adaptive.batches) == [2]


def test_scheduler_with_32_closed_loop_clients_forms_groups_of_16():
    sched = scheduler()
    jobs = [job() for _ in range(32)]
    for made in jobs:
        sched.push(made)
    batches, _ = sched.schedule(one_device(), now=0.0)
    assert [len(b.jobs) for b in batches] == [16]
    sched.finished(batches[0].jobs, now=0.05)
    batches, _ = sched.schedule(one_device(), now=0.05)
    assert [len(b.jobs) for b in batches] == [16]


def test_scheduler_waits_the_adaptive_delay_for_a_partial_group():
    sched = scheduler()
    first = [job() for _ in range(32)]
    for made in first:
        sched.push(made)
    batches, _ = sched.schedule(one_device(), now=0.0)
    sched.finished(batches[0].jobs, now=0.08)  # 80 ms a batch: wait up to 10 ms
    batches, _ = sched.schedule(one_device(), now=0.08)
    sched.finished(batches[0].jobs, now=0.16)
    for made in (late := [job(queued_at=0.16) for _ in range(4)]):
        sched.push(made)
    batches, wake_at = sched.schedule(one_device(), now=0.161)
    assert batches == [] and wake_at is not None
    assert abs(wake_at - (0.16 + DELAY_SHARE * 0.08)) < 1e-9
    batches, _ = sched.schedule(one_device(), now=wake_at)
    assert [j.id for j in batches[0].jobs] == [j.id for j in late]


def test_fixed_knobs_stay_fixed():
    sched = Scheduler(FifoPolicy())
    for _ in range(32):
        sched.push(job(batching=BatchingConfig(32, 0.0)))
    batches, _ = sched.schedule(one_device(), now=0.0)
    assert [len(b.jobs) for b in batches] == [32]
