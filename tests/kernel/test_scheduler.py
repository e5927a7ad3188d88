from llmos.kernel.jobs import Job
from llmos.kernel.scheduler import BatchingConfig, Devices, Scheduler
from llmos.kernel.scheduler.fifo import FifoPolicy
from llmos.kernel.scheduler.priority import PriorityPolicy
from llmos.kernel.testing import StubKind


class Harness:
    """A scheduler whose jobs all have ``kind``, and devices whose hardware is ``hardware``."""

    def __init__(self, policy, kind, hardware=lambda device: device):
        self.scheduler, self.kind, self.hardware = Scheduler(policy), kind, hardware

    def push(self, job):
        job.kind = self.kind
        self.scheduler.push(job)

    def schedule(self, free, now, busy=frozenset()):
        free = dict(free) if isinstance(free, dict) else dict.fromkeys(free, 1)
        busy = dict(busy) if isinstance(busy, dict) else dict.fromkeys(busy, "")
        return self.scheduler.schedule(
            Devices(free, busy, {d: self.hardware(d) for d in free}), now)

    def __len__(self):
        return len(self.scheduler)


def infer_job(model="m", n=1, priority=0, queued_at=0.0):
    job = Job("infer", "c", {"handle": model, "task": "embed", "inputs": ["x"] * n},
              priority=priority)
    job.queued_at = queued_at
    return job


def make(policy, max_batch=4, delay=0.0):
    return Harness(policy, StubKind(
        batch_key=lambda j: (j.args["handle"], j.args["task"]) if j.syscall == "infer" else None,
        candidates=lambda j: ["dev"],
        batching=lambda j: BatchingConfig(max_batch, delay),
    ))


def test_fifo_batches_compatible_jobs_up_to_the_size_limit():
    sched = make(FifoPolicy(), max_batch=4)
    jobs = [infer_job(n=1) for _ in range(3)] + [infer_job(n=2)]
    for job in jobs:
        sched.push(job)
    batches, _ = sched.schedule({"dev"}, now=1.0)
    assert len(batches) == 1
    assert [j.id for j in batches[0].jobs] == [j.id for j in jobs[:3]]  # 3 + 2 > 4
    assert len(sched) == 1


def test_incompatible_jobs_are_not_batched_together():
    sched = make(FifoPolicy(), max_batch=8)
    a, b = infer_job("a"), infer_job("b")
    sched.push(a)
    sched.push(b)
    batches, _ = sched.schedule({"dev"}, now=1.0)
    assert [j.id for j in batches[0].jobs] == [a.id]


def test_priority_runs_lower_nice_first():
    sched = make(PriorityPolicy(), max_batch=1)
    low, high = infer_job("a", priority=10), infer_job("b", priority=-5)
    sched.push(low)
    sched.push(high)
    batches, _ = sched.schedule({"dev"}, now=0.0)
    assert batches[0].jobs == [high]


def test_aging_lets_a_starved_job_overtake():
    policy = PriorityPolicy(aging_seconds=1.0)
    old_low = infer_job("a", priority=10, queued_at=0.0)
    new_high = infer_job("b", priority=-5, queued_at=100.0)
    assert policy.rank(old_low, now=100.0) < policy.rank(new_high, now=100.0)


def test_a_partial_batch_waits_for_the_queue_delay_and_holds_the_device():
    sched = make(FifoPolicy(), max_batch=4, delay=0.010)
    first = infer_job("a", queued_at=1.0)
    sched.push(first)
    batches, wake_at = sched.schedule({"dev"}, now=1.001)
    assert batches == [] and abs(wake_at - 1.010) < 1e-9
    sched.push(infer_job("b", queued_at=1.002))  # lower-ranked, other model: must not jump ahead
    batches, _ = sched.schedule({"dev"}, now=1.003)
    assert batches == []
    batches, _ = sched.schedule({"dev"}, now=1.011)
    assert batches[0].jobs == [first]


def test_a_full_batch_goes_at_once_and_busy_devices_get_nothing():
    sched = make(FifoPolicy(), max_batch=2, delay=10.0)
    for _ in range(2):
        sched.push(infer_job("a", queued_at=0.0))
    assert sched.schedule(set(), now=0.0) == ([], None)
    batches, _ = sched.schedule({"dev"}, now=0.0)
    assert batches[0].size == 2


