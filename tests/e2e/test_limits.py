"""Limits at the protocol boundary (issue 17, items 5 and 6) on a real kernel.

Memory is bounded by the kernel, not by clients: oversize client names are refused, and a
thousand big jobs leave only bounded summaries behind. Out-of-range numbers, NUL bytes in
names and paths, bytes that are not UTF-8, deep nesting and wrong header types are each
BAD_REQUEST naming the field, sent as raw frames (the client library would refuse to build
some of them), and the kernel keeps answering. A cleanly stopped kernel leaves no socket file.
"""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from llmos import Client, ErrorCode, KernelError
from llmos.contract.protocol import (
    MAGIC,
    MAX_CLIENT_CHARS,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    Message,
    decode_reply,
)
from llmos.contract.syscalls import MAX_TEXT_CHARS
from llmos.kernel.jobs import MAX_ERROR_CHARS
from llmos.kernel.testing import running_kernel

MB = 1024 * 1024
#: A placeholder string whose packed form is swapped for a lone surrogate's bytes.
PLACEHOLDER = msgpack.packb("@@@")
LONE_SURROGATE = b"\xa3\xed\xa0\x80"  # a 3-byte msgpack str: "\ud800" as bytes, not UTF-8


def pack(value: Any) -> bytes:
    """msgpack bytes, with every "@@@" string turned into a lone surrogate."""
    return msgpack.packb(value).replace(PLACEHOLDER, LONE_SURROGATE)


def header(msg_id: str, syscall: str, **fields: Any) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "id": msg_id, "syscall": syscall, **fields})


def deep(opener: bytes, levels: int) -> bytes:
    """A body map whose "x" holds ``levels`` nested containers (``opener`` each) around nil."""
    return b"\x81\xa1x" + opener * levels + b"\xc0"


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


#: (syscall, header fields, body, words the message must contain). Item 6 of the issue.
CASES: list[tuple[str, dict[str, Any], Any, str]] = [
    *[(name, {}, {**body, "version": version}, "argument 'version' must be <=")
      for name, body in [
          ("infer", {"model": "minilm", "task": "embed", "inputs": ["x"]}),
          ("load", {"model": "minilm"}),
          ("stats", {"model": "minilm"}),
          ("export", {"model": "minilm", "format": "onnx"}),
          ("promote", {"model": "minilm"}),
          ("learn", {"model": "minilm", "examples": [{"text": "t", "label": "l"}]}),
          ("train", {"model": "minilm", "data": "sst2"}),
      ] for version in (2**63, 2**64 - 1)],
    ("train", {}, {"model": "minilm", "data": "sst2", "resume": 2**63}, "argument 'resume' must be <="),
    ("job", {}, {"id": 2**64 - 1}, "argument 'id' must be <="),
    ("train", {}, {"model": "minilm", "path": "/tmp/data\x00.csv"}, "'path' must not contain a NUL"),
    ("load", {}, {"model": "minilm", "calibrate": "sst2\x00"}, "'calibrate' must not contain a NUL"),
    ("infer", {}, {"model": "@@@", "task": "embed", "inputs": ["x"]},
     "body field 'model' is not valid UTF-8"),
    ("infer", {}, {"model": "minilm", "task": "embed", "inputs": ["ok", "@@@"]},
     "body field 'inputs'[1] is not valid UTF-8"),
    ("ping", {"client": "@@@"}, {}, "header field 'client' is not valid UTF-8"),
    ("ping", {}, deep(b"\x91", 100_000), "body nests deeper than the limit"),
    ("ping", {}, deep(b"\x81\xa1k", 100_000), "body nests deeper than the limit"),
    ("update", {}, {"model": "minilm", "params": {"a": nested(MAX_DEPTH)}},
     "body field 'params'['a']"),
    ("ping", {"v": True}, {}, "header field 'v'"),
    ("ping", {"v": 1.0}, {}, "header field 'v'"),
    ("ping", {"events": "yes"}, {}, "header field 'events' must be a boolean"),
    ("ping", {"client": 5}, {}, "header field 'client' must be a string"),
    ("ping", {"client": "c" * (MAX_CLIENT_CHARS + 1)}, {}, "header field 'client' has"),
]


@pytest.fixture
def dealer(minilm_kernel):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(minilm_kernel.address)
    yield sock
    sock.close()


def exchange(sock: zmq.Socket, frames: list[bytes]) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(30_000), "no reply"
    return decode_reply(sock.recv_multipart())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("syscall, fields, body, words", CASES,
                         ids=[f"{i}-{case[0]}" for i, case in enumerate(CASES)])
def test_bad_fields_are_bad_request_naming_the_field(minilm_kernel, dealer, syscall, fields,
                                                      body, words):
    msg_id = f"limits-{random.random()}"
    raw_body = body if isinstance(body, bytes) else pack(body)
    reply = exchange(dealer, [MAGIC, header(msg_id, syscall, **fields), raw_body])
    assert reply.status == "error", reply.body
    assert reply.body["code"] == "BAD_REQUEST", reply.body
    assert words in reply.body["message"], reply.body
    assert reply.reply_to == msg_id
    pong = exchange(dealer, [MAGIC, header("after", "ping"), pack({})])
    assert pong.status == "ok" and pong.body == {"pong": True}
    assert not dealer.poll(100), "a message got more than one reply"
    assert minilm_kernel.process.poll() is None


