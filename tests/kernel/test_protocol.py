import msgpack
import numpy as np
import pytest

from llmos.contract.protocol import (
    MAGIC,
    MAX_CLIENT_CHARS,
    MAX_DEPTH,
    MAX_ID_CHARS,
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
from llmos.contract.syscalls import (
    INT64_MAX,
    INT64_MIN,
    MAX_OWNER_CHARS,
    MAX_STRING_CHARS,
    MAX_TEXT_CHARS,
    MAX_VERSION,
    SYSCALLS,
    Arg,
    check_generation,
)


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


# --- limits at the protocol boundary (issue 17, items 5 and 6) -------------------------

def raw_str(data: bytes) -> bytes:
    """A msgpack str holding ``data`` as is (e.g. bytes that are not UTF-8)."""
    return bytes([0xA0 | len(data)]) + data


LONE_SURROGATE = raw_str(b"\xed\xa0\x80")  # "\ud800" as CESU bytes: not valid UTF-8


def nested(levels: int) -> list:
    """``levels`` lists, one inside the other, around 1."""
    value: object = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("frames, fragment", [
    ([MAGIC, header(v=True), msgpack.packb({})], "header field 'v'"),
    ([MAGIC, header(v=1.0), msgpack.packb({})], "header field 'v'"),
    ([MAGIC, header(events="yes"), msgpack.packb({})], "header field 'events' must be a boolean"),
    ([MAGIC, header(events=1), msgpack.packb({})], "header field 'events' must be a boolean"),
    ([MAGIC, header(client=7), msgpack.packb({})], "header field 'client' must be a string"),
    ([MAGIC, header(client="c" * 257), msgpack.packb({})], "header field 'client' has 257 characters"),
    ([MAGIC, header(id="i" * 129), msgpack.packb({})], "header field 'id' has 129 characters"),
    ([MAGIC, header(syscall="s" * 65), msgpack.packb({})], "header field 'syscall' has 65"),
    ([MAGIC, b"\x83\xa1v\x01\xa2id\xa1x\xa7syscall" + LONE_SURROGATE, msgpack.packb({})],
     "header field 'syscall' is not valid UTF-8"),
    ([MAGIC, header(), b"\x81\xa5model" + LONE_SURROGATE], "body field 'model' is not valid UTF-8"),
    ([MAGIC, header(), b"\x81\xa6inputs\x92\xa1a" + LONE_SURROGATE],
     "body field 'inputs'[1] is not valid UTF-8"),
    ([MAGIC, header(), b"\x81" + LONE_SURROGATE + b"\x01"], "body has a key that is not valid UTF-8"),
    ([MAGIC, header(), b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"], "body nests deeper"),
    ([MAGIC, header(), b"\x81\xa1x" + b"\x81\xa1k" * 100_000 + b"\xc0"], "body nests deeper"),
    ([MAGIC, header(), msgpack.packb({"params": {"a": nested(MAX_DEPTH)}})],
     "body field 'params'['a'][0]"),
    ([MAGIC, b"\x91" * 100_000 + b"\xc0", msgpack.packb({})], "header nests deeper"),
])
def test_header_types_lengths_encoding_and_depth_are_bad_request(frames, fragment):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert fragment in info.value.message, info.value.message


def test_nesting_up_to_the_limit_and_long_flat_lists_are_accepted():
    body = {"deep": nested(MAX_DEPTH - 1), "flat": ["é"] * 100_000}  # the body is level 1
    msg = decode([MAGIC, header(), msgpack.packb(body)])
    assert len(msg.body["flat"]) == 100_000


def test_the_error_carries_the_id_only_when_the_id_itself_is_valid():
    with pytest.raises(ProtocolError) as info:
        decode([MAGIC, header(id="ok", client="c" * 300), msgpack.packb({})])
    assert info.value.msg_id == "ok"
    bad_client = b"\x84\xa1v\x01\xa7syscall\xa4ping\xa2id\xa2ok\xa6client" + LONE_SURROGATE
    with pytest.raises(ProtocolError) as info:
        decode([MAGIC, bad_client, msgpack.packb({})])
    assert info.value.msg_id == "ok" and "header field 'client'" in info.value.message
    bad_id = b"\x83\xa1v\x01\xa7syscall\xa4ping\xa2id" + LONE_SURROGATE
    with pytest.raises(ProtocolError) as info:
        decode([MAGIC, bad_id, msgpack.packb({})])
    assert info.value.msg_id is None and "header field 'id' is not valid UTF-8" in info.value.message


def test_request_header_fields_round_trip_at_their_limits():
    frames = encode_request("ping", {}, client="c" * MAX_CLIENT_CHARS, msg_id="i" * MAX_ID_CHARS)
    assert decode(frames).client == "c" * MAX_CLIENT_CHARS


VERSIONED = [name for name, spec in SYSCALLS.items() if any(a.name == "version" for a in spec.args)]


def minimal_body(name: str) -> dict:
    """The required arguments of a syscall, with valid values."""
    values = {"model": "m", "task": "embed", "inputs": ["a"], "format": "onnx", "version": 1,
              "examples": [{"text": "t", "label": "l"}], "id": 1, "priority": 0}
    return {a.name: values[a.name] for a in SYSCALLS[name].args if a.required}


@pytest.mark.parametrize("name", VERSIONED)
@pytest.mark.parametrize("version", [2**31, 2**63, 2**64 - 1])
def test_versions_past_the_range_are_bad_request(name, version):
    with pytest.raises(KernelError) as info:
        SYSCALLS[name].parse({**minimal_body(name), "version": version})
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert f"argument 'version' must be <= {MAX_VERSION}" in info.value.message


def test_the_versioned_syscalls_include_those_of_the_issue():
    assert {"infer", "load", "stats", "export", "promote", "learn", "train"} <= set(VERSIONED)


@pytest.mark.parametrize("name, body, fragment", [
    ("train", {"model": "m", "resume": 2**63}, f"'resume' must be <= {INT64_MAX}"),
    ("job", {"id": 2**63}, f"'id' must be <= {INT64_MAX}"),
    ("cancel", {"id": 2**64 - 1}, "'id' must be <="),
    ("train", {"model": "m", "path": "/tmp/x\x00.csv"}, "'path' must not contain a NUL"),
    ("load", {"model": "m", "calibrate": "sst2\x00"}, "'calibrate' must not contain a NUL"),
    ("load", {"model": "m\x00"}, "'model' must not contain a NUL"),
    ("jobs", {"owner": "o" * (MAX_OWNER_CHARS + 1)}, "'owner' must be <="),
    ("infer", {"model": "m", "task": "embed", "inputs": ["a", "x" * (MAX_TEXT_CHARS + 1)]},
     f"'inputs': item 1 has {MAX_TEXT_CHARS + 1} characters"),
    ("generate", {"model": "m", "prompt": "p", "stop": ["s" * 1025]}, "'stop': item 0 has 1025"),
    ("infer", {"model": "m", "task": "x" * 10_000, "inputs": ["a"]}, "must be one of"),
])
def test_argument_ranges_nul_and_lengths_are_bad_request(name, body, fragment):
    with pytest.raises(KernelError) as info:
        SYSCALLS[name].parse(body)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert fragment in info.value.message
    assert len(info.value.message) < 1000  # client data is quoted, not echoed whole


def test_free_text_may_hold_nul():
    args = SYSCALLS["generate"].parse({"model": "m", "prompt": "a\x00b", "stop": ["\x00"]})
    assert args["prompt"] == "a\x00b"
    assert SYSCALLS["infer"].parse({"model": "m", "task": "embed", "inputs": ["a\x00"]})


def test_an_unbounded_string_argument_still_has_the_default_limit():
    arg = Arg("note", "str")
    assert arg.parse("x", "n" * MAX_STRING_CHARS)
    with pytest.raises(KernelError, match=f"'note' must be <= {MAX_STRING_CHARS}"):
        arg.parse("x", "n" * (MAX_STRING_CHARS + 1))
    with pytest.raises(KernelError, match="must be <= 9223372036854775807"):
        Arg("count", "int").parse("x", 2**63)
    with pytest.raises(ValueError):
        Arg("colour", "colour")


def test_many_unknown_arguments_are_named_briefly():
    body = {f"k{i}" + "x" * 1000: 1 for i in range(100)}
    with pytest.raises(KernelError) as info:
        SYSCALLS["ping"].parse(body)
    assert "and 95 more" in info.value.message and len(info.value.message) < 1000


def test_every_builtin_argument_has_documented_bounds():
    """Numbers have both bounds, within SQLite's signed 64-bit range; strings and lists a
    maximum length or a closed set of choices."""
    for name, spec in SYSCALLS.items():
        for arg in spec.args:
            where = f"{name}.{arg.name}"
            if arg.kind in ("int", "float"):
                assert arg.minimum is not None and arg.maximum is not None, where
                assert INT64_MIN <= arg.minimum <= arg.maximum <= INT64_MAX, where
            elif arg.kind in ("str", "strs", "maps"):
                assert arg.maximum is not None or arg.choices, where


@pytest.mark.parametrize("name, fragment", [
    ("n" * 65, "'name' must be <= 64"), (5, "'name' must be a string"), ("a\x00", "NUL"),
])
def test_a_chat_message_name_is_bounded(name, fragment):
    args = SYSCALLS["generate"].parse(
        {"model": "m", "messages": [{"role": "user", "content": "hi", "name": name}]})
    with pytest.raises(KernelError) as info:
        check_generation(args)
    assert info.value.code is ErrorCode.BAD_REQUEST and fragment in info.value.message
