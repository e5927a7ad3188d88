import pytest

from llmos.contract.protocol import KernelError
from llmos.kernel.jobs import ALLOWED_TRANSITIONS, MAX_ERROR_CHARS, Job, JobHistory, JobState


def test_every_state_has_a_row_and_final_states_are_final():
    assert set(ALLOWED_TRANSITIONS) == set(JobState)
    for state in JobState:
        assert state.finished == (not ALLOWED_TRANSITIONS[state])


def test_allowed_path_sets_timestamps():
    job = Job("infer", "alice", {})
    job.transition(JobState.RUNNING)
    assert job.started_at is not None
    job.transition(JobState.QUEUED)  # requeue after a host died
    job.transition(JobState.RUNNING)
    job.transition(JobState.DONE)
    assert job.finished_at is not None and job.state.finished


@pytest.mark.parametrize("path", [
    [JobState.DONE],  # QUEUED -> DONE skips RUNNING
    [JobState.CANCELLED, JobState.RUNNING],
    [JobState.RUNNING, JobState.DONE, JobState.FAILED],
])
def test_forbidden_transitions_raise(path):
    job = Job("infer", "alice", {})
    with pytest.raises(KernelError):
        for state in path:
            job.transition(state)


def test_job_ids_are_unique_and_increasing():
    a, b = Job("infer", "x", {}), Job("infer", "x", {})
    assert b.id > a.id


def finished(owner: str = "alice", **args) -> Job:
    job = Job("infer", owner, {"model": "m", **args})
    job.transition(JobState.RUNNING)
    job.transition(JobState.DONE)
    return job


def test_history_keeps_bounded_summaries_not_arguments():
    history = JobHistory(max_jobs=10)
    job = finished(inputs=["x" * 1_000_000] * 4)
    job.error = "INTERNAL: " + "e" * 100_000
    job.progress = {"blob": "p" * 10_000}
    history.append(job)
    summary = history.get(job.id)
    assert summary is not None
    assert (summary["id"], summary["owner"], summary["model"], summary["state"]) == (
        job.id, "alice", "m", "DONE")
    assert "inputs" not in summary and "args" not in summary
    assert len(summary["error"]) == MAX_ERROR_CHARS + 3 and summary["error"].startswith("INTERNAL: ")
    assert summary["progress"] == {}
    assert history.nbytes < 4096


def test_history_evicts_the_oldest_past_the_count_cap():
    history = JobHistory(max_jobs=3)
    jobs = [finished() for _ in range(5)]
    for job in jobs:
        history.append(job)
    assert len(history) == 3
    assert [s["id"] for s in history.summaries()] == [j.id for j in jobs[2:]]
    assert history.get(jobs[0].id) is None


def test_history_evicts_the_oldest_past_the_byte_cap():
    history = JobHistory(max_jobs=1000, max_bytes=5000)
    for _ in range(200):
        job = finished()
        job.error = "FAILED: " + "e" * 900
        history.append(job)
        assert history.nbytes <= 5000
    assert 3 <= len(history) < 10
    assert history.get(job.id) is not None


def test_history_filters_by_owner():
    history = JobHistory(max_jobs=10)
    for owner in ("alice", "bob", "alice"):
        history.append(finished(owner))
    assert [s["owner"] for s in history.summaries("alice")] == ["alice", "alice"]
    assert len(history.summaries()) == 3
