"""The ``serve`` shell command: run the gateway in the foreground."""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.shell import render
from llmos.shell.commands import Output, ShellContext

from .http import API_KEY_ENV, Gateway, access_log

DEFAULT_HTTP = "127.0.0.1:8000"
#: What to do when the address cannot be bound, by errno.
_BIND_ADVICE = {
    errno.EADDRINUSE: "is already in use (another llmos serve or another server listens "
                      "there): stop it, or pick a free port with --http {host}:PORT",
    errno.EACCES: "may not be bound by this user (ports below 1024 need privileges): pick "
                  "a port from 1024 with --http {host}:PORT",
    errno.EADDRNOTAVAIL: "is not an address of this machine: pick one of its addresses "
                         "(127.0.0.1 for this machine only) with --http HOST:{port}",
}


def parse_http(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8000"`` or ``"[::1]:8000"`` -> (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise KernelError(ErrorCode.BAD_REQUEST, f"serve: --http must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def cannot_listen(host: str, port: int, exc: OSError) -> KernelError:
    """The error for a gateway that cannot bind ``host:port``: the address, why, and what
    to do (no traceback)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    advice = _BIND_ADVICE.get(exc.errno or 0)
    why = (advice.format(host=f"[{host}]" if ":" in host else host, port=port) if advice
           else f"cannot be listened on: {exc.strerror or exc}")
    return KernelError(ErrorCode.BAD_REQUEST, f"serve: {shown} {why}")


@contextmanager
def printed_access_log(enabled: bool) -> Iterator[None]:
    """While serving, print the access log (one line a request) on stderr, timestamped;
    the logger's own configuration is left as it was afterwards."""
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    level, propagate = access_log.level, access_log.propagate
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False  # printed once, even where the root logger prints too
    try:
        yield
    finally:
        access_log.removeHandler(handler)
        access_log.setLevel(level)
        access_log.propagate = propagate


def serve(context: ShellContext, args: dict[str, Any]) -> Output:
    host, port = parse_http(args["http"] or DEFAULT_HTTP)
    api_key = args["api_key"] or os.environ.get(API_KEY_ENV) or None
    logged = not args.get("no_access_log")
    try:
        gateway = Gateway(host, port, context.client.address, api_key, access_log=logged)
    except OSError as exc:
        raise cannot_listen(host, port, exc) from None
    quiet = "" if logged else "; access log off"
    render.console.print(f"OpenAI-compatible API on {gateway.url}/v1 (kernel at "
                         f"{context.client.address}{quiet}); Ctrl-C stops it")
    try:
        with printed_access_log(logged):
            gateway.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        gateway.server_close()
    return Output(text="gateway stopped")
