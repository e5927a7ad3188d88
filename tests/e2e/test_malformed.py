"""Over a thousand malformed messages: each is answered with the right code; the kernel lives."""

import random

import msgpack
import psutil
import zmq

from llmos.contract.protocol import MAGIC, PROTOCOL_VERSION, decode_reply


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "id": f"m{random.random()}", "syscall": "ping"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


def body(value=None):
    return msgpack.packb({} if value is None else value)


def malformed(rng: random.Random):
    """(frames, expected code) pairs covering every kind of bad input."""
    yield [rng.randbytes(rng.randint(1, 64))], "BAD_REQUEST"                    # 1 garbage frame
    yield [MAGIC], "BAD_REQUEST"                                                  # too few frames
    yield [MAGIC, header(), body()] + [b"x"] * 70, "BAD_REQUEST"                  # too many frames
    yield [b"HELLO", header(), body()], "BAD_REQUEST"                             # wrong magic
    yield [MAGIC, rng.randbytes(16) + b"\xc1", body()], "BAD_REQUEST"             # not msgpack
    yield [MAGIC, msgpack.packb(["a", "list"]), body()], "BAD_REQUEST"            # wrong type
    yield [MAGIC, header(v=PROTOCOL_VERSION + 1), body()], "BAD_REQUEST"          # wrong version
    yield [MAGIC, header(v=None), body()], "BAD_REQUEST"                          # missing field
    yield [MAGIC, header(syscall=None), body()], "BAD_REQUEST"                    # missing field
    yield [MAGIC, header(syscall=42), body()], "BAD_REQUEST"                      # wrong type
    yield [MAGIC, header(kind="reply"), body()], "BAD_REQUEST"                    # not a request
    yield [MAGIC, header(), b"\xc1\xc1"], "BAD_REQUEST"                           # body not msgpack
    yield [MAGIC, header(), msgpack.packb(3.5)], "BAD_REQUEST"                    # body not a map
    yield [MAGIC, header(syscall="format_disk"), body()], "UNKNOWN_SYSCALL"
    yield [MAGIC, header(syscall="infer"), body({"model": "m"})], "BAD_REQUEST"   # missing args
    yield [MAGIC, header(syscall="infer"),
           body({"model": 1, "task": "embed", "inputs": ["x"]})], "BAD_REQUEST"   # wrong arg type
    yield [MAGIC, header(syscall="infer"),
           body({"model": "m", "task": "embed", "inputs": [""]})], "BAD_REQUEST"  # empty text
    yield [MAGIC, header(syscall="job"), body({"id": "seven"})], "BAD_REQUEST"
    yield [MAGIC, header(syscall="jobs"), msgpack.packb({"a": 1, b"b": 2})], "BAD_REQUEST"  # mixed keys
    yield [MAGIC, header(syscall="infer"), body({"model": "m", "task": "embed", "inputs": ["x"],
                                                 "timeout": float("nan")})], "BAD_REQUEST"
    yield [MAGIC, header(), msgpack.packb({"pad": "x" * (17 * 1024 * 1024)})], "BAD_REQUEST"  # oversize


def test_a_thousand_malformed_messages(minilm_kernel):
    rng = random.Random(7)
    kinds = list(malformed(rng))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(minilm_kernel.address)
    kernel = psutil.Process(minilm_kernel.process.pid)

    def exchange(frames):
        sock.send_multipart(frames)
        assert sock.poll(10_000), "no reply to a malformed message"
        return decode_reply(sock.recv_multipart())

    def ping_ok():
        reply = exchange([MAGIC, header(), body()])
        return reply.status == "ok" and reply.body == {"pong": True}

    # Warm up every path (the allocator keeps a few oversize buffers once it has seen them:
    # RSS steps up once and then stays flat), then measure.
    for _ in range(10):
        for frames, _ in kinds:
            exchange(frames)
    rss_before = kernel.memory_info().rss
    sent = 0
    while sent < 1200:
        for frames, expected in kinds:
            reply = exchange(frames)
            assert reply.status == "error", frames[:2]
            assert reply.body["code"] == expected, (reply.body, frames[:2])
            assert reply.body["message"]
            sent += 1
        assert ping_ok()
    rss_growth = kernel.memory_info().rss - rss_before
    assert sent >= 1000
    assert ping_ok() and kernel.is_running()
    assert rss_growth < 10 * 1024 * 1024, f"kernel RSS grew {rss_growth / 1e6:.1f} MB"
    assert not sock.poll(200), "a message got more than one reply"
    sock.close()
