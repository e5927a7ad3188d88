"""The wire contract between clients and the kernel (docs/protocol.md is the authority).

A message is a list of ZeroMQ frames::

    [MAGIC, header, body, *buffers]

``MAGIC`` is ``b"LLMOS"``; ``header`` and ``body`` are msgpack maps; ``buffers`` are raw tensor
bytes that the body refers to by index (``{"buffer": i, "dtype": "float32", "shape": [...]}``).
A ROUTER socket prepends the peer identity frame on receipt; nothing else is added.

Nothing here unpickles anything: msgpack only, with size limits on every container.
"""

from __future__ import annotations

import enum
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAGIC = b"LLMOS"

#: Largest request a kernel accepts by default (all frames together), in bytes.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: Most frames one message may have (magic, header, body and buffers).
MAX_FRAMES = 64
#: Most levels of maps and lists in a header or body (the header or body map is level 1).
MAX_DEPTH = 32
#: Longest header ``id``, ``syscall`` and ``client``, in characters.
MAX_ID_CHARS = 128
MAX_SYSCALL_CHARS = 64
MAX_CLIENT_CHARS = 256
#: Most items in one msgpack array, and entries in one msgpack map.
MAX_ARRAY_ITEMS = 1_000_000
MAX_MAP_ENTRIES = 100_000
#: Longest piece of client data quoted back in an error message, in characters.
MAX_QUOTE_CHARS = 80

#: UTF-16 surrogates, which no valid UTF-8 string holds (undecodable bytes arrive as these).
_SURROGATE = re.compile("[\ud800-\udfff]")


class ErrorCode(enum.StrEnum):
    """The closed list of error codes a reply may carry."""

    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_SYSCALL = "UNKNOWN_SYSCALL"
    NOT_FOUND = "NOT_FOUND"
    BUSY = "BUSY"
    DENIED = "DENIED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    DEVICE_FAILED = "DEVICE_FAILED"
    INTERNAL = "INTERNAL"


class KernelError(Exception):
    """An error with a code from :class:`ErrorCode`; raised by handlers and by clients."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        if code not in ErrorCode.__members__:
            code, message = ErrorCode.INTERNAL, f"(unknown error code {code!r}) {message}"
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message


class ProtocolError(KernelError):
    """A message that breaks the wire contract (always BAD_REQUEST)."""

    def __init__(self, message: str, msg_id: str | None = None) -> None:
        super().__init__(ErrorCode.BAD_REQUEST, message)
        #: The id of the request this error answers, when its header could be read.
        self.msg_id = msg_id


@dataclass(slots=True)
class Message:
    """A decoded message: header fields plus the body and raw buffers."""

    syscall: str
    body: dict[str, Any]
    msg_id: str
    client: str = ""
    #: ``"request"``, ``"reply"`` or ``"event"``.
    kind: str = "request"
    #: For replies and events: the id of the request they answer.
    reply_to: str | None = None
    #: For replies: ``"ok"`` or ``"error"``.
    status: str | None = None
    #: Request option: also send ``accepted``/progress events for this request.
    events: bool = False
    #: For events: the event name (``accepted``, ``progress``, ...).
    event: str | None = None
    buffers: list[bytes] = field(default_factory=list)


_id_prefix = ""
_id_counter = itertools.count()


def _new_id_prefix() -> None:
    """Random per process (a forked child draws its own), so ids from different processes
    never collide."""
    global _id_prefix
    _id_prefix = os.urandom(8).hex()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)


def new_id() -> str:
    """A fresh message id: this process's random prefix and a counter."""
    return f"{_id_prefix}{next(_id_counter):x}"


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes, max_len: int) -> Any:
    """msgpack only, size-limited; bytes that are not UTF-8 in a string decode to lone
    surrogates (``surrogateescape``) so that :func:`_flaw` can name the field they are in."""
    return msgpack.unpackb(
        raw,
        raw=False,
        strict_map_key=True,
        unicode_errors="surrogateescape",
        max_str_len=max_len,
        max_bin_len=max_len,
        max_array_len=MAX_ARRAY_ITEMS,
        max_map_len=MAX_MAP_ENTRIES,
        max_ext_len=0,
    )


def _unpack_map(raw: bytes, frame: str, max_len: int, msg_id: str | None = None) -> dict[Any, Any]:
    """Decode the ``frame`` ("header" or "body"), which must be a map; ProtocolError
    (BAD_REQUEST) naming what is wrong otherwise."""
    try:
        value = _unpack(raw, max_len)
    except msgpack.StackError:
        raise ProtocolError(f"{frame} nests deeper than the limit of {MAX_DEPTH} levels",
                            msg_id) from None
    except Exception as exc:
        raise ProtocolError(f"{frame} is not valid msgpack: {exc}", msg_id) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{frame} must be a map, got {type(value).__name__}", msg_id)
    return value


