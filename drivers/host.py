"""The driver host: a worker process that runs one driver on one device for the kernel.

Started by the kernel as ``python -m llmos.drivers.host``; never by hand. Two threads:

* the IO thread owns the DEALER socket to the kernel's backend, sends a heartbeat every
  ``HEARTBEAT_INTERVAL`` even while a batch computes, and exits the process if the kernel
  (its parent) is gone;
* the compute thread (main) constructs the driver, then runs tasks one at a time; while
  the driver is generating it polls for tasks between decode steps instead of blocking, so
  new requests join the running batch and other tasks run in between;
* with ``--streams N`` granted by the driver (:meth:`Driver.use_streams`), ``run`` batches
  go to N stream threads instead, up to N at once; each sends its DONE to the IO thread
  itself (an inproc PUSH socket of its own).

A ``generate`` task stays in flight until each of its requests has finished: every step
sends one STREAM message with the events of all requests, and a request's task gets its
DONE when the last of its requests finishes.

The host wire (message kinds, task ops, bodies) is in :mod:`llmos.contract.hostwire`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import psutil
import zmq

from llmos.contract.hostwire import (
    HEARTBEAT_INTERVAL,
    HOST_PROTOCOL_VERSION,
    SESSION_TASK_OPS,
    STREAMING_TASK_OPS,
    TOKEN_ENV,
    HostMessage,
    pack,
    unpack,
)
from llmos.contract.protocol import ErrorCode, KernelError, tensor_from_ref, tensor_ref
from llmos.kernel.output import keep_output_from_failing

from .base import Driver, granted_streams, import_qualname
from .tuning import time_shapes

#: Where stream threads send their DONE messages (the IO thread forwards them).
STREAM_DONE_ADDRESS = "inproc://stream-done"

log = logging.getLogger("llmos.host")


def import_driver(qualname: str) -> type[Driver]:
    """The class named ``"package.module:Class"``; it must subclass Driver."""
    cls = import_qualname(qualname)
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise TypeError(f"{qualname} is not a llmos Driver subclass")
    return cls


def run_task(driver: Driver, task: dict[str, Any], process: psutil.Process,
             inbound: list[bytes] | None = None, share: int = 1) -> list[bytes]:
    """Execute one task (``inbound``: its tensor frames) and return the DONE frames
    (errors become an error DONE, never raise). Its ``cpu_seconds`` is the process's CPU
    time while it ran divided by ``share`` (the batches that may run beside it)."""
    cpu_before = sum(process.cpu_times()[:2])
    buffers: list[bytes] = []
    body: dict[str, Any] = {"task": task["task"], "ok": True}
    try:
        op = task["op"]
        if op == "load":
            options = task.get("options", {})
            body["info"] = asdict(driver.load(task["handle"], task["path"], options))
            if options.get("tune"):
                body["info"]["timings"] = time_shapes(driver, task["handle"], options["tune"])
        elif op == "unload":
            driver.unload(task["handle"])
        elif op in SESSION_TASK_OPS and "session" in task:  # a plugin's session, by qualname
            body["progress"] = driver.run_session(task["job"], task["session"], task["spec"],
                                                  task["seconds"])
        elif op == "train":
            body["progress"] = driver.train(task["job"], task["spec"], task["seconds"])
        elif op == "forget":
            driver.forget(task["job"])
        elif op == "evaluate":
            body["metrics"] = driver.evaluate(task["path"], task["data"], task["split"], task["seed"])
        elif op == "run":
            output = driver.run(task["handle"], task["kind"], task["inputs"],
                                task.get("options", {}))
            body["arrays"] = {name: tensor_ref(a, buffers) for name, a in output.arrays.items()}
            body["tokens"] = output.tokens
            if task["kind"] == "classify" and "probs" in output.arrays:  # not a first stage's
                # each input's top class, so that the kernel only slices lists
                probs = output.arrays["probs"]
                body["top"] = {"index": probs.argmax(axis=1).tolist(),
                               "score": probs.max(axis=1).tolist()}
        elif op == "stage":  # a pipeline stage: the previous stage's activations come in
            arrays = {name: tensor_from_ref(ref, inbound or []) for name, ref in task["arrays"].items()}
            output = driver.run_stage(task["handle"], task["kind"], arrays, task.get("options", {}))
            body["arrays"] = {name: tensor_ref(a, buffers) for name, a in output.arrays.items()}
            body["tokens"] = output.tokens
            if task["kind"] == "classify" and "probs" in output.arrays:  # the last stage's
                # each input's top class, so that the kernel only slices lists
                probs = output.arrays["probs"]
                body["top"] = {"index": probs.argmax(axis=1).tolist(),
                               "score": probs.max(axis=1).tolist()}
        else:
            raise KernelError(ErrorCode.INTERNAL, f"unknown host op {op!r}")
    except KernelError as exc:
        body.update(ok=False, code=str(exc.code), message=exc.message)
        buffers = []
    except Exception as exc:  # a driver bug fails this task, not the host
        log.error("task %s failed:\n%s", task.get("task"), traceback.format_exc())
        body.update(ok=False, code=str(ErrorCode.INTERNAL), message=f"{type(exc).__name__}: {exc}")
        buffers = []
    body["cpu_seconds"] = (sum(process.cpu_times()[:2]) - cpu_before) / share
    body["rss"] = process.memory_info().rss
    return [HostMessage.DONE, pack(body), *buffers]


class _IOThread(threading.Thread):
    """Relays between the kernel (DEALER) and the compute thread (inproc PAIR); heartbeats."""

    def __init__(self, ctx: zmq.Context, address: str, identity: bytes, parent_pid: int) -> None:
        super().__init__(name="llmos-host-io", daemon=True)
        self.ctx, self.address, self.identity, self.parent_pid = ctx, address, identity, parent_pid
        self.ready = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, self.identity)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.connect(self.address)
        pair = self.ctx.socket(zmq.PAIR)
        pair.bind("inproc://compute")
        finished = self.ctx.socket(zmq.PULL)
        finished.bind(STREAM_DONE_ADDRESS)
        self.ready.set()
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        poller.register(finished, zmq.POLLIN)
        process = psutil.Process()
        next_beat = 0.0
        while not self.stopped.is_set():
            now = time.monotonic()
            if now >= next_beat:
                if os.getppid() != self.parent_pid:  # the kernel died: nothing to serve
                    os._exit(3)
                dealer.send_multipart([HostMessage.HEARTBEAT, pack({"rss": process.memory_info().rss})])
                next_beat = now + HEARTBEAT_INTERVAL
            events = dict(poller.poll(max(1, int((next_beat - now) * 1000))))
            if dealer in events:
                frames = dealer.recv_multipart(copy=True)
                pair.send_multipart(frames)
                if frames[0] == HostMessage.STOP:
                    break
            if pair in events:
                dealer.send_multipart(pair.recv_multipart(copy=True))
            if finished in events:
                dealer.send_multipart(finished.recv_multipart(copy=True))
        dealer.close()
        pair.close()
        finished.close()


class _StreamPool:
    """``run`` batches on the driver's streams: one thread per stream, each replying on a
    PUSH socket of its own to the IO thread (sockets are not shared between threads)."""

    def __init__(self, ctx: zmq.Context, driver: Driver, streams: int,
                 process: psutil.Process) -> None:
        self.ctx, self.driver, self.streams, self.process = ctx, driver, streams, process
        self.local = threading.local()
        self.executor = ThreadPoolExecutor(streams, thread_name_prefix="llmos-stream")

    def submit(self, task: dict[str, Any]) -> None:
        self.executor.submit(self._run, task)

    def _run(self, task: dict[str, Any]) -> None:
        socket = getattr(self.local, "socket", None)
        if socket is None:
            socket = self.local.socket = self.ctx.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 1000)
            socket.connect(STREAM_DONE_ADDRESS)
        socket.send_multipart(run_task(self.driver, task, self.process, share=self.streams))

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class _Generations:
    """Which generate task each running request belongs to, to send each task its DONE."""

    def __init__(self) -> None:
        self.task_of: dict[int, int] = {}
        self.remaining: dict[int, set[int]] = {}

    def add(self, task_id: int, ids: list[int]) -> None:
        self.remaining[task_id] = set(ids)
        for seq_id in ids:
            self.task_of[seq_id] = task_id

    def running(self) -> list[int]:
        """Ids of every request not yet finished."""
        return list(self.task_of)

    def finished(self, events: list[dict[str, Any]]) -> list[int]:
        """Tasks all of whose requests have now finished."""
        done = []
        for event in events:
            if "finish" not in event:
                continue
            task_id = self.task_of.pop(int(event["id"]), None)
            if task_id is not None:
                self.remaining[task_id].discard(int(event["id"]))
                if not self.remaining[task_id]:
                    del self.remaining[task_id]
                    done.append(task_id)
        return done


def run_streaming(driver: Driver, task: dict[str, Any], generations: _Generations,
                  process: psutil.Process) -> list[list[bytes]]:
    """Handle a streaming-related task (generate, cancel, renice); the messages to send."""
    op = task["op"]
    events: list[dict[str, Any]] = []
    replies: list[list[bytes]] = []
    if op == "generate":
        generations.add(task["task"], [int(r["id"]) for r in task["requests"]])
        try:
            events = driver.generate(task["handle"], task["requests"])
        except KernelError as exc:
            events = [{"id": r["id"], "finish": "error", "code": str(exc.code),
                       "message": exc.message} for r in task["requests"]]
        except Exception as exc:  # a driver bug fails these requests, not the host
            log.error("generate failed:\n%s", traceback.format_exc())
            events = [{"id": r["id"], "finish": "error", "code": str(ErrorCode.INTERNAL),
                       "message": f"{type(exc).__name__}: {exc}"} for r in task["requests"]]
    else:
        try:
            if op == "cancel":
                events = driver.cancel([int(i) for i in task["ids"]])
            else:
                driver.reprioritize(int(task["id"]), int(task["priority"]))
        except Exception:  # a driver bug here must not end the other generations
            log.error("%s failed:\n%s", op, traceback.format_exc())
        replies.append(_done(task["task"], process))
    return [*_stream_messages(events, generations, process), *replies]


def step_generations(driver: Driver, generations: _Generations) -> list[dict[str, Any]]:
    """One generation step's events. A driver whose step raises (the built-in engine
    contains its own faults; a third party's may not) ends every running request with an
    error event and is told to drop them; the host itself serves on."""
    try:
        return driver.step()
    except Exception as exc:
        log.error("generation step failed:\n%s", traceback.format_exc())
        ids = generations.running()
        try:
            driver.cancel(ids)
        except Exception:
            log.error("cancel after a failed step failed:\n%s", traceback.format_exc())
        message = f"generation failed: {type(exc).__name__}: {exc}"
        return [{"id": i, "finish": "error", "code": str(ErrorCode.INTERNAL), "message": message}
                for i in ids]


def _stream_messages(events: list[dict[str, Any]], generations: _Generations,
                     process: psutil.Process) -> list[list[bytes]]:
    if not events:
        return []
    return [[HostMessage.STREAM, pack({"events": events})],
            *(_done(task_id, process) for task_id in generations.finished(events))]


def _done(task_id: int, process: psutil.Process) -> list[bytes]:
    return [HostMessage.DONE, pack({"task": task_id, "ok": True, "cpu_seconds": 0.0,
                        "rss": process.memory_info().rss})]


def serve(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV, "")
    ctx = zmq.Context()
    io = _IOThread(ctx, args.connect, args.identity.encode(), os.getppid())
    io.start()
    io.ready.wait()
    pair = ctx.socket(zmq.PAIR)
    pair.connect("inproc://compute")
    hello = {"v": HOST_PROTOCOL_VERSION, "token": token, "pid": os.getpid()}
    try:
        driver = import_driver(args.driver)(args.device, args.threads)
        streams = granted_streams(driver, args.streams)
        hello["info"] = {**driver.describe(), "streams": streams}
    except Exception as exc:
        pair.send_multipart([HostMessage.START_FAILED, pack({**hello, "message": f"{exc}"})])
        time.sleep(0.5)  # let the IO thread deliver it
        return 1
    pair.send_multipart([HostMessage.READY, pack(hello)])
    process = psutil.Process()
    pool = _StreamPool(ctx, driver, streams, process) if streams > 1 else None
    generations = _Generations()
    while True:
        if driver.generating and not pair.poll(0):
            for message in _stream_messages(step_generations(driver, generations), generations, process):
                pair.send_multipart(message)
            continue
        frames = pair.recv_multipart(copy=True)
        if frames[0] == HostMessage.STOP:
            break
        if frames[0] != HostMessage.TASK:
            continue
        task = unpack(frames[1])
        if task.get("op") in STREAMING_TASK_OPS:
            for message in run_streaming(driver, task, generations, process):
                pair.send_multipart(message)
        elif pool is not None and task.get("op") == "run":
            pool.submit(task)
        else:
            pair.send_multipart(run_task(driver, task, process, frames[2:]))
    if pool is not None:
        pool.close()
    io.stopped.set()
    io.join(timeout=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmos.drivers.host")
    parser.add_argument("--connect", required=True)
    parser.add_argument("--driver", required=True, help="qualname package.module:Class")
    parser.add_argument("--device", required=True)
    parser.add_argument("--identity", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=int, default=1)
    keep_output_from_failing()  # its log is a file under LLMOS_HOME: a full disk fails no task
    logging.basicConfig(level=logging.INFO, format="%(asctime)s host %(levelname)s %(message)s")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
