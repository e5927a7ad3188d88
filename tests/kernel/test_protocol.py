import msgpack
import numpy as np
import pytest

from llmos.kernel.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    ErrorCode,
    KernelError,
    ProtocolError,
    decode,
    decode_reply,
    encode_error,
    encode_reply,
    encode_request,
    tensor_from_ref,
    tensor_ref,
)
from llmos.kernel.syscalls import SYSCALLS


def test_request_round_trip():
    frames = encode_request("infer", {"model": "m"}, client="c", msg_id="abc", events=True)
    msg = decode(frames)
    assert (msg.syscall, msg.body, msg.msg_id, msg.client, msg.events) == (
        "infer", {"model": "m"}, "abc", "c", True)


def test_reply_and_error_round_trip():
    ok = decode_reply(encode_reply("r1", "ping", {"pong": True}))
    assert (ok.status, ok.reply_to, ok.body) == ("ok", "r1", {"pong": True})
    err = decode_reply(encode_error("r2", "load", ErrorCode.NOT_FOUND, "no such model"))
    assert (err.status, err.body["code"], err.body["message"]) == ("error", "NOT_FOUND", "no such model")


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "id": "x", "syscall": "ping"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize("frames, fragment", [
    ([MAGIC], "at least 3 frames"),
    ([b"NOPE", header(), msgpack.packb({})], "magic"),
    ([MAGIC, b"\xc1\xc1", msgpack.packb({})], "not valid msgpack"),
    ([MAGIC, msgpack.packb([1, 2]), msgpack.packb({})], "must be a map"),
    ([MAGIC, header(v=99), msgpack.packb({})], "protocol version 99"),
    ([MAGIC, header(id=None), msgpack.packb({})], "'id'"),
    ([MAGIC, header(syscall=5), msgpack.packb({})], "'syscall'"),
    ([MAGIC, header(), b"\xc1"], "body is not valid msgpack"),
    ([MAGIC, header(), msgpack.packb("text")], "body must be a map"),
    ([MAGIC, header(), msgpack.packb({})] + [b""] * 70, "too many frames"),
])
def test_malformed_frames_raise_bad_request(frames, fragment):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert fragment in info.value.message


def test_oversize_message_is_refused_before_decoding():
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode([MAGIC, header(), msgpack.packb({"x": "a" * 2000})], max_bytes=1000)


def test_error_keeps_the_request_id_when_the_header_was_readable():
    with pytest.raises(ProtocolError) as info:
        decode([MAGIC, header(id="keep-me"), b"\xc1"])
    assert info.value.msg_id == "keep-me"


def test_tensor_round_trip_and_bad_references():
    buffers: list[bytes] = []
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    ref = tensor_ref(array, buffers)
    np.testing.assert_array_equal(tensor_from_ref(ref, buffers), array)
    for bad in ({**ref, "buffer": 5}, {**ref, "dtype": "object"}, {**ref, "shape": [5, 5]}, [1]):
        with pytest.raises(ProtocolError):
            tensor_from_ref(bad, buffers)


def test_syscall_arguments_are_validated():
    infer = SYSCALLS["infer"]
    args = infer.parse({"model": "m", "task": "embed", "inputs": ["a"]})
    assert args["priority"] == 0 and args["version"] is None
    cases = [
        ({"task": "embed", "inputs": ["a"]}, "missing argument 'model'"),
        ({"model": "m", "task": "fly", "inputs": ["a"]}, "must be one of"),
        ({"model": "m", "task": "embed", "inputs": "a"}, "list of strings"),
        ({"model": "m", "task": "embed", "inputs": []}, ">= 1"),
        ({"model": "m", "task": "embed", "inputs": ["a"], "priority": 99}, "<= 19"),
        ({"model": "m", "task": "embed", "inputs": ["a"], "priority": True}, "an integer"),
        ({"model": "m", "task": "embed", "inputs": ["a"], "colour": 1}, "unknown argument"),
        ({"model": "m", "task": "embed", "inputs": ["a"], "timeout": float("nan")}, "finite"),
        ({"model": "m", "task": "embed", "inputs": ["a"], "timeout": float("inf")}, "finite"),
    ]
    for body, fragment in cases:
        with pytest.raises(KernelError) as info:
            infer.parse(body)
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert fragment in info.value.message
