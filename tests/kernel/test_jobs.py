import pytest

from llmos.kernel.jobs import ALLOWED_TRANSITIONS, Job, JobState
from llmos.kernel.protocol import KernelError


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