def big_jobs(client: Client, count: int, texts: int, window: int = 16) -> None:
    """``count`` embed jobs of ``texts`` texts of MAX_TEXT_CHARS characters each (one
    unknown word: cheap for the model, large for the kernel), at most ``window`` in flight."""
    pending = []
    for i in range(count):
        text = f"{i:08d}" + "x" * (MAX_TEXT_CHARS - 8)
        pending.append(client.submit("infer", {"model": "minilm", "task": "embed",
                                               "inputs": [text] * texts}))
        if len(pending) >= window:
            pending.pop(0).result()
    for request in pending:
        request.result()


def refuse_huge_names(address: str, count: int) -> None:
    """``count`` requests whose client name is 15 MB: each BAD_REQUEST naming 'client'."""
    for _ in range(count):
        with Client(address, name="n" * (15 * MB), timeout=60) as client:
            with pytest.raises(KernelError) as info:
                client.ping(timeout=60)
            assert info.value.code is ErrorCode.BAD_REQUEST
            assert "header field 'client' has" in info.value.message


@pytest.mark.timeout(900)
def test_huge_names_and_a_thousand_big_jobs_leave_kernel_memory_bounded(minilm_kernel):
    kernel = psutil.Process(minilm_kernel.process.pid)
    name = "o" * MAX_CLIENT_CHARS  # the longest name allowed
    texts = 2  # 200 KB of inputs per job: 200 MB if the history kept them
    with minilm_kernel.client(name=name, timeout=300) as client:
        # Warm up every path (the allocator keeps a few large buffers once it has seen
        # them), then measure.
        refuse_huge_names(minilm_kernel.address, 5)
        big_jobs(client, 50, texts)
        rss_before = kernel.memory_info().rss
        refuse_huge_names(minilm_kernel.address, 30)
        big_jobs(client, 1000, texts)
        rss_growth = kernel.memory_info().rss - rss_before
        remembered = client.jobs(owner=name)
    assert rss_growth < 50 * MB, f"kernel RSS grew {rss_growth / MB:.1f} MB"
    assert len(remembered) == 1000  # KernelConfig.history: the newest thousand, all ours
    assert all(job["state"] == "DONE" and "inputs" not in job for job in remembered)
    assert all(len(job["error"] or "") <= MAX_ERROR_CHARS + 3 for job in remembered)


@pytest.mark.timeout(300)
def test_a_clean_stop_removes_the_socket_files(home):
    """The kernel's socket and its backend socket go with a clean stop; a backend socket
    that a killed kernel left (its pid no longer runs) is swept at start."""
    run = home / "run"
    run.mkdir(parents=True)
    stale = run / "backend-4194304.sock"  # above any pid_max: no such process
    stale.touch()
    with running_kernel(home, "--devices", "onnxruntime:cpu") as kernel:
        socket_file = run / "kernel.sock"
        assert kernel.address == f"ipc://{socket_file}"
        assert socket_file.is_socket()
        assert not stale.exists()
        assert (run / f"backend-{kernel.process.pid}.sock").is_socket()
        process = kernel.process
    assert process.returncode == 0
    assert not socket_file.exists()
    assert not (run / "kernel.json").exists()
    assert not list(run.glob("backend-*.sock"))


@pytest.mark.timeout(600)
def test_bytes_held_by_one_clients_unfinished_jobs_are_capped(home):
    """A client that sends big requests faster than they run gets BUSY once its unfinished
    jobs hold more than --max-mb-per-client; the bytes come back as its jobs end."""
    with running_kernel(home, "--devices", "torch:cpu", "--max-mb-per-client", "1") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(kernel.address)
        with kernel.client() as client:
            host_pid = client.devices()[0]["pid"]
        text = "the parcel is late " * 5_000  # 95 KB; truncated to the model's length
        os.kill(host_pid, signal.SIGSTOP)  # nothing finishes: every admitted job stays
        try:
            for i in range(12):
                sock.send_multipart([MAGIC, header(f"big-{i}", "infer", client="greedy"),
                                     pack({"model": "minilm", "task": "embed",
                                           "inputs": [text] * 2})])
            refused = [decode_reply(sock.recv_multipart()) for _ in range(7)]
        finally:
            os.kill(host_pid, signal.SIGCONT)
        admitted = [decode_reply(sock.recv_multipart()) for _ in range(5)]
        assert all(r.status == "error" and r.body["code"] == "BUSY"
                   and "bytes of requests" in r.body["message"] for r in refused), refused
        assert [r.reply_to for r in refused] == [f"big-{i}" for i in range(5, 12)]
        assert all(r.status == "ok" for r in admitted)  # 5 x 190 KB fit in 1 MiB, 6 do not
        with Client(kernel.address, name="greedy") as again:
            assert again.embed("minilm", [text]).shape == (1, 384)  # released at the end
        sock.close()
