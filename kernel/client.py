"""Client libraries: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both speak the wire protocol over one DEALER socket and expose one method per syscall
(the same methods, shared through :class:`_Syscalls`). Many requests may be in flight on
one client; replies are matched to requests by id. Errors are raised as
:class:`~llmos.contract.protocol.KernelError` with the kernel's code; a kernel that does not
answer in time raises KernelError(TIMEOUT).

A client connects lazily: before its first request it checks that a kernel answers (see
:meth:`Client._handshake`), so a missing kernel or a wrong address is one clear TIMEOUT
error (:func:`no_kernel`) within :data:`CONNECT_TIMEOUT`, not a wait of the request's whole
timeout. Once a kernel has answered, each request waits as long as its own timeout.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
import zmq.auth

from llmos.contract.protocol import (
    ErrorCode,
    KernelError,
    Message,
    decode_reply,
    encode_request,
    new_id,
    tensor_from_ref,
)

from .config import default_address

DEFAULT_TIMEOUT = 300.0
#: The longest a client waits before its first request to learn whether a kernel answers
#: (never longer than the client's own ``timeout``).
CONNECT_TIMEOUT = 2.0
#: What to run when no kernel answers: the end of every :func:`no_kernel` error.
NO_KERNEL_HINT = ("start one with `llmos kernel start --detach`, or name the running one "
                  "with --address or LLMOS_ADDRESS")


def no_kernel(address: str, why: str) -> KernelError:
    """The error a client raises when no kernel answers at ``address``: TIMEOUT (as for any
    request that gets no reply), saying ``why`` and what to run."""
    return KernelError(ErrorCode.TIMEOUT, f"no kernel answers at {address} ({why}): "
                                          f"{NO_KERNEL_HINT}")


#: A ``tcp://HOST:PORT`` address (HOST a name, an IPv4 address or a bracketed IPv6 one).
_TCP_ADDRESS = re.compile(r"tcp://(\[[^\]]+\]|[^:;/\[\]]+):(\d+)")


def check_listening(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """That something accepts connections at ``address`` (an ipc socket file, or the port
    of ``tcp://HOST:PORT``; other forms are not checked): one connect within ``timeout``
    seconds, closed at once, no message sent. :func:`no_kernel` if there is no socket file,
    nothing listens (a stale file, a closed port), the host is unknown or does not answer;
    KernelError(DENIED) if this user may not connect to the socket file."""
    try:
        _connect_once(address, timeout)
    except FileNotFoundError:
        raise no_kernel(address, "no socket file there") from None
    except ConnectionRefusedError:
        why = "a stale socket file: nothing listens on it" if address.startswith("ipc://") \
            else "nothing listens on that port"
        raise no_kernel(address, why) from None
    except PermissionError:
        raise KernelError(ErrorCode.DENIED, f"may not connect to the kernel at {address} "
                          "(its socket belongs to another user)") from None
    except TimeoutError:
        raise no_kernel(address, f"no connection within {timeout:g} s") from None
    except OSError as exc:
        raise no_kernel(address, exc.strerror or type(exc).__name__) from None


def _connect_once(address: str, timeout: float) -> None:
    """Connect to ``address``'s socket and close it (nothing for a form not checked);
    OSError as the connect raised it."""
    if address.startswith("ipc://"):
        path = address[len("ipc://"):]
        target = "\0" + path[1:] if path.startswith("@") else path  # @NAME: Linux's abstract names
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            probe.connect(target)
    elif match := _TCP_ADDRESS.fullmatch(address):
        socket.create_connection((match[1].strip("[]"), int(match[2])), timeout).close()


def _silence(limit: float, secure: bool) -> str:
    """Why a handshake ``ping`` got no reply within ``limit`` seconds, for :func:`no_kernel`."""
    curve = "; or the kernel refused this client's CURVE key" if secure else ""
    return f"no answer to ping within {limit:g} s{curve}"


def unpack_result(reply: Message) -> dict[str, Any]:
    """The body of an ok reply with tensor references replaced by numpy arrays."""
    if reply.status != "ok":
        raise KernelError(reply.body.get("code", ErrorCode.INTERNAL),
                          str(reply.body.get("message", "unknown error")))
    return {key: tensor_from_ref(value, reply.buffers)
            if isinstance(value, dict) and "buffer" in value else value
            for key, value in reply.body.items()}


def _field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda result: result[name]


def _identity(result: dict[str, Any]) -> dict[str, Any]:
    return result


class _Syscalls:
    """One method per syscall; ``_call`` is the transport (blocking or awaitable).

    Each method's parameters are its syscall's arguments (:data:`~llmos.contract.syscalls.
    SYSCALLS`), with the same names: required ones first, positionally; the others keyword
    (a few also positional) and ``None`` by default, which the kernel replaces with the
    argument's default. tests/test_syscall_agreement.py holds the table to this, with its
    few exceptions (``import_model``, ``job_id``, ``ping``'s client-side ``timeout``).
    """

    def _call(self, syscall: str, args: dict[str, Any],
              shape: Callable[[dict[str, Any]], Any] = _identity,
              timeout: float | None = None) -> Any:
        raise NotImplementedError

    def ping(self, timeout: float = 5.0) -> Any:
        """Liveness; ``timeout`` is how long to wait for the answer (client side)."""
        return self._call("ping", {}, timeout=timeout)

    def noop(self) -> Any:
        """Nothing, answered by the kernel's scheduling loop: a syscall's round trip."""
        return self._call("noop", {})

    def info(self) -> Any:
        return self._call("info", {})

    def drivers(self) -> Any:
        return self._call("drivers", {}, _field("drivers"))

    def devices(self) -> Any:
        return self._call("devices", {}, _field("devices"))

    def models(self) -> Any:
        return self._call("models", {}, _field("models"))

    def import_model(self, source: str | None = None, *, path: str | None = None,
                     name: str | None = None, priority: int | None = None,
                     timeout: float | None = None) -> Any:
        """Import a model from a named source package or a local Hugging Face folder."""
        return self._call("import", {"source": source, "path": path, "name": name,
                                     "priority": priority, "timeout": timeout})

    def load(self, model: str, *, version: int | None = None, device: str | None = None,
             driver: str | None = None, precision: str | None = None,
             calibrate: str | None = None, max_seqs: int | None = None,
             prefix_cache_mb: int | None = None, replicas: int | None = None,
             stages: int | None = None, priority: int | None = None,
             timeout: float | None = None) -> Any:
        """Load onto one device, one driver's devices, or (default) every driver, autotuned
        (a generative model: onto the drivers that generate, ``max_seqs`` at once, keeping
        ``prefix_cache_mb`` of shared prompt prefixes).
        ``precision`` is the lowest allowed (``bf16``, ``int8``: calibrated on
        ``calibrate``, a bundled dataset or a file, default the version's training data);
        ``replicas``: onto N new hosts of one driver; ``stages``: split across N hosts."""
        return self._call("load", {"model": model, "version": version, "device": device,
                                   "driver": driver, "precision": precision,
                                   "calibrate": calibrate, "max_seqs": max_seqs,
                                   "prefix_cache_mb": prefix_cache_mb,
                                   "replicas": replicas, "stages": stages,
                                   "priority": priority, "timeout": timeout})

    def export(self, model: str, format: str, *, version: int | None = None,
               priority: int | None = None, timeout: float | None = None) -> Any:
        """Export to ``onnx`` or ``openvino``; the artifact is cached per version."""
        return self._call("export", {"model": model, "version": version, "format": format,
                                     "priority": priority, "timeout": timeout})

    def unload(self, model: str, *, version: int | None = None, device: str | None = None,
               priority: int | None = None, timeout: float | None = None) -> Any:
        return self._call("unload", {"model": model, "version": version, "device": device,
                                     "priority": priority, "timeout": timeout})

    def infer(self, model: str, task: str, inputs: list[str], *, version: int | None = None,
              priority: int | None = None, timeout: float | None = None) -> Any:
        """The full result: model, job id, arrays as numpy, predictions for classify."""
        return self._call("infer", {"model": model, "version": version, "task": task,
                                    "inputs": inputs, "priority": priority, "timeout": timeout})

    def embed(self, model: str, texts: list[str], *, version: int | None = None,
              priority: int | None = None, timeout: float | None = None) -> Any:
        """Unit-norm embeddings, shape (len(texts), dim): ``infer`` with task ``embed``."""
        return self._call("infer", {"model": model, "version": version, "task": "embed",
                                    "inputs": texts, "priority": priority, "timeout": timeout},
                          _field("embeddings"))

    def classify(self, model: str, texts: list[str], *, version: int | None = None,
                 priority: int | None = None, timeout: float | None = None) -> Any:
        """One ``{"label", "score"}`` per text: ``infer`` with task ``classify``."""
        return self._call("infer", {"model": model, "version": version, "task": "classify",
                                    "inputs": texts, "priority": priority, "timeout": timeout},
                          _field("predictions"))

    def generate(self, model: str, prompt: str | None = None, *, version: int | None = None,
                 messages: list[dict[str, str]] | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None,
                 stop: list[str] | None = None, seed: int | None = None,
                 ignore_eos: bool | None = None, priority: int | None = None,
                 timeout: float | None = None) -> Any:
        """The whole generation of a ``prompt`` or chat ``messages``: ``text``,
        ``finish_reason``, ``usage``. To stream the text, use
        ``submit("generate", ..., events=True)`` and :meth:`Pending.stream`."""
        return self._call("generate", {
            "model": model, "version": version, "prompt": prompt, "messages": messages,
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "stop": stop, "seed": seed, "ignore_eos": ignore_eos, "priority": priority,
            "timeout": timeout})

    def learn(self, model: str, examples: list[dict[str, str]], *,
              version: int | None = None) -> Any:
        """Send labelled feedback (``[{"text": ..., "label": ...}]``); answered once it is on
        disk: ``accepted``, ``buffered`` (the model's total), ``first_id``, ``last_id``."""
        return self._call("learn", {"model": model, "version": version, "examples": examples})

    def datasets(self) -> Any:
        return self._call("datasets", {}, _field("datasets"))

    def train(self, model: str, *, version: int | None = None, data: str | None = None,
              path: str | None = None, name: str | None = None, epochs: float | None = None,
              batch_size: int | None = None, learning_rate: float | None = None,
              seed: int | None = None, max_tokens: int | None = None, limit: int | None = None,
              quantum: float | None = None, checkpoint_every: float | None = None,
              parallel: str | None = None, world_size: int | None = None,
              local_ranks: int | None = None, master_addr: str | None = None,
              master_port: int | None = None, resume: int | None = None,
              priority: int | None = None, timeout: float | None = None) -> Any:
        """Fine-tune ``model`` on a bundled dataset or a CSV/JSONL file; waits for the new
        version. Use ``submit("train", ..., events=True)`` for progress."""
        return self._call("train", {
            "model": model, "version": version, "data": data, "path": path, "name": name,
            "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
            "seed": seed, "max_tokens": max_tokens, "limit": limit, "quantum": quantum,
            "checkpoint_every": checkpoint_every, "parallel": parallel,
            "world_size": world_size, "local_ranks": local_ranks, "master_addr": master_addr,
            "master_port": master_port, "resume": resume, "priority": priority,
            "timeout": timeout})

    def evaluate(self, model: str, *, version: int | None = None, data: str | None = None,
                 path: str | None = None, split: str | None = None, seed: int | None = None,
                 priority: int | None = None, timeout: float | None = None) -> Any:
        """Accuracy, macro-F1, balanced accuracy and the majority-class baseline of a
        classifier: on a bundled dataset's ``test`` split, or on every row of a file at
        ``path``, unless ``split`` names one (train, validation, test, all)."""
        return self._call("evaluate", {"model": model, "version": version, "data": data,
                                       "path": path, "split": split, "seed": seed,
                                       "priority": priority, "timeout": timeout})

    def compress(self, model: str, recipe: list[dict[str, Any]] | None = None, *,
                 version: int | None = None, search: bool | None = None,
                 data: str | None = None, path: str | None = None, name: str | None = None,
                 max_drop: float | None = None, seed: int | None = None,
                 max_tokens: int | None = None, eval_limit: int | None = None,
                 quantum: float | None = None, priority: int | None = None,
                 timeout: float | None = None) -> Any:
        """Run a compression recipe (``[{"step": "quantize", "method": ...}, ...]``), or a
        grid with ``search``; waits for the result: the new version (None if the gate
        failed) and the report."""
        return self._call("compress", {
            "model": model, "version": version, "recipe": recipe, "search": search,
            "data": data, "path": path, "name": name, "max_drop": max_drop, "seed": seed,
            "max_tokens": max_tokens, "eval_limit": eval_limit, "quantum": quantum,
            "priority": priority, "timeout": timeout})

    def promote(self, model: str, version: int, *, priority: int | None = None,
                timeout: float | None = None) -> Any:
        """Make ``model:version`` serve ``model`` (hot swap; no request fails)."""
        return self._call("promote", {"model": model, "version": version,
                                      "priority": priority, "timeout": timeout})

    def update(self, model: str, method: str = "lora", *, version: int | None = None,
               params: dict[str, Any] | None = None, replay: int | None = None,
               distill: float | None = None, max_drop: float | None = None,
               holdout: float | None = None, limit: int | None = None,
               eval_limit: int | None = None, promote: bool | None = None,
               data: str | None = None, path: str | None = None, seed: int | None = None,
               max_tokens: int | None = None, quantum: float | None = None,
               priority: int | None = None, timeout: float | None = None) -> Any:
        """Learn from ``model``'s feedback buffer with an update method (lora, online,
        finetune); waits for the gated candidate: ``model``, ``passed``, ``reason``,
        ``promoted`` and the ``report``."""
        return self._call("update", {
            "model": model, "version": version, "method": method, "params": params,
            "replay": replay, "distill": distill, "max_drop": max_drop, "holdout": holdout,
            "limit": limit, "eval_limit": eval_limit, "promote": promote, "data": data,
            "path": path, "seed": seed, "max_tokens": max_tokens, "quantum": quantum,
            "priority": priority, "timeout": timeout})

    def rollback(self, model: str, *, priority: int | None = None,
                 timeout: float | None = None) -> Any:
        """Serve again the version that served ``model`` before the current one (hot swap)."""
        return self._call("rollback", {"model": model, "priority": priority, "timeout": timeout})

    def jobs(self, *, owner: str | None = None, finished: bool = True) -> Any:
        return self._call("jobs", {"owner": owner, "finished": finished}, _field("jobs"))

    def job(self, job_id: int) -> Any:
        return self._call("job", {"id": job_id})

    def cancel(self, job_id: int) -> Any:
        return self._call("cancel", {"id": job_id})

    def renice(self, job_id: int, priority: int) -> Any:
        return self._call("renice", {"id": job_id, "priority": priority})

    def stats(self, model: str | None = None, *, version: int | None = None) -> Any:
        """Kernel counters; with ``model``, that version's monitoring (traffic, latency,
        errors, feedback accuracy, drift scores, alerts)."""
        return self._call("stats", {"model": model, "version": version})

    def shutdown(self) -> Any:
        return self._call("shutdown", {})


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """A client's CURVE key pair and the kernel's public key (z85 bytes)."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def from_files(cls, client_secret_file: str | Path, server_public_file: str | Path) -> CurveKeys:
        public, secret = zmq.auth.load_certificate(client_secret_file)
        server, _ = zmq.auth.load_certificate(server_public_file)
        if secret is None:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{client_secret_file} has no secret key")
        return cls(public, secret, server)

    @classmethod
    def from_env(cls) -> CurveKeys | None:
        """From LLMOS_CLIENT_KEY (client secret file) and LLMOS_SERVER_KEY (server public
        file), when both are set."""
        client, server = os.environ.get("LLMOS_CLIENT_KEY"), os.environ.get("LLMOS_SERVER_KEY")
        return cls.from_files(client, server) if client and server else None

    def apply(self, socket: zmq.Socket) -> None:
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.curve_serverkey = self.server


def _dealer(ctx: zmq.Context, address: str, curve: CurveKeys | None) -> zmq.Socket:
    """A DEALER connected (lazily, as ZeroMQ does) to ``address``; KernelError(BAD_REQUEST)
    if ZeroMQ cannot parse the address."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    if curve is not None:
        curve.apply(dealer)
    try:
        dealer.connect(address)
    except zmq.ZMQError as exc:
        dealer.close()
        raise KernelError(ErrorCode.BAD_REQUEST, f"cannot connect to {address!r} ({exc}): a "
                          "kernel address is ipc://PATH or tcp://HOST:PORT") from None
    return dealer


def _clean(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if v is not None}


def _client_name(name: str | None) -> str:
    """``name``, else the OS user's name: one owner per person for `ps --owner`, per-owner
    limits and the audit log, however many commands they run (a CURVE kernel names the
    owner by key instead)."""
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid
        return f"uid-{os.getuid()}"


class Pending:
    """A request in flight on a :class:`Client`."""

    def __init__(self, client: Client, msg_id: str, syscall: str) -> None:
        self.client, self.msg_id, self.syscall = client, msg_id, syscall
        self._job_id: int | None = None
        self._reply: Message | None = None
        #: Events received for this request before its reply (accepted, progress...).
        self.events: list[Message] = []

    def job_id(self, timeout: float | None = None) -> int:
        """The job id from the ``accepted`` event (submit with ``events=True``)."""
        if self._job_id is None:
            if self._reply is not None:
                raise KernelError(ErrorCode.BAD_REQUEST, "no accepted event was received "
                                  "(submit with events=True)")
            self._job_id = int(self.client._wait_event(self.msg_id, "accepted", timeout)["job"])
        return self._job_id

    def stream(self, timeout: float | None = None) -> Iterator[Message]:
        """Events as they arrive (``timeout``: the longest wait for each), until the reply
        is in; then :meth:`result` returns at once."""
        client, seen = self.client, 0

        def arrived() -> bool:
            return len(client._events.get(self.msg_id, [])) > seen or self.msg_id in client._replies

        while True:
            events = client._events.get(self.msg_id, [])
            while seen < len(events):
                seen += 1
                yield events[seen - 1]
            if self.msg_id in client._replies or self._reply is not None:
                return
            client._pump(arrived, timeout)

    def reply(self, timeout: float | None = None) -> Message:
        if self._reply is None:
            self._reply, self.events = self.client._wait_reply(self.msg_id, timeout)
            accepted = [e for e in self.events if e.event == "accepted"]
            if accepted and self._job_id is None:
                self._job_id = int(accepted[0].body["job"])
        return self._reply

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The unpacked result; raises KernelError for an error reply."""
        return unpack_result(self.reply(timeout))


class Client(_Syscalls):
    """A blocking client. Not thread-safe: use one per thread."""

    def __init__(self, address: str | None = None, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, curve: CurveKeys | None = None) -> None:
        self.address = address or default_address()
        self.name = _client_name(name)
        self.timeout = timeout
        keys = curve or CurveKeys.from_env()
        self._secure = keys is not None
        self._socket = _dealer(zmq.Context.instance(), self.address, keys)
        self._replies: dict[str, Message] = {}
        self._events: dict[str, list[Message]] = defaultdict(list)
        #: Whether a kernel has answered the handshake (:meth:`_handshake`).
        self._connected = False

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, syscall: str, args: dict[str, Any], *, events: bool = False) -> Pending:
        """Send a request without waiting; collect it with the returned :class:`Pending`.
        The first one is sent only once a kernel answers (:meth:`_handshake`)."""
        if not self._connected:
            self._handshake()
        msg_id = new_id()
        self._socket.send_multipart(
            encode_request(syscall, _clean(args), client=self.name, msg_id=msg_id, events=events))
        return Pending(self, msg_id, syscall)

    def _handshake(self) -> None:
        """Make sure a kernel answers before the first request, within
        :data:`CONNECT_TIMEOUT` (at most ``self.timeout``) in all: something listens at the
        address (:func:`check_listening`: no message sent), which on ipc is enough; on tcp,
        one ``ping`` answered too (any reply counts, even an error). :func:`no_kernel`
        otherwise. Tried again before the next request until a kernel has answered."""
        budget = min(CONNECT_TIMEOUT, self.timeout)
        deadline = time.monotonic() + budget
        check_listening(self.address, budget)
        if not self.address.startswith("ipc://"):
            msg_id = new_id()
            self._socket.send_multipart(encode_request("ping", {}, client=self.name, msg_id=msg_id))
            try:
                self._wait_reply(msg_id, deadline - time.monotonic())
            except KernelError as exc:
                if exc.code is not ErrorCode.TIMEOUT:
                    raise
                raise no_kernel(self.address, _silence(budget, self._secure)) from None
        self._connected = True

    def _call(self, syscall: str, args: dict[str, Any],
              shape: Callable[[dict[str, Any]], Any] = _identity,
              timeout: float | None = None) -> Any:
        return shape(self.submit(syscall, args).result(timeout))

    def _wait_reply(self, msg_id: str, timeout: float | None) -> tuple[Message, list[Message]]:
        """The reply to ``msg_id`` and the events that preceded it (both forgotten here)."""
        self._pump(lambda: msg_id in self._replies, timeout)
        return self._replies.pop(msg_id), self._events.pop(msg_id, [])

    def _wait_event(self, msg_id: str, name: str, timeout: float | None) -> dict[str, Any]:
        def seen() -> bool:
            return msg_id in self._replies or any(e.event == name for e in self._events[msg_id])

        self._pump(seen, timeout)
        for event in self._events[msg_id]:
            if event.event == name:
                return event.body
        unpack_result(self._replies[msg_id])  # the request ended first: raise its error
        raise KernelError(ErrorCode.INTERNAL, f"request {msg_id} ended without a {name} event")

    def _pump(self, done: Callable[[], bool], timeout: float | None) -> None:
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not done():
            remaining = deadline - time.monotonic()
            # zmq_poll, not Socket.poll (which builds a Poller per call): the hot path
            if remaining <= 0 or not zmq.zmq_poll([(self._socket, zmq.POLLIN)],
                                                  int(remaining * 1000) + 1):
                if done():
                    return
                raise KernelError(ErrorCode.TIMEOUT, f"no reply from the kernel at "
                                  f"{self.address} within {limit:g} s (is it running?)")
            self._receive(self._socket.recv_multipart(copy=True))

    def _receive(self, frames: list[bytes]) -> None:
        message = decode_reply(frames)
        if message.reply_to is None:
            return
        if message.kind == "event":
            self._events[message.reply_to].append(message)
        else:
            self._replies[message.reply_to] = message


class AsyncClient(_Syscalls):
    """An asyncio client: every syscall method is a coroutine; calls may run concurrently."""

    def __init__(self, address: str | None = None, *, name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, curve: CurveKeys | None = None) -> None:
        self.address = address or default_address()
        self.name = _client_name(name)
        self.timeout = timeout
        keys = curve or CurveKeys.from_env()
        self._secure = keys is not None
        self._socket = _dealer(zmq.asyncio.Context.instance(), self.address, keys)
        self._waiting: dict[str, asyncio.Future[Message]] = {}
        self._reader: asyncio.Task[None] | None = None
        #: Whether a kernel has answered the handshake (:meth:`_handshake`).
        self._connected = False

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._socket.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, syscall: str, args: dict[str, Any],  # type: ignore[override]
                    shape: Callable[[dict[str, Any]], Any] = _identity,
                    timeout: float | None = None) -> Any:
        if not self._connected:
            await self._handshake()
        reply = await self._exchange(syscall, args, self.timeout if timeout is None else timeout)
        return shape(unpack_result(reply))

    async def _handshake(self) -> None:
        """As :meth:`Client._handshake`: something listens at the address and, on tcp, a
        ``ping`` is answered, within :data:`CONNECT_TIMEOUT` (at most ``self.timeout``) in
        all; :func:`no_kernel` otherwise."""
        budget = min(CONNECT_TIMEOUT, self.timeout)
        deadline = time.monotonic() + budget
        # The connect may wait for a remote host: off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, check_listening, self.address, budget)
        if not self.address.startswith("ipc://"):
            try:
                await self._exchange("ping", {}, deadline - time.monotonic())
            except KernelError as exc:
                if exc.code is not ErrorCode.TIMEOUT:
                    raise
                raise no_kernel(self.address, _silence(budget, self._secure)) from None
        self._connected = True

    async def _exchange(self, syscall: str, args: dict[str, Any], limit: float) -> Message:
        """Send one request and return its reply (ok or error), waiting at most ``limit``
        seconds; KernelError(TIMEOUT) after that."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        msg_id = new_id()
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        await self._socket.send_multipart(
            encode_request(syscall, _clean(args), client=self.name, msg_id=msg_id))
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            raise KernelError(ErrorCode.TIMEOUT, f"no reply from the kernel at {self.address} "
                              f"within {limit:g} s (is it running?)") from None
        finally:
            self._waiting.pop(msg_id, None)

    async def _read(self) -> None:
        while True:
            message = decode_reply(await self._socket.recv_multipart())
            future = self._waiting.get(message.reply_to or "")
            if message.kind == "reply" and future is not None and not future.done():
                future.set_result(message)