def quote(value: Any) -> str:
    """``repr(value)``, cut to MAX_QUOTE_CHARS: client data echoed in an error message."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else f"{text[:MAX_QUOTE_CHARS]}..."


def _where(frame: str, path: tuple[Any, ...]) -> str:
    """A field's name for an error message: ``body field 'messages'[0]['content']``."""
    if not path:
        return frame
    head, *rest = path
    return f"{frame} field {quote(head)}" + "".join(f"[{quote(key)}]" for key in rest)


def _flaw(root: dict[str, Any], frame: str) -> str | None:
    """The first flaw in a decoded header or body, naming its field: a container nested
    deeper than MAX_DEPTH levels, or a string or map key that holds a lone surrogate (bytes
    that were not UTF-8). Iterative, so no tree can exhaust the Python stack."""
    stack: list[tuple[dict[Any, Any] | list[Any], tuple[Any, ...]]] = [(root, ())]
    while stack:
        container, path = stack.pop()
        if len(path) >= MAX_DEPTH:
            return f"{_where(frame, path)} nests deeper than the limit of {MAX_DEPTH} levels"
        pairs = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in pairs:
            if isinstance(key, str) and _SURROGATE.search(key):
                return f"{_where(frame, path)} has a key that is not valid UTF-8: {quote(key)}"
            if isinstance(value, str):
                if not value.isascii() and _SURROGATE.search(value):
                    return f"{_where(frame, (*path, key))} is not valid UTF-8"
            elif isinstance(value, dict | list):
                stack.append((value, (*path, key)))
    return None


def encode_request(
    syscall: str, body: dict[str, Any], *, client: str = "", msg_id: str | None = None,
    events: bool = False, buffers: list[bytes] | None = None,
) -> list[bytes]:
    """Frames for a request (without the identity frame a DEALER never sends)."""
    header = {"v": PROTOCOL_VERSION, "id": msg_id or new_id(), "kind": "request",
              "syscall": syscall, "client": client}
    if events:
        header["events"] = True
    return [MAGIC, _pack(header), _pack(body), *(buffers or [])]


def encode_reply(
    reply_to: str | None, syscall: str, result: Any, buffers: list[bytes] | None = None
) -> list[bytes]:
    """Frames for a successful reply."""
    header = {"v": PROTOCOL_VERSION, "id": new_id(), "kind": "reply", "re": reply_to,
              "syscall": syscall, "status": "ok"}
    return [MAGIC, _pack(header), _pack(result), *(buffers or [])]


def encode_error(
    reply_to: str | None, syscall: str, code: ErrorCode | str, message: str
) -> list[bytes]:
    """Frames for an error reply; the body is ``{"code": ..., "message": ...}``."""
    header = {"v": PROTOCOL_VERSION, "id": new_id(), "kind": "reply", "re": reply_to,
              "syscall": syscall, "status": "error"}
    return [MAGIC, _pack(header), _pack({"code": str(code), "message": message})]


def encode_event(reply_to: str, syscall: str, event: str, data: dict[str, Any]) -> list[bytes]:
    """Frames for an event about a request still in progress (accepted, progress, token)."""
    header = {"v": PROTOCOL_VERSION, "id": new_id(), "kind": "event", "re": reply_to,
              "syscall": syscall, "event": event}
    return [MAGIC, _pack(header), _pack(data)]


