"""A full disk never kills or deafens the kernel (issue 17).

Each test runs a real kernel whose home is a small tmpfs (a real file system that fills
up), fills it (with a preallocated filler file beside the home) and drives one writer:
import, a train job's checkpoint, learn, audited calls (also on a CURVE kernel, whose IO
thread writes the DENIED entries). Each failed write gets an error reply naming what could
not be written, the kernel answers ``ping`` all along, and nothing half-written is left;
a kernel restarted on a home a crash left half-written sweeps it. Needs root (or
CAP_SYS_ADMIN) to mount the tmpfs: skipped with the reason otherwise.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel.client import Client, CurveKeys
from llmos.kernel.security import KeyStore
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import KernelProcess, build_tiny_classifier, running_kernel

MIB = 2**20
#: Seconds a client waits for a reply: a deaf kernel fails a test in minutes, not hours.
REPLY_TIMEOUT = 120
#: Names of half-written files and folders (checkpoints, import staging, export staging).
PARTIAL_NAMES = (".staging-", ".onnx-", ".openvino-")


@contextmanager
def tmpfs(size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted on a fresh short folder (ipc paths stay short)."""
    folder = Path(tempfile.mkdtemp(prefix="llmos-fd-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        folder.rmdir()


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


@contextmanager
def filled(mount: Path, leave: int = 0) -> Iterator[Path]:
    """Fill the file system of ``mount`` but ``leave`` bytes with one preallocated file,
    removed afterwards."""
    filler = mount / "filler"
    with open(filler, "wb") as fh:
        size = free_bytes(mount) - leave
        if size > 0:
            os.posix_fallocate(fh.fileno(), 0, size)
    try:
        yield filler
    finally:
        filler.unlink()


def partials(home: Path) -> list[Path]:
    """Half-written files or folders under ``home``."""
    return sorted(p for p in home.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(PARTIAL_NAMES))


@contextmanager
def pinging(kernel: KernelProcess, client: Client | None = None) -> Iterator[list[str]]:
    """Ping the kernel back to back from another thread while the block runs; the list
    holds every ping that failed. At least one ping is answered before the block ends."""
    failures: list[str] = []
    answered = threading.Event()
    stop = threading.Event()

    def ping() -> None:
        with (client or kernel.client(timeout=REPLY_TIMEOUT)) as pinger:
            while not stop.is_set() or not answered.is_set():
                try:
                    pinger.ping(timeout=REPLY_TIMEOUT)
                    answered.set()
                except KernelError as exc:
                    failures.append(str(exc))
                    return
                stop.wait(0.05)

    thread = threading.Thread(target=ping)
    thread.start()
    try:
        yield failures
    finally:
        stop.set()
        thread.join()


def sentiment_csv(path: Path, rows: int) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows // 2):
            writer.writerow([f"a wonderful film, number {i}", "pos"])
            writer.writerow([f"a dreadful film, number {i}", "neg"])
    return path


@pytest.fixture(scope="module")
def tiny() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="llmos-tiny-"))
    yield build_tiny_classifier(folder / "tiny", _minilm_path())
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def disk(tiny: Path) -> Iterator[tuple[KernelProcess, Path]]:
    """A kernel whose home is on a 48 MiB tmpfs (too small for MiniLM's 90 MB) with the
    tiny classifier (~5 MB) imported; each test fills the disk as it needs and frees it."""
    with tmpfs(48) as mount:
        with running_kernel(mount / "home", "--devices", "torch:cpu") as kernel:
            with kernel.client(timeout=REPLY_TIMEOUT) as client:
                client.import_model(path=str(tiny), name="tiny")
            yield kernel, mount


@pytest.mark.timeout(300)
def test_an_import_that_does_not_fit_fails_and_leaves_nothing(disk):
    kernel, mount = disk
    before = free_bytes(mount)
    with pinging(kernel) as ping_failures, kernel.client(timeout=REPLY_TIMEOUT) as client:
        with pytest.raises(KernelError) as info:
            client.import_model("minilm")
        models = {m["model"] for m in client.models()}
    assert info.value.code is ErrorCode.INTERNAL
    assert "the disk is full: could not write" in info.value.message
    assert "minilm" in info.value.message
    assert ping_failures == [] and kernel.process.poll() is None
    assert models == {"tiny"} and not (kernel.home / "models" / "minilm").exists()
    assert partials(kernel.home) == []
    assert free_bytes(mount) > before - MIB  # the copied part is gone, not just hidden


