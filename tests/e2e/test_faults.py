"""Faults the kernel must survive with nothing lost: fuzzing, overload, vanished and slow
clients, kill -9 of the kernel itself. Real processes, loopback only, bounded in count."""

import os
import random
import signal
from collections import Counter

import msgpack
import psutil
import pytest
import zmq

from llmos.contract.protocol import MAGIC, PROTOCOL_VERSION, decode_reply, encode_request
from llmos.kernel.testing import running_kernel, wait_for


def dealer(address):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One random corruption of a valid request: flipped, cut, inserted or reordered bytes
    and frames, wrong types, or pure noise."""
    frames = list(frames)
    choice = rng.randrange(7)
    if choice == 0:
        return [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 6))]
    if choice == 1:
        i = rng.randrange(len(frames))
        data = bytearray(frames[i])
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        frames[i] = bytes(data)
    elif choice == 2:
        i = rng.randrange(len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
    elif choice == 3:
        frames.insert(rng.randrange(len(frames) + 1), rng.randbytes(rng.randint(0, 32)))
    elif choice == 4:
        rng.shuffle(frames)
    elif choice == 5:
        header = {"v": rng.choice([PROTOCOL_VERSION, 0, "1", None]), "id": rng.choice(["x", 7, None]),
                  "syscall": rng.choice(["ping", "infer", "jobs", "", 3, "x" * 300])}
        body = rng.choice([{}, [], "s", {"model": 5}, {"inputs": [1, 2]}, {"id": -1}, None])
        frames = [MAGIC, msgpack.packb(header), msgpack.packb(body)]
    else:
        frames = frames[: rng.randint(0, len(frames))] or [b""]
    return frames


def test_fuzz_100k_frames(minilm_kernel):
    rng = random.Random(2026)
    valid = [encode_request("ping", {}), encode_request("jobs", {}),
             encode_request("infer", {"model": "nope", "task": "embed", "inputs": ["x"]})]
    kernel = psutil.Process(minilm_kernel.process.pid)
    sock = dealer(minilm_kernel.address)
    sent = replies = 0
    rss_before = kernel.memory_info().rss
    while sent < 100_000:
        for _ in range(500):
            sock.send_multipart(mutate(rng, rng.choice(valid)))
            sent += 1
        while sock.poll(0 if replies < sent - 2000 else 50):  # keep at most ~2000 in flight
            decode_reply(sock.recv_multipart())
            replies += 1
    while sock.poll(5000):
        decode_reply(sock.recv_multipart())
        replies += 1
    growth = kernel.memory_info().rss - rss_before
    with minilm_kernel.client() as client:
        assert client.ping() == {"pong": True}
        stats = client.stats()
    assert kernel.is_running() and growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB"
    assert replies == sent  # every frame set a ROUTER can attribute is answered
    assert stats["rejected"] >= sent * 0.5


@pytest.fixture(scope="module")
def limited_kernel():
    from tests.conftest import short_home

    with running_kernel(short_home(), "--devices", "torch:cpu", "--max-jobs-per-client", "8",
                        "--max-batch-size", "32") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
        yield kernel


def test_64_clients_x_200_requests_each_get_exactly_one_reply(limited_kernel):
    kernel = psutil.Process(limited_kernel.process.pid)
    sockets = [dealer(limited_kernel.address) for _ in range(64)]
    expected = set()
    for c, sock in enumerate(sockets):
        for r in range(200):
            msg_id = f"c{c}-r{r}"
            expected.add(msg_id)
            sock.send_multipart(encode_request("infer", {
                "model": "minilm", "task": "embed", "inputs": [f"client {c} request {r}"]},
                client=f"client-{c}", msg_id=msg_id))
    replies: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    poller = zmq.Poller()
    for sock in sockets:
        poller.register(sock, zmq.POLLIN)
    peak_rss = 0
    while sum(replies.values()) < len(expected):
        ready = dict(poller.poll(60_000))
        assert ready, f"stalled after {sum(replies.values())} replies"
        for sock in ready:
            while sock.poll(0):
                reply = decode_reply(sock.recv_multipart())
                replies[reply.reply_to] += 1
                outcomes["ok" if reply.status == "ok" else reply.body["code"]] += 1
        peak_rss = max(peak_rss, kernel.memory_info().rss)
    assert not any(sock.poll(300) for sock in sockets), "a request got a second reply"
    for sock in sockets:
        sock.close()
    assert set(replies) == expected and set(replies.values()) == {1}
    assert set(outcomes) == {"ok", "BUSY"} and outcomes["ok"] >= 64 * 8
    assert peak_rss < 400 * 2**20, f"kernel RSS peaked at {peak_rss / 2**20:.0f} MiB"


def test_vanished_and_slow_clients_do_not_hurt_others(limited_kernel):
    gone = dealer(limited_kernel.address)
    slow = dealer(limited_kernel.address)
    for i in range(8):
        body = {"model": "minilm", "task": "embed", "inputs": [f"text {i}"] * 16}
        gone.send_multipart(encode_request("infer", body, client="gone", events=True))
        slow.send_multipart(encode_request("infer", body, client="slow"))  # never read
    accepted = 0
    while accepted < 8:  # the kernel has every request (accepted events); then the client vanishes
        assert gone.poll(30_000)
        accepted += decode_reply(gone.recv_multipart()).event == "accepted"
    gone.close()
    with limited_kernel.client(name="patient") as client:
        for _ in range(3):
            assert client.embed("minilm", ["still served"]).shape == (1, 384)
        # every job of the vanished client ends; its replies are counted, not queued
        def gone_has_ended():
            stats = client.stats()
            return stats if "gone" not in stats["clients"] else None

        stats = wait_for(gone_has_ended, "the vanished client's jobs to end")
    assert stats["dropped_replies"] >= 1
    replies = []  # the slow client, reading only now, finds each of its replies waiting
    while len(replies) < 8:
        assert slow.poll(30_000), f"the slow client got {len(replies)} of its 8 replies"
        replies.append(decode_reply(slow.recv_multipart()))
    assert [r.status for r in replies] == ["ok"] * 8
    assert not slow.poll(300)  # and nothing twice
    slow.close()


def test_kill_9_of_the_kernel_mid_job_then_restart(home):
    with running_kernel(home, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
            client.submit("infer", {"model": "minilm", "task": "embed",
                                    "inputs": ["busy " * 100] * 256})
            host_pid = client.devices()[0]["pid"]
            os.kill(kernel.process.pid, signal.SIGKILL)
            kernel.process.wait()
        psutil.Process(host_pid).wait(timeout=10)  # the orphaned host exits by itself
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        (row,) = client.models()
        assert (row["model"], row["version"]) == ("minilm", 1)
        client.load("minilm")
        assert client.embed("minilm", ["back"]).shape == (1, 384)
    assert not list((home / "models").glob("*/.staging-*"))
