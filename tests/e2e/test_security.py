"""CURVE authentication, capabilities per key, job ownership and the audit log."""

import json
import socket

import pytest
import zmq

from llmos import ErrorCode, KernelError
from llmos.contract.protocol import encode_request
from llmos.kernel.client import Client, CurveKeys
from llmos.kernel.security import KeyStore
from llmos.kernel.testing import running_kernel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def curve_kernel():
    from tests.conftest import short_home

    home = short_home()
    store = KeyStore(home)
    store.server_keys(create=True)
    keys = {}
    for name, caps in (("root", ["admin"]), ("alice", ["infer"]), ("bob", ["infer"]),
                       ("mallory", None)):
        secret = store.create_client(name)
        if caps:
            store.allow(name, secret.with_suffix(".key"), caps)
        keys[name] = CurveKeys.from_files(secret, store.root / "server.key")
    address = f"tcp://127.0.0.1:{free_port()}"
    mp = pytest.MonkeyPatch()
    mp.setenv("LLMOS_CLIENT_KEY", str(store.root / "clients" / "root.key_secret"))
    mp.setenv("LLMOS_SERVER_KEY", str(store.root / "server.key"))
    with running_kernel(home, "--curve", "--devices", "torch:cpu", address=address) as kernel:
        yield kernel, keys
    mp.undo()


def test_unknown_or_missing_keys_get_no_reply(curve_kernel):
    kernel, keys = curve_kernel
    for curve in (keys["mallory"], None):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(sock)
        sock.connect(kernel.address)
        sock.send_multipart(encode_request("ping", {}))
        assert not sock.poll(2000), "an unauthenticated client got a reply"
        sock.close()


def test_capabilities_decide_what_a_key_may_call(curve_kernel):
    kernel, keys = curve_kernel
    with Client(kernel.address, curve=keys["root"], timeout=120) as root:
        root.import_model("minilm")
        root.load("minilm")
    with Client(kernel.address, curve=keys["alice"], timeout=120) as alice:
        assert alice.ping() == {"pong": True}
        assert alice.embed("minilm", ["hello"]).shape == (1, 384)
        for call in (lambda: alice.load("minilm"), lambda: alice.import_model("minilm"),
                     lambda: alice.train("minilm", data="reviews"),
                     lambda: alice.evaluate("minilm", data="reviews"),
                     lambda: alice.export("minilm", "onnx"),
                     lambda: alice.learn("minilm", [{"text": "good", "label": "positive"}]),
                     alice.shutdown,
                     lambda: alice.compress("minilm", [{"step": "quantize"}]),
                     lambda: alice.promote("minilm", 1)):
            with pytest.raises(KernelError) as info:
                call()
            assert info.value.code is ErrorCode.DENIED
        assert {j["owner"] for j in alice.jobs()} == {"alice"}  # the key's name, not self-declared


def test_keys_see_and_cancel_only_their_own_jobs(curve_kernel):
    kernel, keys = curve_kernel
    with Client(kernel.address, curve=keys["bob"], timeout=120) as bob, \
            Client(kernel.address, curve=keys["alice"], timeout=120) as alice:
        pending = bob.submit("infer", {"model": "minilm", "task": "embed",
                                       "inputs": ["bob's text"] * 64}, events=True)
        job_id = pending.job_id()
        with pytest.raises(KernelError) as info:
            alice.cancel(job_id)
        assert info.value.code is ErrorCode.NOT_FOUND
        assert all(j["owner"] == "alice" for j in alice.jobs())
        assert pending.result()["embeddings"].shape == (64, 384)


def test_privileged_syscalls_are_audited(curve_kernel):
    kernel, keys = curve_kernel
    with Client(kernel.address, curve=keys["alice"], timeout=120) as alice:
        with pytest.raises(KernelError):
            alice.unload("minilm")
    lines = [json.loads(line) for line in (kernel.home / "audit.log").read_text().splitlines()]
    assert {"who": "root", "syscall": "import", "result": "DONE"}.items() <= lines[0].items()
    assert any(e["who"] == "root" and e["syscall"] == "load" and e["result"] == "DONE"
               for e in lines)
    assert any(e["who"] == "alice" and e["syscall"] == "unload" and e["result"] == "DENIED"
               for e in lines)
    assert {e["syscall"] for e in lines if e["who"] == "alice" and e["result"] == "DENIED"} >= {
        "compress", "promote"}
    assert all({"time", "who", "syscall", "args", "result"} <= e.keys() for e in lines)