@pytest.mark.timeout(300)
def test_a_checkpoint_that_does_not_fit_fails_the_job_and_leaves_no_tmp(disk, tmp_path):
    kernel, mount = disk
    data = sentiment_csv(tmp_path / "sentiment.csv", rows=400)
    with filled(mount, leave=MIB), pinging(kernel) as ping_failures:  # a checkpoint: ~12 MB
        with kernel.client(timeout=REPLY_TIMEOUT) as client:
            pending = client.submit("train", {
                "model": "tiny", "path": str(data), "name": "tiny-trained", "epochs": 1,
                "batch_size": 8, "max_tokens": 16, "quantum": 0.2, "checkpoint_every": 0},
                events=True)
            job_id = pending.job_id()
            with pytest.raises(KernelError) as info:
                pending.result()
            job = client.job(job_id)
            models = {m["model"] for m in client.models()}
    assert info.value.code is ErrorCode.INTERNAL
    assert "the disk is full: could not write the checkpoint" in info.value.message
    assert f"jobs/{job['id']}/checkpoint.tmp" in info.value.message
    assert job["state"] == "FAILED" and "the disk is full" in job["error"]
    assert ping_failures == [] and kernel.process.poll() is None
    assert "tiny-trained" not in models
    assert partials(kernel.home) == []


@pytest.mark.timeout(300)
def test_feedback_that_does_not_fit_is_refused_whole(disk):
    kernel, mount = disk
    batch = [{"text": f"review {i}: " + "a fine film " * 500, "label": "positive"}
             for i in range(40)]  # ~240 KB: far beyond what is left in the last page
    with kernel.client(timeout=REPLY_TIMEOUT) as client:
        before = client.stats("tiny")["buffered_feedback"]
        with filled(mount), pinging(kernel) as ping_failures:
            with pytest.raises(KernelError) as info:
                client.learn("tiny", batch)
        after = client.learn("tiny", batch[:2])  # room again: stored, the refused batch not
    assert info.value.code is ErrorCode.INTERNAL
    assert "the disk is full: could not write 40 feedback example(s) for tiny" in info.value.message
    assert "feedback.db" in info.value.message
    assert ping_failures == [] and kernel.process.poll() is None
    assert after["accepted"] == 2 and after["buffered"] == before + 2


