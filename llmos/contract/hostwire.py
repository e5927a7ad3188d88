"""The host wire: what the kernel and a driver-host process say to each other.

Internal to one machine (an ipc socket under the run folder, a secret token in the
environment), msgpack bodies, never pickle. A message is ``[kind, body, *buffers]``; the
first message a host sends is READY with the token the kernel passed in
``LLMOS_HOST_TOKEN`` and :data:`HOST_PROTOCOL_VERSION`.

The kernel sends TASK (``{"task": id, "op": TaskOp, ...payload}``) and STOP; the host
answers each task with one DONE (``{"task", "ok", "cpu_seconds", "rss", ...}`` or
``{"ok": False, "code", "message"}``), sends HB every :data:`HEARTBEAT_INTERVAL` while it
lives, and STREAM (``{"events": [...]}``) for every generation step.

Long-running jobs run as sessions in quanta (:data:`SESSION_TASK_OPS`), each task keyed by
``job``. A ``compress`` or ``update`` task, and a data-parallel ``train`` task, names the
session class the host runs in ``session`` (``"package.module:Class"``, registered by the
plugin that owns the job): the host imports it, drivers name no plugin. A ``train`` task
without ``session`` is the driver's own training. (Version 2: ``session`` is new.)
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

HOST_PROTOCOL_VERSION = 2
#: Seconds between two heartbeats of a host, sent even while a task computes.
HEARTBEAT_INTERVAL = 0.25
#: The environment variable that carries a host's secret token.
TOKEN_ENV = "LLMOS_HOST_TOKEN"


class HostMessage(bytes, enum.Enum):
    """The first frame of every host-wire message."""

    # host -> kernel
    READY = b"READY"
    HEARTBEAT = b"HB"
    DONE = b"DONE"
    STREAM = b"STREAM"
    START_FAILED = b"START_FAILED"
    # kernel -> host
    TASK = b"TASK"
    STOP = b"STOP"


class TaskOp(enum.StrEnum):
    """What a TASK asks a host to do."""

    LOAD = "load"
    UNLOAD = "unload"
    #: Inference on a batch of inputs (``handle``, ``kind``, ``inputs``).
    RUN = "run"
    #: One pipeline stage: the previous stage's activations arrive as buffers.
    STAGE = "stage"
    #: Quanta of long-running sessions (training, compression, update), keyed by ``job``;
    #: ``session`` names a plugin's session class (``"package.module:Class"``).
    TRAIN = "train"
    COMPRESS = "compress"
    UPDATE = "update"
    EVALUATE = "evaluate"
    #: Drop a session's state (its job ended).
    FORGET = "forget"
    #: Start, steer and stop generations (answered between decode steps).
    GENERATE = "generate"
    CANCEL = "cancel"
    RENICE = "renice"


#: Ops handled without blocking the compute thread: they start or steer generations.
STREAMING_TASK_OPS = frozenset({TaskOp.GENERATE, TaskOp.CANCEL, TaskOp.RENICE})
#: Ops that run one quantum of a job's session (``job``, ``spec``, ``seconds``, and for a
#: plugin's session ``session``).
SESSION_TASK_OPS = frozenset({TaskOp.TRAIN, TaskOp.COMPRESS, TaskOp.UPDATE})
#: Ops that run in the background of their hardware (session quanta, generation): they
#: neither wait for nor block foreground work on it.
BACKGROUND_TASK_OPS = STREAMING_TASK_OPS | SESSION_TASK_OPS
#: Tasks a stalled host gives back at once to run elsewhere: inference, which is safe to
#: run twice (the first result wins). Sessions wait for the host to wake or die.
REASSIGNABLE_TASK_OPS = frozenset({TaskOp.RUN, TaskOp.STAGE, TaskOp.GENERATE})


def pack(obj: Any) -> bytes:
    """Encode a host-wire body."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    """Decode a host-wire body."""
    return msgpack.unpackb(raw, raw=False)