def decode(frames: list[bytes], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate frames (identity already removed) into a :class:`Message`.

    Raises :class:`ProtocolError` (BAD_REQUEST) with a message a person can act on, carrying
    the request id when the header could be read.
    """
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames (magic, header, body), got {len(frames)}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"too many frames: {len(frames)} > {MAX_FRAMES}")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    if frames[0] != MAGIC:
        raise ProtocolError("first frame must be the protocol magic b'LLMOS'")
    header = _unpack_map(frames[1], "header", max_bytes)
    msg_id = _reply_id(header)
    error = _flaw(header, "header") or _check_header(header)
    if error:
        raise ProtocolError(error, msg_id)
    body = _unpack_map(frames[2], "body", max_bytes, msg_id)
    error = _flaw(body, "body")
    if error:
        raise ProtocolError(error, msg_id)
    return Message(
        syscall=header["syscall"], body=body, msg_id=header["id"],
        client=header.get("client", ""), kind=header.get("kind", "request"),
        reply_to=header.get("re"), status=header.get("status"),
        events=header.get("events", False), buffers=list(frames[3:]),
    )


def _reply_id(header: dict[Any, Any]) -> str | None:
    """The header's ``id`` when an error reply may carry it back (a valid id: a string of
    at most MAX_ID_CHARS characters, all UTF-8); None otherwise."""
    msg_id = header.get("id")
    if _check_text(header, "id", MAX_ID_CHARS) is None and not _SURROGATE.search(msg_id):
        return msg_id
    return None


def _check_text(header: dict[str, Any], name: str, limit: int, *, empty: bool = False) -> str | None:
    """The problem with the header's string field ``name``, or None when it is valid
    (a string of at most ``limit`` characters, non-empty unless ``empty``). A missing field
    counts as ``""``."""
    value = header.get(name, "")
    if not isinstance(value, str):
        return f"header field {name!r} must be a string, got {type(value).__name__}"
    if not value and not empty:
        return f"header field {name!r} must be a non-empty string"
    if len(value) > limit:
        return f"header field {name!r} has {len(value)} characters (limit {limit})"
    return None


def _check_header(header: dict[str, Any]) -> str | None:
    """The first problem with a header (already checked by :func:`_flaw`), or None when it
    is valid. Types are exact: ``True`` is not the version ``1``."""
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        return (f"header field 'v': protocol version {quote(version)} is not supported; "
                f"this kernel speaks {PROTOCOL_VERSION}")
    for name, limit, empty in (("id", MAX_ID_CHARS, False), ("syscall", MAX_SYSCALL_CHARS, False),
                               ("client", MAX_CLIENT_CHARS, True)):
        error = _check_text(header, name, limit, empty=empty)
        if error:
            return error
    if header.get("kind", "request") not in ("request", "reply", "event"):
        return "header field 'kind' must be 'request', 'reply' or 'event'"
    if type(header.get("events", False)) is not bool:
        return (f"header field 'events' must be a boolean, "
                f"got {type(header['events']).__name__}")
    return None


# --- tensors as raw frames -------------------------------------------------------------

#: Bytes per item of each tensor dtype the wire allows.
ITEM_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1}


def tensor_ref(array: np.ndarray, buffers: list[bytes]) -> dict[str, Any]:
    """Append ``array``'s bytes to ``buffers`` and return the body entry that points to it."""
    array = np.ascontiguousarray(array)
    buffers.append(array.tobytes())
    return {"buffer": len(buffers) - 1, "dtype": str(array.dtype), "shape": list(array.shape)}


def tensor_from_ref(ref: Any, buffers: list[bytes]) -> np.ndarray:
    """The array a body entry points to; ProtocolError if the reference is invalid."""
    index, dtype, shape = checked_ref(ref, buffers)
    return np.frombuffer(buffers[index], dtype=dtype).reshape(shape)


def checked_ref(ref: Any, buffers: Sequence[bytes | memoryview],
                rows: int | None = None) -> tuple[int, str, list[int]]:
    """The buffer index, dtype and shape of a tensor reference whose buffer holds exactly
    the bytes its shape and dtype need (and, given ``rows``, whose first dimension is
    ``rows``); ProtocolError if it is invalid."""
    if not isinstance(ref, dict) or not {"buffer", "dtype", "shape"} <= ref.keys():
        raise ProtocolError("tensor reference must be a map with buffer, dtype and shape")
    index, dtype, shape = ref["buffer"], ref["dtype"], ref["shape"]
    if not isinstance(index, int) or not 0 <= index < len(buffers):
        raise ProtocolError(f"tensor buffer index {index!r} is out of range")
    if dtype not in ITEM_BYTES:
        raise ProtocolError(f"tensor dtype {dtype!r} is not one of {sorted(ITEM_BYTES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError("tensor shape must be a list of non-negative integers")
    if rows is not None and not shape:
        raise ProtocolError("tensor shape must be a non-empty list of non-negative integers")
    if rows is not None and shape[0] != rows:
        raise ProtocolError(f"tensor has {shape[0]} rows for {rows} inputs")
    expected = math.prod(shape) * ITEM_BYTES[dtype]
    size = memoryview(buffers[index]).nbytes
    if size != expected:
        raise ProtocolError(f"tensor buffer has {size} bytes, shape {shape} {dtype} needs {expected}")
    return index, dtype, shape


def decode_reply(frames: list[bytes]) -> Message:
    """Decode a reply or event from the kernel (client side: msgpack only, size-limited)."""
    if len(frames) < 3 or frames[0] != MAGIC:
        raise ProtocolError("malformed reply from the kernel")
    header = _unpack(frames[1], DEFAULT_MAX_MESSAGE_BYTES)
    body = _unpack(frames[2], DEFAULT_MAX_MESSAGE_BYTES)
    if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"reply speaks protocol {header!r}, this client speaks {PROTOCOL_VERSION}")
    return Message(
        syscall=header.get("syscall", ""), body=body if isinstance(body, dict) else {},
        msg_id=header.get("id", ""), kind=header.get("kind", "reply"),
        reply_to=header.get("re"), status=header.get("status"), event=header.get("event"),
        buffers=list(frames[3:]),
    )