@pytest.mark.timeout(300)
def test_audited_calls_go_on_when_the_audit_log_cannot_be_written(disk):
    kernel, mount = disk
    log = kernel.home / "audit.log"
    with kernel.client(timeout=REPLY_TIMEOUT) as client:
        with filled(mount), pinging(kernel) as ping_failures:
            codes = set()
            for job_id in range(900_000, 900_100):  # ~100 entries: more than a page's slack
                with pytest.raises(KernelError) as info:
                    client.cancel(job_id)
                codes.add(info.value.code)
            loaded = client.load("tiny")
            predictions = client.classify("tiny", ["a fine film"])
            unloaded = client.unload("tiny")
            failures = client.stats()["audit_failures"]
        with pytest.raises(KernelError):
            client.cancel(1_000_000)  # room again: written after a LOST entry
    entries = [json.loads(line) for line in log.read_text().splitlines()]  # whole lines only
    (lost,) = [e for e in entries if e["result"] == "LOST"]
    assert codes == {ErrorCode.NOT_FOUND}
    assert loaded["devices"] and len(predictions) == 1 and unloaded["devices"]
    assert ping_failures == [] and kernel.process.poll() is None
    assert lost["who"] == "kernel" and lost["syscall"] == "audit"
    assert lost["args"]["entries"] >= 50 and "the disk is full" in lost["args"]["error"]
    assert failures == lost["args"]["entries"]  # stats counts what the LOST entry reports
    assert entries[-1]["args"] == {"id": 1_000_000} and entries[-2] is lost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_denied_requests_on_a_full_disk_leave_a_curve_kernel_answering(monkeypatch):
    with tmpfs(16) as mount:
        home = mount / "home"
        store = KeyStore(home)
        store.server_keys(create=True)
        keys = {}
        for name, caps in (("root", ["admin"]), ("alice", ["infer"])):
            secret = store.create_client(name)
            store.allow(name, secret.with_suffix(".key"), caps)
            keys[name] = CurveKeys.from_files(secret, store.root / "server.key")
        monkeypatch.setenv("LLMOS_CLIENT_KEY", str(store.root / "clients" / "root.key_secret"))
        monkeypatch.setenv("LLMOS_SERVER_KEY", str(store.root / "server.key"))
        address = f"tcp://127.0.0.1:{free_port()}"
        with running_kernel(home, "--curve", "--devices", "torch:cpu", address=address) as kernel:
            root = Client(address, curve=keys["root"], timeout=REPLY_TIMEOUT)
            with filled(mount), pinging(kernel, root) as ping_failures:
                with Client(address, curve=keys["alice"], timeout=REPLY_TIMEOUT) as alice:
                    for _ in range(100):
                        with pytest.raises(KernelError) as info:
                            alice.load("anything")
                        assert info.value.code is ErrorCode.DENIED
                    assert alice.ping() == {"pong": True}
            os.kill(kernel.process.pid, signal.SIGTERM)  # obeyed: the kernel stops cleanly
            assert kernel.process.wait(60) == 0
    assert ping_failures == []


@pytest.mark.timeout(400)
def test_a_restarted_kernel_sweeps_what_a_crash_left_half_written(tiny, tmp_path):
    data = sentiment_csv(tmp_path / "sentiment.csv", rows=4000)
    with tmpfs(48) as mount:
        home = mount / "home"
        with running_kernel(home, "--devices", "torch:cpu") as kernel, \
                kernel.client(timeout=REPLY_TIMEOUT) as client:
            client.import_model(path=str(tiny), name="tiny")
            training = client.submit("train", {
                "model": "tiny", "path": str(data), "name": "tiny-trained", "epochs": 2,
                "batch_size": 8, "max_tokens": 16, "quantum": 0.2, "checkpoint_every": 0},
                events=True)
            job_id = training.job_id()
            for event in training.stream(timeout=REPLY_TIMEOUT):  # a checkpoint ends each quantum
                if event.event == "progress":
                    break
            client.cancel(job_id)  # resumable from its checkpoint
        folder = home / "jobs" / str(job_id)
        version = home / "models" / "tiny" / "v1"
        left = {  # what a kill -9 in the middle of writes leaves
            "checkpoint": folder / "checkpoint.tmp" / "model.safetensors",
            "output": folder / "output" / "config.json",
            "import": home / "models" / "tiny" / ".staging-crash" / "model.safetensors",
            "unindexed": home / "models" / "tiny" / "v7" / "model.safetensors",
            "export": version / "artifacts" / ".onnx-new-crash" / "model.onnx",
            "other job": home / "jobs" / "999999" / "work" / "step.bin",
        }
        for path in left.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        with open(left["checkpoint"], "r+b") as fh:  # the partial checkpoint filled the disk
            os.posix_fallocate(fh.fileno(), os.fstat(fh.fileno()).st_size, free_bytes(mount))
        assert free_bytes(mount) == 0
        with running_kernel(home, "--devices", "torch:cpu") as kernel, \
                kernel.client(timeout=REPLY_TIMEOUT) as client:
            assert client.ping() == {"pong": True}
            versions = [m["model"] for m in client.models()]
        remaining = {what: path for what, path in left.items() if path.exists()}
        assert remaining == {} and partials(home) == []
        assert not (home / "jobs" / "999999").exists()
        assert (folder / "checkpoint" / "state.json").exists()  # what a resume needs stays
        assert versions == ["tiny"] and free_bytes(mount) > 20 * MIB
