"""Helpers for the shell tests: running ``llmos shell`` as a subprocess, and a kernel of
their own (one torch:cpu device, MiniLM imported and loaded through the shell) that they
may keep busy and cancel jobs on without disturbing the session's ``minilm_kernel``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmos.kernel.testing import KernelProcess, running_kernel
from tests.conftest import short_home

#: A long text: 256 of them keep the only device busy for seconds (see test_job_control).
LONG_TEXT = "the committee discussed the quarterly budget and the new hiring plan " * 12


def run_shell(kernel: KernelProcess, *args: str,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``llmos shell --address KERNEL ARGS...`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "llmos.shell", "shell", "--address", kernel.address, *args],
        capture_output=True, text=True, timeout=300, input=stdin, env=dict(os.environ))


@pytest.fixture(scope="module")
def shell_kernel() -> Iterator[KernelProcess]:
    path = short_home()
    with running_kernel(path, "--devices", "torch:cpu") as kernel:
        setup = run_shell(kernel, "-c", "import minilm; load minilm")
        assert setup.returncode == 0, setup.stderr
        yield kernel
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def long_texts(tmp_path):
    """A file of 256 long texts, one a line: ``embed minilm --file`` on it runs for seconds."""
    path = tmp_path / "long.txt"
    path.write_text("\n".join([LONG_TEXT] * 256))
    return path
