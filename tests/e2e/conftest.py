"""Fixtures of the end-to-end tests that talk HTTP: a gateway on the session's chat kernel."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest

from llmos.plugins.gateway.http import Gateway


@pytest.fixture(scope="module")
def gateway(chat_kernel) -> Iterator[Gateway]:
    """An OpenAI-compatible gateway on loopback (a free port) in front of ``chat_kernel``."""
    server = Gateway("127.0.0.1", 0, chat_kernel.address)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def api(gateway: Gateway) -> openai.OpenAI:
    """The official openai client, pointed at ``gateway``."""
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
