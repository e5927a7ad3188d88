"""The OpenAI-compatible HTTP gateway: a client of the kernel, not a second engine.

A threaded HTTP/1.1 server (the standard library's): each request borrows a blocking
:class:`~llmos.Client` from a pool (one request at a time per client), so
requests run concurrently and the kernel batches them like any other clients'. Routes:

* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``,
  ``GET /v1/models/{id}``;
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
  events), ``POST /v1/embeddings`` (text or token ids, up to
  :data:`~llmos.plugins.gateway.openai_api.MAX_EMBEDDING_INPUTS` inputs: split into kernel
  jobs of at most :data:`~llmos.contract.syscalls.MAX_INPUTS_PER_JOB`, submitted together
  and answered in input order).

Each request is logged when it ends on the ``llmos.gateway.access`` logger at INFO (client,
method, path, status, duration; see :func:`access_line`) unless the gateway was made with
``access_log=False``.

Errors use OpenAI's error JSON with the HTTP status of the kernel's error code. A body
that breaks the gateway's own limits (see :func:`~llmos.plugins.gateway.openai_api.parse_body`:
nesting, lone surrogates, integers beyond int64, non-finite numbers, a bad model version)
is a 400 naming the field before anything reaches the kernel. A streamed request's headers
are sent only once its first token (or its error) is in, so an error still gets its proper
status. While a request waits on the kernel, streamed or not, its thread checks every
:data:`PEER_CHECK_SECONDS` that the HTTP client is still connected: one that hung up (or
whose stream can no longer be written) has its job cancelled, freeing its place in the
running batch, and is counted with status 499. Bound beyond loopback, the gateway requires
an API key (``Authorization: Bearer KEY``).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import queue
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import numpy as np

from llmos import Client, Pending, unpack_result
from llmos.addresses import is_loopback_host
from llmos.contract.protocol import ErrorCode, KernelError, Message
from llmos.contract.syscalls import MAX_INPUTS_PER_JOB

from . import openai_api as api
from . import token_ids
from .metrics import Metrics

log = logging.getLogger("llmos.gateway")
#: One INFO line per request (see :func:`access_line`); ``llmos serve`` prints it.
access_log = logging.getLogger("llmos.gateway.access")

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES = 4 * 2**20
API_KEY_ENV = "LLMOS_API_KEY"


#: Idle kernel clients kept for reuse; more are made under load and closed afterwards.
IDLE_CLIENTS = 32
#: How often a request waiting on the kernel checks that its HTTP client is still there.
PEER_CHECK_SECONDS = 0.1
#: How long cancelling a gone client's job waits for each of the kernel's answers.
CANCEL_WAIT_SECONDS = 5.0
#: poll() events that mean the peer closed or broke the connection (POLLRDHUP: Linux).
_HUNG_UP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
#: HTTP status counted for a request whose client went away before its answer (nginx's).
CLIENT_CLOSED = 499
#: GET /v1/models/{id}: every id is counted (metrics) as that one route.
_MODEL_PREFIX = "/v1/models/"


def access_line(client: str, method: str, path: str, status: int, seconds: float) -> str:
    """An access-log line: ``127.0.0.1 "POST /v1/embeddings" 200 41.3 ms``."""
    return f'{client} "{method} {path}" {status} {seconds * 1000:.1f} ms'


class ClientGone(Exception):
    """The HTTP client closed its connection while its request was in the kernel (whose
    job has been cancelled)."""


class Gateway(ThreadingHTTPServer):
    """The server: where the kernel is, the API key, metrics, a pool of kernel clients."""

    daemon_threads = True
    #: The listen backlog (socketserver's default is 5: a burst of chat clients connecting at
    #: once would be refused or reset).
    request_queue_size = 1024

    def __init__(self, host: str, port: int, kernel_address: str, api_key: str | None = None,
                 *, access_log: bool = True) -> None:
        """Bind and listen on ``host:port`` (OSError if it cannot: the caller words it)."""
        if not is_loopback_host(host) and not api_key:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"refusing to serve HTTP on {host} without an API key: pass "
                              f"--api-key or set {API_KEY_ENV} (clients send it as a bearer token)")
        self.kernel_address = kernel_address
        self.api_key = api_key
        self.access_log = access_log
        self.metrics = Metrics()
        # Before binding: a bind that fails calls server_close(), which empties the pool.
        self._idle: queue.LifoQueue[Client] = queue.LifoQueue()
        self._names = itertools.count(1)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A kernel client for one request (a client is not thread-safe: no two requests
        share one at a time). It goes back to the pool after a success or an error the
        kernel answered; after anything else (a TIMEOUT, a client gone) a reply may still
        be on its way to it, so it is closed instead."""
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = Client(self.kernel_address, name=f"gateway-{os.getpid()}-{next(self._names)}")
        clean = False
        try:
            yield client
            clean = True
        except api.ApiError:
            clean = True
            raise
        except KernelError as exc:
            clean = exc.code is not ErrorCode.TIMEOUT
            raise
        finally:
            if clean and self._idle.qsize() < IDLE_CLIENTS:
                self._idle.put(client)
            else:
                client.close()

    def server_close(self) -> None:
        super().server_close()
        while not self._idle.empty():
            self._idle.get_nowait().close()