def test_the_cheapest_free_device_is_chosen_and_its_hardware_is_then_busy():
    costs = {"torch:cpu": 3.0, "openvino:cpu": 1.0, "torch:cuda:0": 2.0}
    sched = Harness(FifoPolicy(), StubKind(
        batch_key=lambda j: (j.args["handle"], j.args["task"]),
        candidates=lambda j: list(costs), batching=lambda j: BatchingConfig(1, 0.0),
        cost=lambda jobs, device: costs[device]),
        hardware=lambda device: "cpu" if device.endswith(":cpu") else device)
    jobs = [infer_job("a"), infer_job("a"), infer_job("a")]
    for job in jobs:
        sched.push(job)
    batches, _ = sched.schedule(set(costs), now=0.0)
    assert [(b.device, b.jobs) for b in batches] == [
        ("openvino:cpu", [jobs[0]]), ("torch:cuda:0", [jobs[1]])]  # one batch per hardware
    assert len(sched) == 1


def test_background_jobs_neither_wait_for_nor_block_busy_hardware():
    sched = Harness(FifoPolicy(), StubKind(
        batch_key=lambda j: None if j.syscall == "train" else ("a", "embed"),
        candidates=lambda j: ["torch:cpu"] if j.syscall == "train" else ["openvino:cpu"],
        batching=lambda j: BatchingConfig(1, 0.0), background=lambda j: j.syscall == "train"),
        hardware=lambda device: "cpu")
    train = Job("train", "c", {})
    sched.push(train)
    batches, _ = sched.schedule({"torch:cpu", "openvino:cpu"}, 0.0, frozenset({"cpu"}))
    assert [b.jobs for b in batches] == [[train]]  # started although the cpu is busy
    infer = infer_job("a")
    sched.push(infer)
    batches, _ = sched.schedule({"openvino:cpu"}, 0.0)  # training runs, cpu not busy
    assert [b.jobs for b in batches] == [[infer]]
    sched.push(infer_job("a"))
    assert sched.schedule({"openvino:cpu"}, 0.0, frozenset({"cpu"}))[0] == []


def test_with_all_hardware_busy_the_queue_is_not_even_ranked():
    """The kernel schedules on every arriving request: while nothing can start, a pass
    must not cost work per queued job (ranking, candidate lookups)."""
    consulted: list[int] = []
    sched = Harness(FifoPolicy(), StubKind(
        batch_key=lambda j: ("a", "embed"),
        candidates=lambda j: consulted.append(j.id) or ["openvino:cpu", "torch:cpu"],
        batching=lambda j: BatchingConfig(32, 0.0)), hardware=lambda device: "cpu")
    for _ in range(20):
        sched.push(infer_job("a"))
    assert sched.schedule({"openvino:cpu", "torch:cpu"}, 0.0, frozenset({"cpu"})) == ([], None)
    assert consulted == []
    batches, _ = sched.schedule({"openvino:cpu", "torch:cpu"}, 0.0)  # the cpu is free again
    assert len(batches) == 1 and batches[0].size == 20 and consulted


def test_a_device_with_streams_takes_one_batch_per_free_stream_and_no_one_joins_it():
    sched = Harness(FifoPolicy(), StubKind(
        batch_key=lambda j: ("a", "embed"),
        candidates=lambda j: ["openvino:cpu", "torch:cpu"],
        batching=lambda j: BatchingConfig(2, 0.0),
        cost=lambda jobs, device: 1.0 if device == "openvino:cpu" else 2.0),
        hardware=lambda device: "cpu")
    for _ in range(8):
        sched.push(infer_job("a"))
    batches, _ = sched.schedule({"openvino:cpu": 2, "torch:cpu": 1}, 0.0)
    assert [b.device for b in batches] == ["openvino:cpu", "openvino:cpu"]  # torch: cpu held
    # one stream still runs on the cpu: the other may start, torch may not
    batches, _ = sched.schedule({"openvino:cpu": 1, "torch:cpu": 1}, 0.0, {"cpu": "openvino:cpu"})
    assert [b.device for b in batches] == ["openvino:cpu"]
    assert sched.schedule({"torch:cpu": 1}, 0.0, {"cpu": "openvino:cpu"}) == ([], None)
    assert len(sched) == 2
