"""Shared fixtures: real kernel processes on ipc sockets under short temporary homes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.kernel.testing import KernelProcess, running_kernel


def short_home() -> Path:
    # ipc socket paths are limited to 107 bytes: keep homes short, not under pytest's tmp_path.
    return Path(tempfile.mkdtemp(prefix="llmos-t-"))


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_home()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_kernel() -> Iterator[KernelProcess]:
    """One kernel for the session with the bundled MiniLM imported and loaded (PyTorch only:
    placement across drivers has its own tests)."""
    path = short_home()
    with running_kernel(path, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
        yield kernel
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def chat_kernel() -> Iterator[KernelProcess]:
    """One kernel for the session with SmolLM2 imported from its package (converted from
    GGUF by the real import path) and loaded, and MiniLM for embeddings."""
    path = short_home()
    with running_kernel(path, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("smollm2")
            client.load("smollm2")
            client.import_model("minilm")
            client.load("minilm")
        yield kernel
    shutil.rmtree(path, ignore_errors=True)
