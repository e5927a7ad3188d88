"""Helpers for testing against a real kernel process (for llmos and plugin authors).

``with running_kernel(home) as kernel:`` starts ``python -m llmos.kernel`` on an ipc socket
under ``home``, waits until it answers ``ping`` and its driver hosts are ready, and shuts it
down afterwards (killing it if it does not stop).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.contract.protocol import KernelError

from .client import Client


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 120.0,
             interval: float = 0.05) -> Any:
    """``condition()`` once it is truthy, polled every ``interval`` seconds; AssertionError
    naming ``what`` after ``timeout`` seconds (a poll loop in a test fails instead of
    hanging)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass(slots=True)
class KernelProcess:
    home: Path
    address: str
    process: subprocess.Popen[bytes]

    def client(self, name: str = "test", timeout: float = 300.0) -> Client:
        return Client(self.address, name=name, timeout=timeout)

    def log(self) -> str:
        logs = sorted((self.home / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in logs)


@contextmanager
def running_kernel(home: Path, *options: str, start_timeout: float = 180.0,
                   address: str | None = None) -> Iterator[KernelProcess]:
    """A kernel on ``address`` (default: an ipc socket under ``home``)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    address = address or f"ipc://{home / 'run' / 'kernel.sock'}"
    with open(home / "logs" / "kernel.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel", "--home", str(home), "--listen", address,
             *options], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    kernel = KernelProcess(home, address, process)
    try:
        _wait_ready(kernel, start_timeout)
        yield kernel
    finally:
        _stop(kernel)


def _wait_ready(kernel: KernelProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with kernel.client() as client:
        while time.monotonic() < deadline:
            if kernel.process.poll() is not None:
                raise RuntimeError(f"kernel exited with {kernel.process.returncode}\n{kernel.log()}")
            try:
                devices = client.devices()
            except KernelError:
                time.sleep(0.1)
                continue
            if devices and all(d["state"] != "STARTING" for d in devices):
                return
            time.sleep(0.1)
    raise RuntimeError(f"kernel not ready within {timeout} s\n{kernel.log()}")


def _stop(kernel: KernelProcess) -> None:
    if kernel.process.poll() is None:
        with kernel.client() as client:
            try:
                client.shutdown()
            except KernelError:
                pass
        try:
            kernel.process.wait(30)
        except subprocess.TimeoutExpired:
            kernel.process.kill()
            kernel.process.wait()


@dataclass
class ClassifyLoad:
    """What the clients of :func:`classify_load` saw: for each answered request, whether it
    was sent after :attr:`marked` was set and the version that answered; and every error."""

    served: list[tuple[bool, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    marked: threading.Event = field(default_factory=threading.Event)

    def wait_for(self, answered: int, timeout: float = 120.0) -> None:
        """Block until at least ``answered`` requests were answered; AssertionError after
        ``timeout`` seconds."""
        wait_for(lambda: len(self.served) >= answered, f"{answered} answered requests",
                 timeout, interval=0.01)

    def versions(self, after_mark: bool) -> set[str]:
        return {version for after, version in self.served if after is after_mark}


@contextmanager
def classify_load(kernel: KernelProcess, model: str, text: str,
                  clients: int = 4) -> Iterator[ClassifyLoad]:
    """``clients`` threads classify ``text`` with ``model`` back to back until the block
    ends (e.g. while a version swap happens inside it)."""
    load = ClassifyLoad()
    stop = threading.Event()

    def hammer() -> None:
        with kernel.client() as client:
            while not stop.is_set():
                after = load.marked.is_set()
                try:
                    load.served.append((after, client.infer(model, "classify", [text])["model"]))
                except KernelError as exc:
                    load.errors.append(str(exc))

    threads = [threading.Thread(target=hammer) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield load
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def build_tiny_classifier(folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A random 1-layer BERT sentiment classifier (hidden 32) with another model's tokenizer,
    saved as safetensors: a real model small enough for any test."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


@dataclass(slots=True)
class StubKind:
    """A job kind for scheduler and policy tests: answers the scheduler's questions
    (:class:`~llmos.kernel.scheduler.JobQuestions`) with the given functions. Give it to a
    job as ``job.kind`` before queueing it."""

    batch_key: Callable[[Any], Any] = lambda job: None
    candidates: Callable[[Any], list[str]] = lambda job: ["dev"]
    batching: Callable[[Any], Any] = lambda job: None
    cost: Callable[[list[Any], str], float] = lambda jobs, device: 0.0
    background: Callable[[Any], bool] = lambda job: False
