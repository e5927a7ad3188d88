"""The ``llmos`` command as a newcomer meets it (issue 24): with no kernel answering, every
class of command and ``Client()`` fail at once with one message that says what to run
(status 2), instead of waiting for a request's whole timeout; help needs no kernel.

Deadlines here only keep a regression from hanging (a subprocess gets 20 s); what is
asserted is the message and the status."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos import AsyncClient, Client, ErrorCode, KernelError
from llmos.kernel.server import read_pid_file

#: What every "no kernel" error says to run.
START = "llmos kernel start --detach"
#: Longest a command may take before the test fails rather than hangs.
DEADLINE = 20


def llmos(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmos ARGS`` with ``home`` as LLMOS_HOME and no address or keys from outside."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMOS_ADDRESS", "LLMOS_CLIENT_KEY", "LLMOS_SERVER_KEY")}
    return subprocess.run([sys.executable, "-m", "llmos.shell", *args], capture_output=True,
                          text=True, timeout=DEADLINE, env={**env, "LLMOS_HOME": str(home)})


def assert_no_kernel(result: subprocess.CompletedProcess[str], address: str, why: str = "") -> None:
    """Status 2 and one line: TIMEOUT, no kernel at ``address`` (``why``), what to run."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error TIMEOUT: no kernel answers at {address}"), lines[0]
    assert START in lines[0] and why in lines[0], lines[0]


def home_address(home: Path) -> str:
    return f"ipc://{home / 'run' / 'kernel.sock'}"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback TCP port that accepts connections and never says a word (not a kernel)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("words, why", [
    (("jobs",), "no socket file there"),                    # a query
    (("models",), "no socket file there"),
    (("embed", "minilm", "hello"), "no socket file there"),  # a job
    (("kernel", "status"), "no socket file there"),
    (("kernel", "stop"), "no socket file there"),
    (("train", "minilm", "reviews"), ""),                   # a shell command (its own words)
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else None)
def test_with_no_kernel_each_command_class_fails_at_once_saying_what_to_run(home, words, why):
    assert_no_kernel(llmos(home, *words), home_address(home), why)


def test_a_stale_socket_file_is_named(home):
    (home / "run").mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(home / "run" / "kernel.sock"))  # closed without listening: left behind
    assert_no_kernel(llmos(home, "info"), home_address(home), "a stale socket file")


def test_a_wrong_address_fails_at_once(home, silent_port):
    closed = f"tcp://127.0.0.1:{free_port()}"
    assert_no_kernel(llmos(home, "--address", closed, "devices"), closed,
                     "nothing listens on that port")
    silent = f"tcp://127.0.0.1:{silent_port}"
    assert_no_kernel(llmos(home, "--address", silent, "stats"), silent,
                     "no answer to ping within 2 s")
    missing = f"ipc://{home / 'nope.sock'}"
    assert_no_kernel(llmos(home, "--address", missing, "jobs"), missing)
    malformed = llmos(home, "--address", "localhost:5555", "jobs")
    assert malformed.returncode == 2 and "error BAD_REQUEST: cannot connect to 'localhost:5555'" \
        in malformed.stderr and "tcp://HOST:PORT" in malformed.stderr


@pytest.mark.timeout(DEADLINE * 2)
def test_client_and_async_client_fail_at_their_first_request(home, silent_port, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(home))
    monkeypatch.delenv("LLMOS_ADDRESS", raising=False)
    with Client() as kernel:  # the README's example
        with pytest.raises(KernelError) as info:
            kernel.embed("minilm", ["hello", "world"])
    assert info.value.code is ErrorCode.TIMEOUT and START in info.value.message
    assert info.value.message.startswith(f"no kernel answers at {home_address(home)}")

    async def first_call(address: str) -> None:
        async with AsyncClient(address) as kernel:
            await kernel.info()

    address = f"tcp://127.0.0.1:{silent_port}"
    with pytest.raises(KernelError) as info:
        asyncio.run(first_call(address))
    assert info.value.code is ErrorCode.TIMEOUT and START in info.value.message
    assert f"no kernel answers at {address} (no answer to ping" in info.value.message


def test_help_and_version_need_no_kernel(home):
    trained = llmos(home, "train", "--help")
    assert trained.returncode == 0 and trained.stdout.startswith("usage: llmos train")
    assert "--epochs" in trained.stdout and trained.stderr == ""
    assert llmos(home, "help", "kernel", "stop").stdout.startswith("usage: llmos kernel stop")
    assert llmos(home, "--version").stdout.startswith("llmos ")


@pytest.mark.timeout(600)
def test_kernel_stop_leaves_no_socket_and_a_second_stop_says_there_is_no_kernel(home):
    started = llmos_slow(home, "kernel", "start", "--detach", "--devices", "torch:cpu")
    assert started.returncode == 0, started.stderr
    socket_file = home / "run" / "kernel.sock"
    assert socket_file.exists()
    stopped = llmos_slow(home, "kernel", "stop")
    assert stopped.returncode == 0 and "kernel stopped" in stopped.stdout, stopped.stderr
    assert not socket_file.exists() and read_pid_file(home) is None
    assert_no_kernel(llmos(home, "kernel", "stop"), home_address(home), "no socket file there")


def llmos_slow(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmos ARGS`` that starts or stops a kernel (its own, longer deadline)."""
    return subprocess.run([sys.executable, "-m", "llmos.shell", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "LLMOS_HOME": str(home)})