class _Handler(BaseHTTPRequestHandler):
    server: Gateway
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("%s " + format, self.address_string(), *args)

    # --- dispatch -----------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch({"/health": self._health, "/metrics": self._metrics,
                        "/v1/models": self._models, _MODEL_PREFIX + "{id}": self._model})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/v1/completions": self._completions,
                        "/v1/chat/completions": self._chat,
                        "/v1/embeddings": self._embeddings})

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        name = path
        if path.startswith(_MODEL_PREFIX):  # GET /v1/models/{id}, counted as one route
            name, self.path_id = _MODEL_PREFIX + "{id}", unquote(path[len(_MODEL_PREFIX):])
        self.body_read = self.command != "POST"
        self.streaming = False
        started = time.monotonic()
        status = 500
        try:
            route = routes.get(name)
            if route is None:
                raise api.ApiError(404, f"no route {self.command} {path}", "not_found_error")
            if path.startswith("/v1/"):
                self._authorize()
            status = route()
        except api.ApiError as exc:
            status = self._fail(exc)
        except KernelError as exc:
            status = self._fail(api.wrong_task(exc) or api.ApiError.from_kernel(exc))
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            status = CLIENT_CLOSED
            self.close_connection = True
        except Exception as exc:
            log.exception("gateway error on %s", path)
            status = self._fail(api.ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))
        finally:
            seconds = time.monotonic() - started
            self.server.metrics.request(name if name in routes else "other", status, seconds)
            if self.server.access_log:
                access_log.info("%s", access_line(self.address_string(), self.command, path,
                                                  status, seconds))

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise api.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                               "authentication_error", "invalid_api_key")

    def _body(self) -> dict[str, Any]:
        """The JSON object sent, checked by :func:`api.parse_body` (ApiError otherwise)."""
        self.body_read = True
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            raise api.ApiError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise api.ApiError(413, f"the body has {length} bytes (limit {MAX_BODY_BYTES})")
        return api.parse_body(self.rfile.read(int(length)))

    # --- responses ----------------------------------------------------------------------

    def _fail(self, error: api.ApiError) -> int:
        """Answer with ``error``; once an event stream has begun its headers are out, so
        the connection is closed instead (the stream reported what it could)."""
        if self.streaming:
            self.close_connection = True
            return error.status
        return self._json(error.status, error.body())

    def _json(self, status: int, payload: dict[str, Any]) -> int:
        if not self.body_read or status in (411, 413):
            self.close_connection = True  # an unread body would be taken for the next request
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return status

    def _start_events(self) -> None:
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _event(self, payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        data = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # --- routes -------------------------------------------------------------------------

    def _health(self) -> int:
        try:
            with self.server.client() as client:
                client.ping(timeout=2.0)
        except KernelError as exc:
            return self._json(503, {"status": "unavailable", "reason": exc.message})
        return self._json(200, {"status": "ok"})

    def _metrics(self) -> int:
        try:
            with self.server.client() as client:
                stats = client.stats()
        except KernelError:
            stats = None
        data = self.server.metrics.render(stats).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return 200

    def _models(self) -> int:
        with self.server.client() as client:
            return self._json(200, api.model_list(client.models()))

    def _model(self) -> int:
        with self.server.client() as client:
            return self._json(200, api.model_object(client.models(), self.path_id))

    def _embeddings(self) -> int:
        body = self._body()
        request = api.embedding_request(body)
        texts = request.texts if request.texts is not None else token_ids.decode(
            request.token_ids or [])
        api.check_texts(texts)  # here, where an input's index is the request's
        base = {"model": request.name, "version": request.version, "task": "embed"}
        with self.server.client() as client:
            pending = [client.submit("infer", {**base, "inputs": texts[chunk.start:chunk.stop]},
                                     events=True)
                       for chunk in api.embedding_chunks(len(texts), MAX_INPUTS_PER_JOB)]
            results = self._results(pending, client.timeout)
        vectors = np.concatenate([np.asarray(r["embeddings"], dtype=np.float32) for r in results])
        tokens = sum(int(r.get("tokens", 0)) for r in results)
        return self._json(200, api.embeddings(vectors, tokens, body["model"], request.encoding))

    def _completions(self) -> int:
        body = self._body()
        return self._generate(body, api.completion_args(body), chat=False)

    def _chat(self) -> int:
        body = self._body()
        return self._generate(body, api.chat_args(body), chat=True)

    def _generate(self, body: dict[str, Any], args: dict[str, Any], chat: bool) -> int:
        stream, include_usage = api.stream_options(body)
        model = body["model"]
        with self.server.client() as client:
            pending = client.submit("generate", args, events=True)
            if not stream:
                result = self._result(pending, client.timeout)
                self.server.metrics.generated(result)
                shape = api.chat_completion if chat else api.completion
                return self._json(200, shape(result, model))
            try:
                self._stream(pending, model, chat, include_usage, client.timeout)
            except (BrokenPipeError, ConnectionResetError):
                self._cancel(pending)
                raise
            return 200

    def _stream(self, pending: Pending, model: str, chat: bool, include_usage: bool,
                quiet_limit: float) -> None:
        """Relay token events as chunks; headers go out with the first token, so an error
        before it is still a plain JSON error with its status."""
        job = 0
        for event in self._events(pending, quiet_limit):
            if event.event == "accepted":
                job = int(event.body["job"])
                continue
            if event.event != "token":
                continue
            if not self.streaming:
                self._start_events()
                if chat:
                    self._event(api.chunk(job, model, chat, "", role=True))
            self._event(api.chunk(job, model, chat, str(event.body["text"])))
        try:
            result = unpack_result(pending.reply())
        except KernelError as exc:
            if not self.streaming:
                raise
            self._event(api.ApiError.from_kernel(exc).body())
            self._end_events()
            return
        self.server.metrics.generated(result)
        if not self.streaming:
            self._start_events()
            if chat:
                self._event(api.chunk(job, model, chat, "", role=True))
        self._event(api.chunk(job, model, chat, None if chat else "",
                              finish_reason=result["finish_reason"]))
        if include_usage:
            self._event(api.usage_chunk(result, model, chat))
        self._event("[DONE]")
        self._end_events()

    # --- waiting on the kernel ------------------------------------------------------------

    def _results(self, pending: list[Pending], quiet_limit: float) -> list[dict[str, Any]]:
        """Every request's result, in order (they run together in the kernel). When one
        fails, the others are cancelled and their replies collected before the error is
        raised, so none is left to reach the pooled kernel client later."""
        results: list[dict[str, Any]] = []
        try:
            for request in pending:
                results.append(self._result(request, quiet_limit))
        except BaseException:
            for request in pending[len(results) + 1:]:
                self._cancel(request)
                try:
                    request.reply(CANCEL_WAIT_SECONDS)
                except KernelError:
                    pass  # best effort: a reply that comes later is kept under its own id
            raise
        return results

    def _result(self, pending: Pending, quiet_limit: float) -> dict[str, Any]:
        """``pending``'s unpacked result, awaited as :meth:`_events` does (KernelError for
        an error reply)."""
        for _ in self._events(pending, quiet_limit):
            pass
        return unpack_result(pending.reply())

    def _events(self, pending: Pending, quiet_limit: float) -> Iterator[Message]:
        """``pending``'s events as they arrive, until its reply is in (then
        ``pending.reply()`` returns at once). Every PEER_CHECK_SECONDS it checks the HTTP
        client: one that hung up gets its job cancelled and ClientGone raised. After
        ``quiet_limit`` seconds without a word from the kernel the job is cancelled and
        KernelError(TIMEOUT) raised."""
        seen = 0
        heard = checked = time.monotonic()
        while True:
            events = pending.stream(timeout=PEER_CHECK_SECONDS)
            try:
                for index, event in enumerate(events):
                    if index < seen:
                        continue  # a fresh stream starts from the first event again
                    seen += 1
                    heard = time.monotonic()
                    yield event
                    if heard - checked >= PEER_CHECK_SECONDS:
                        break
                else:
                    return
            except KernelError as exc:
                if exc.code is not ErrorCode.TIMEOUT:
                    raise
            finally:
                events.close()
            checked = time.monotonic()
            if self._peer_gone():
                self._cancel(pending)
                raise ClientGone
            if checked - heard > quiet_limit:
                self._cancel(pending)
                raise KernelError(ErrorCode.TIMEOUT, f"the kernel at {pending.client.address} "
                                  f"sent nothing for {quiet_limit:g} s; the job was cancelled")

    def _peer_gone(self) -> bool:
        """True once the HTTP client has closed (or reset) its connection; checked without
        blocking. Bytes it sent ahead (a pipelined request) do not count as a hang-up."""
        poller = select.poll()
        poller.register(self.connection, select.POLLIN | _HUNG_UP)
        ready = poller.poll(0)
        if not ready:
            return False
        if ready[0][1] & _HUNG_UP:
            return True
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _cancel(self, pending: Pending) -> None:
        """Cancel ``pending``'s job (its HTTP client went away, or the kernel went quiet)
        so its batch slot frees at once. Best effort, each answer awaited at most
        CANCEL_WAIT_SECONDS; the caller raises next, so the kernel client is closed rather
        than pooled and the job's late reply cannot reach another request."""
        try:
            job = pending.job_id(timeout=CANCEL_WAIT_SECONDS)
            pending.client.submit("cancel", {"id": job}).result(CANCEL_WAIT_SECONDS)
        except KernelError:
            pass  # never admitted, ended first, or the kernel does not answer
