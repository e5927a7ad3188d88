"""The OpenAI-compatible HTTP gateway: a client of the kernel, not a second engine.

A threaded HTTP/1.1 server (the standard library's): each request borrows a blocking
:class:`~llmos.kernel.client.Client` from a pool (one request at a time per client), so
requests run concurrently and the kernel batches them like any other clients'. Routes:

* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /v1/models``;
* ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``: server-sent
  events), ``POST /v1/embeddings``.

Errors use OpenAI's error JSON with the HTTP status of the kernel's error code. A streamed
request's headers are sent only once its first token (or its error) is in, so an error
still gets its proper status. A client that disconnects mid-stream has its job cancelled,
freeing its place in the running batch. Bound beyond loopback, the gateway requires an API
key (``Authorization: Bearer KEY``).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import os
import queue
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmos.kernel.client import Client, Pending, unpack_result
from llmos.kernel.config import is_loopback_host
from llmos.kernel.protocol import ErrorCode, KernelError

from . import openai_api as api
from .metrics import Metrics

log = logging.getLogger("llmos.gateway")

#: Largest request body accepted, in bytes.
MAX_BODY_BYTES = 4 * 2**20
API_KEY_ENV = "LLMOS_API_KEY"


#: Idle kernel clients kept for reuse; more are made under load and closed afterwards.
IDLE_CLIENTS = 32


class Gateway(ThreadingHTTPServer):
    """The server: where the kernel is, the API key, metrics, a pool of kernel clients."""

    daemon_threads = True

    def __init__(self, host: str, port: int, kernel_address: str, api_key: str | None = None) -> None:
        if not is_loopback_host(host) and not api_key:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"refusing to serve HTTP on {host} without an API key: pass "
                              f"--api-key or set {API_KEY_ENV} (clients send it as a bearer token)")
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.kernel_address = kernel_address
        self.api_key = api_key
        self.metrics = Metrics()
        self._idle: queue.LifoQueue[Client] = queue.LifoQueue()
        self._names = itertools.count(1)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A kernel client for one request, returned to the pool afterwards (a client is
        not thread-safe: no two requests share one at a time)."""
        try:
            client = self._idle.get_nowait()
        except queue.Empty:
            client = Client(self.kernel_address, name=f"gateway-{os.getpid()}-{next(self._names)}")
        try:
            yield client
        finally:
            if self._idle.qsize() < IDLE_CLIENTS:
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
                        "/v1/models": self._models})

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch({"/v1/completions": self._completions,
                        "/v1/chat/completions": self._chat,
                        "/v1/embeddings": self._embeddings})

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self.body_read = self.command != "POST"
        started = time.monotonic()
        status = 500
        try:
            route = routes.get(path)
            if route is None:
                raise api.ApiError(404, f"no route {self.command} {path}", "not_found_error")
            if path.startswith("/v1/"):
                self._authorize()
            status = route()
        except api.ApiError as exc:
            status = exc.status
            self._json(exc.status, exc.body())
        except KernelError as exc:
            error = api.ApiError.from_kernel(exc)
            status = error.status
            self._json(error.status, error.body())
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away
        except Exception as exc:
            log.exception("gateway error on %s", path)
            self._json(500, api.ApiError(500, f"{type(exc).__name__}: {exc}", "server_error").body())
        finally:
            self.server.metrics.request(path if path in routes else "other", status,
                                        time.monotonic() - started)

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise api.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                               "authentication_error", "invalid_api_key")

    def _body(self) -> dict[str, Any]:
        self.body_read = True
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise api.ApiError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise api.ApiError(413, f"the body has {length} bytes (limit {MAX_BODY_BYTES})")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise api.ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise api.ApiError(400, "the body must be a JSON object")
        return body

    # --- responses ----------------------------------------------------------------------

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

    def _embeddings(self) -> int:
        body = self._body()
        args, encoding = api.embedding_args(body)
        with self.server.client() as client:
            result = client.infer(**args)
        return self._json(200, api.embeddings(result, body["model"], encoding))

    def _completions(self) -> int:
        body = self._body()
        return self._generate(body, api.completion_args(body), chat=False)

    def _chat(self) -> int:
        body = self._body()
        return self._generate(body, api.chat_args(body), chat=True)

    def _generate(self, body: dict[str, Any], args: dict[str, Any], chat: bool) -> int:
        with self.server.client() as client:
            return self._generate_with(client, body, args, chat)

    def _generate_with(self, client: Client, body: dict[str, Any], args: dict[str, Any],
                       chat: bool) -> int:
        model = body["model"]
        if not body.get("stream"):
            result = client.generate(**args)
            self.server.metrics.generated(result)
            shape = api.chat_completion if chat else api.completion
            return self._json(200, shape(result, model))
        pending = client.submit("generate", args, events=True)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            self._stream(pending, model, chat, include_usage)
        except (BrokenPipeError, ConnectionResetError):
            self._cancel(pending)
            raise
        return 200

    def _stream(self, pending: Pending, model: str, chat: bool, include_usage: bool) -> None:
        """Relay token events as chunks; headers go out with the first token, so an error
        before it is still a plain JSON error with its status."""
        started = False
        job = 0
        for event in pending.stream():
            if event.event == "accepted":
                job = int(event.body["job"])
                continue
            if event.event != "token":
                continue
            if not started:
                self._start_events()
                started = True
                if chat:
                    self._event(api.chunk(job, model, chat, "", role=True))
            self._event(api.chunk(job, model, chat, str(event.body["text"])))
        try:
            result = unpack_result(pending.reply())
        except KernelError as exc:
            if not started:
                raise
            self._event(api.ApiError.from_kernel(exc).body())
            self._end_events()
            return
        self.server.metrics.generated(result)
        if not started:
            self._start_events()
            if chat:
                self._event(api.chunk(job, model, chat, "", role=True))
        self._event(api.chunk(job, model, chat, None if chat else "",
                              finish_reason=result["finish_reason"]))
        if include_usage:
            self._event(api.usage_chunk(result, model, chat))
        self._event("[DONE]")
        self._end_events()

    def _cancel(self, pending: Pending) -> None:
        """The HTTP client went away: cancel its job so its batch slot frees at once."""
        try:
            pending.client.cancel(pending.job_id(timeout=5.0))
            pending.reply(timeout=5.0)  # collect the CANCELLED reply: nothing left behind
        except KernelError:
            pass  # it ended already

