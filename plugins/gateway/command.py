"""The ``serve`` shell command: run the gateway in the foreground."""

from __future__ import annotations

import os
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.shell import render
from llmos.shell.commands import Output, ShellContext

from .http import API_KEY_ENV, Gateway

DEFAULT_HTTP = "127.0.0.1:8000"


def parse_http(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8000"`` or ``"[::1]:8000"`` -> (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise KernelError(ErrorCode.BAD_REQUEST, f"serve: --http must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def serve(context: ShellContext, args: dict[str, Any]) -> Output:
    host, port = parse_http(args["http"] or DEFAULT_HTTP)
    api_key = args["api_key"] or os.environ.get(API_KEY_ENV) or None
    try:
        gateway = Gateway(host, port, context.client.address, api_key)
    except OSError as exc:
        raise KernelError(ErrorCode.BAD_REQUEST, f"serve: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    render.console.print(f"OpenAI-compatible API on {gateway.url}/v1 (kernel at "
                         f"{context.client.address}); Ctrl-C stops it")
    try:
        gateway.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        gateway.server_close()
    return Output(text="gateway stopped")
