"""kill -9 of the driver host with 200 requests in flight: every request gets exactly one reply."""

import os
import signal
import time
from collections import Counter

import zmq

from llmos.contract.protocol import decode_reply, encode_request
from llmos.kernel.testing import running_kernel


def test_killed_driver_host_loses_no_request(home):
    with running_kernel(home, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
            host_pid = client.devices()[0]["pid"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(kernel.address)
        sent_ids = set()
        for i in range(200):
            msg_id = f"req-{i}"
            sent_ids.add(msg_id)
            sock.send_multipart(encode_request("infer", {
                "model": "minilm", "task": "embed",
                "inputs": [f"request {i}: the quick brown fox jumps over the lazy dog " * 3],
            }, client="crash", msg_id=msg_id))
        replies: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        killed_at = None
        deadline = time.monotonic() + 180
        while sum(replies.values()) < 200 and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = decode_reply(sock.recv_multipart())
                replies[reply.reply_to] += 1
                statuses[reply.status if reply.status == "ok" else reply.body["code"]] += 1
            if killed_at is None and sum(replies.values()) >= 10:
                os.kill(host_pid, signal.SIGKILL)  # batches are in flight right now
                killed_at = sum(replies.values())
        assert not sock.poll(500), "a request got a second reply"
        sock.close()
        with kernel.client() as client:
            devices = client.devices()
            stats = client.stats()
            assert client.embed("minilm", ["still serving"]).shape == (1, 384)

    assert killed_at is not None and killed_at < 200, "the kill happened after all replies"
    assert set(replies) == sent_ids
    assert all(count == 1 for count in replies.values())
    assert statuses == Counter(ok=200), statuses  # requeued once onto the restarted host
    assert devices[0]["restarts"] == 1 and devices[0]["pid"] != host_pid
    assert stats["finished"]["DONE"] >= 200
