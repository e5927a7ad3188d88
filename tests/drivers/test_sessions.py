"""Sessions named by qualname: the driver host starts the class a task names, runs it in
quanta and forgets it when done or failed; the built-in plugins register theirs."""

from __future__ import annotations

from typing import Any

import psutil
import pytest

from llmos.contract.hostwire import unpack
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.base import Driver
from llmos.drivers.host import run_task
from llmos.drivers.pytorch import TorchDriver
from llmos.drivers.sessions import import_session
from llmos.kernel.plugins import collect, get_plugin_manager

#: Every session this module started, in order.
STARTED: list[Counting] = []


class Counting:
    """Counts its quanta up to ``spec["quanta"]``; ``spec["fail_at"]`` raises there."""

    def __init__(self, spec: dict[str, Any], threads: int) -> None:
        self.spec, self.threads = spec, threads
        self.quanta = 0
        self.closed = False

    @classmethod
    def start(cls, spec: dict[str, Any], threads: int) -> Counting:
        STARTED.append(cls(spec, threads))
        return STARTED[-1]

    @property
    def done(self) -> bool:
        return self.quanta >= self.spec["quanta"]

    def run(self, seconds: float) -> dict[str, Any]:
        self.quanta += 1
        if self.quanta == self.spec.get("fail_at"):
            raise KernelError(ErrorCode.BAD_REQUEST, "counting failed")
        return {"quanta": self.quanta, "done": self.done}

    def close(self) -> None:
        self.closed = True


QUALNAME = f"{__name__}:Counting"


def _task(op: str, spec: dict[str, Any], session: str = QUALNAME) -> dict[str, Any]:
    return {"task": 1, "op": op, "job": "7", "session": session, "spec": spec, "seconds": 0.0}


def _done(driver: Driver, task: dict[str, Any]) -> dict[str, Any]:
    return unpack(run_task(driver, task, psutil.Process())[1])


@pytest.fixture
def driver() -> TorchDriver:
    STARTED.clear()
    return TorchDriver("cpu", 2)


@pytest.mark.parametrize("op", ["compress", "update", "train"])
def test_a_named_session_runs_in_quanta_and_is_forgotten_when_done(driver, op):
    first = _done(driver, _task(op, {"quanta": 2}))
    second = _done(driver, _task(op, {"quanta": 2}))
    assert first["progress"] == {"quanta": 1, "done": False}
    assert second["progress"] == {"quanta": 2, "done": True}
    assert len(STARTED) == 1 and STARTED[0].threads == 2 and STARTED[0].closed
    _done(driver, _task(op, {"quanta": 2}))  # forgotten: the next task starts a new one
    assert len(STARTED) == 2


def test_a_failing_session_fails_its_task_and_is_forgotten(driver):
    body = _done(driver, _task("compress", {"quanta": 3, "fail_at": 1}))
    assert (body["ok"], body["code"], body["message"]) == (False, "BAD_REQUEST", "counting failed")
    assert STARTED[0].closed


def test_forget_closes_a_running_session(driver):
    _done(driver, _task("update", {"quanta": 3}))
    assert _done(driver, {"task": 2, "op": "forget", "job": "7"})["ok"]
    assert STARTED[0].closed


def test_a_name_that_is_no_session_fails_the_task(driver):
    body = _done(driver, _task("compress", {}, session="llmos.drivers.base:Driver"))
    assert body["ok"] is False and body["code"] == "INTERNAL"
    assert "not a llmos session class" in body["message"]


def test_a_driver_without_sessions_refuses_them():
    class Bare(Driver):
        describe = load = unload = run = None  # type: ignore[assignment]

    Bare.__abstractmethods__ = frozenset()
    body = _done(Bare("cpu", 1), _task("compress", {}))
    assert body["ok"] is False and body["code"] == "BAD_REQUEST"


def test_the_built_in_plugins_register_their_sessions():
    sessions = collect(get_plugin_manager()).sessions
    assert list(sessions) == ["compress", "ddp", "update"]
    for name in sessions:
        assert callable(import_session(sessions.get(name).qualname))
