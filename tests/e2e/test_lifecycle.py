"""``llmos kernel start --detach`` / ``kernel stop`` against real kernel processes: stop
returns once the process has exited, start reports the pid that actually serves, and a
CURVE start that could not work fails at once saying what to do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.client import Client, CurveKeys
from llmos.kernel.config import KernelConfig
from llmos.kernel.security import KeyStore
from llmos.kernel.server import read_pid_file

#: Environment that would point the command elsewhere than the test's home.
_FOREIGN = ("LLMOS_ADDRESS", "LLMOS_CLIENT_KEY", "LLMOS_SERVER_KEY", "LLMOS_HOME")


def llmos(home: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    return subprocess.run([sys.executable, "-m", "llmos.shell", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**clean, "LLMOS_HOME": str(home), **(env or {})})


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its new parent has exited too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def started_pid(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    match = re.search(r"kernel pid (\d+) listening on", result.stdout)
    assert match, result.stdout
    return int(match[1])


@pytest.fixture
def kernel_home(home: Path) -> Iterator[Path]:
    """A home whose detached kernel, if a test leaves one, is terminated afterwards."""
    yield home
    record = read_pid_file(home)
    if record:
        os.kill(int(record["pid"]), signal.SIGTERM)


@pytest.mark.timeout(600)
def test_stop_waits_for_the_exit_and_start_reports_the_pid_that_serves(kernel_home):
    first = started_pid(llmos(kernel_home, "kernel", "start", "--detach", "--devices", "torch:cpu"))
    record = read_pid_file(kernel_home)
    with Client(record["address"], timeout=10) as client:
        assert client.info()["pid"] == first == record["pid"]
    # A second start while it runs fails at once and names the running kernel.
    again = llmos(kernel_home, "kernel", "start", "--detach", "--devices", "torch:cpu")
    assert again.returncode == 2 and "BUSY" in again.stderr and str(first) in again.stderr

    stopped = llmos(kernel_home, "kernel", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"kernel stopped (pid {first} exited)" in stopped.stdout
    assert gone(first)  # checked when the command has returned, not later

    # Started right after the stop: the new process is the one reported, and it answers.
    second = started_pid(llmos(kernel_home, "kernel", "start", "--detach", "--devices", "torch:cpu"))
    assert second != first
    with Client(read_pid_file(kernel_home)["address"], timeout=10) as client:
        assert client.info()["pid"] == second
    # No time to exit: the command says the kernel still runs, and how to end it.
    hurried = llmos(kernel_home, "kernel", "stop", "--wait", "0")
    assert hurried.returncode == 1 and "TIMEOUT" in hurried.stderr
    assert f"still runs after 0 s (`kill {second}`" in hurried.stderr
    deadline = time.monotonic() + 120
    while not gone(second) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(second) and read_pid_file(kernel_home) is None


def test_stop_with_no_kernel_says_so(home):
    result = llmos(home, "kernel", "stop")
    assert result.returncode == 2 and "no kernel answers at" in result.stderr
    assert "llmos kernel start --detach" in result.stderr


def test_a_failing_detached_start_reports_the_kernels_own_error(home):
    result = llmos(home, "kernel", "start", "--detach", "--devices", "nope:cpu")
    assert result.returncode == 2 and "nope" in result.stderr
    assert read_pid_file(home) is None


def test_curve_without_keys_fails_at_once_in_the_config_and_the_cli(home):
    with pytest.raises(KernelError) as info:
        KernelConfig(home=home, curve=True)
    assert info.value.code is ErrorCode.NOT_FOUND
    assert "llmos keys create --client NAME" in info.value.message
    store = KeyStore(home)
    store.server_keys(create=True)  # a kernel key, but no client allowed yet
    with pytest.raises(KernelError) as info:
        KernelConfig(home=home, curve=True)
    assert info.value.code is ErrorCode.DENIED and "llmos keys allow" in info.value.message

    for detach in (("--detach",), ()):  # a foreground start fails as fast
        began = time.monotonic()
        result = llmos(home, "kernel", "start", "--curve", *detach, timeout=60)
        took = time.monotonic() - began
        assert result.returncode == 2 and "DENIED" in result.stderr
        assert "llmos keys create --client NAME" in result.stderr
        assert took < 10, f"took {took:.1f} s"
        assert read_pid_file(home) is None


@pytest.mark.timeout(600)
def test_detached_curve_start_needs_the_clis_own_client_key(kernel_home):
    store = KeyStore(kernel_home)
    store.server_keys(create=True)
    secret = store.create_client("ops")
    store.allow("ops", secret.with_suffix(".key"), ["admin"])
    began = time.monotonic()
    result = llmos(kernel_home, "kernel", "start", "--detach", "--curve", timeout=60)
    took = time.monotonic() - began
    assert result.returncode == 2 and "LLMOS_CLIENT_KEY" in result.stderr
    assert "llmos keys create --client NAME" in result.stderr
    assert took < 10, f"took {took:.1f} s"
    assert read_pid_file(kernel_home) is None

    keys = {"LLMOS_CLIENT_KEY": str(secret), "LLMOS_SERVER_KEY": str(store.root / "server.key")}
    pid = started_pid(llmos(kernel_home, "kernel", "start", "--detach", "--curve",
                            "--devices", "torch:cpu", env=keys))
    curve = CurveKeys.from_files(secret, store.root / "server.key")
    with Client(read_pid_file(kernel_home)["address"], timeout=10, curve=curve) as client:
        assert client.info()["pid"] == pid
    stopped = llmos(kernel_home, "kernel", "stop", env=keys)
    assert stopped.returncode == 0, stopped.stderr
    assert gone(pid)
