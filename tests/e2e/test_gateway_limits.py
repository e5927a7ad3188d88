"""The gateway's own input limits, and requests whose HTTP client goes away: a real gateway
in front of the real kernel with SmolLM2 and MiniLM, driven by the official ``openai``
client where it can send the case and by raw HTTP where it cannot."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from llmos.kernel.testing import wait_for
from llmos.plugins.gateway.http import Gateway

QUESTION = [{"role": "user", "content": "My order arrived damaged. What should I do?"}]
#: A JSON text nested 100,000 levels deep.
DEEP = "[" * 100_000 + "]" * 100_000


def post_raw(gateway: Gateway, route: str, body: str) -> tuple[int, dict[str, Any]]:
    """POST a JSON text as written (escapes such as ``\\ud800`` reach the server as is)."""
    connection = http.client.HTTPConnection(*gateway.server_address[:2], timeout=120)
    try:
        connection.request("POST", route, body=body.encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        connection.close()


def via_openai(call: Callable[[openai.OpenAI], Any]) -> Callable[[Gateway, openai.OpenAI], Any]:
    """A case sent with the official client: its status and OpenAI error object."""
    def send(gateway: Gateway, api: openai.OpenAI) -> tuple[int, dict[str, Any]]:
        with pytest.raises(openai.APIStatusError) as info:
            call(api)  # a streamed request's error status comes before any chunk
        return info.value.status_code, info.value.body
    return send


def via_raw(route: str, body: str) -> Callable[[Gateway, openai.OpenAI], Any]:
    """A case the official client cannot send (it refuses lone surrogates, NaN, deep JSON)."""
    return lambda gateway, api: post_raw(gateway, route, body)


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Gateway, openai.OpenAI], tuple[int, dict[str, Any]]]
    field: str  # named in the message
    param: str  # the top-level field


CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
CASES = [
    Case("lone surrogate in a chat message", via_raw(
        CHAT, '{"model": "smollm2", "max_tokens": 4, '
              '"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'),
         "messages[0].content", "messages"),
    Case("lone surrogate in a prompt", via_raw(
        COMPLETIONS, '{"model": "smollm2", "prompt": "\\udc00", "max_tokens": 4}'),
         "prompt", "prompt"),
    Case("lone surrogate in an embedding input", via_raw(
        EMBEDDINGS, '{"model": "minilm", "input": ["fine", "\\ud800"]}'),
         "input[1]", "input"),
    Case("lone surrogate in a key", via_raw(
        CHAT, '{"model": "smollm2", "messages": [{"role": "user", "content": "hi", '
              '"\\ud800": 1}]}'),
         "messages[0].", "messages"),
    Case("model version beyond int64 (chat)", via_openai(
        lambda api: api.chat.completions.create(model="minilm:18446744073709551615",
                                                messages=QUESTION, max_tokens=4)),
         "model", "model"),
    Case("model version beyond int64 (embeddings)", via_openai(
        lambda api: api.embeddings.create(model="minilm:18446744073709551615", input="x")),
         "model", "model"),
    Case("max_tokens 10**30", via_openai(
        lambda api: api.chat.completions.create(model="smollm2", messages=QUESTION,
                                                max_tokens=10**30)),
         "max_tokens", "max_tokens"),
    Case("max_tokens 10**30, streamed", via_openai(
        lambda api: api.completions.create(model="smollm2", prompt="Hello", max_tokens=10**30,
                                           stream=True)),
         "max_tokens", "max_tokens"),
    Case("seed beyond int64", via_openai(
        lambda api: api.chat.completions.create(model="smollm2", messages=QUESTION,
                                                max_tokens=4, seed=2**64)),
         "seed", "seed"),
    Case("100k-deep JSON in messages", via_raw(
        CHAT, '{"model": "smollm2", "messages": ' + DEEP + "}"), "messages", "messages"),
    Case("100k-deep JSON in an extra field", via_raw(
        CHAT, '{"model": "smollm2", "messages": [], "metadata": ' + DEEP + "}"),
         "metadata", "metadata"),
    Case("NaN temperature", via_raw(
        CHAT, '{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], '
              '"temperature": NaN}'),
         "temperature", "temperature"),
    Case("stream_options not an object", via_openai(
        lambda api: api.chat.completions.create(model="smollm2", messages=QUESTION, stream=True,
                                                stream_options="yes")),  # type: ignore[arg-type]
         "stream_options", "stream_options"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_out_of_range_input_is_a_400_naming_the_field(case, gateway, api, chat_kernel):
    with chat_kernel.client() as kernel:
        received = kernel.stats()["received"]
        status, error = case.send(gateway, api)
        assert kernel.stats()["received"] == received + 1  # only this stats call: nothing
        # of the bad request reached the kernel
        assert status == 400, error
        assert error["type"] == "invalid_request_error"
        assert f"'{case.field}" in error["message"] and error["param"] == case.param
        # Both still answer.
        assert kernel.ping()["pong"]
    answer = api.completions.create(model="smollm2", prompt="Hello", max_tokens=2)
    assert answer.usage.completion_tokens == 2


def test_a_kernel_bad_request_is_a_400_with_its_param(api):
    with pytest.raises(openai.BadRequestError) as info:  # in range for the gateway, not the kernel
        api.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=10**6)
    assert "max_tokens" in info.value.body["message"]
    assert info.value.body["param"] == "max_tokens" and info.value.body["code"] == "bad_request"


def generate_jobs(kernel, after: int) -> list[dict[str, Any]]:
    return [j for j in kernel.jobs() if j["syscall"] == "generate" and j["id"] > after]


@pytest.mark.timeout(300)
def test_a_non_streamed_completion_whose_client_disconnects_is_cancelled(gateway, chat_kernel):
    max_tokens = 2000
    body = json.dumps({"model": "smollm2", "messages": QUESTION, "max_tokens": max_tokens,
                       "ignore_eos": True}).encode()
    with chat_kernel.client() as kernel:
        before = max((j["id"] for j in kernel.jobs()), default=0)
        connection = socket.create_connection(gateway.server_address[:2])
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
                           b"Content-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        job = wait_for(lambda: [j for j in generate_jobs(kernel, before)
                                if j["state"] == "RUNNING" and j["tokens"] > 0],
                       "the generation to stream tokens")[0]
        connection.close()  # the HTTP client goes away, its answer not yet written
        ended = wait_for(lambda: [j for j in generate_jobs(kernel, before)
                                  if j["id"] == job["id"] and j["finished_at"]],
                         "the job of the vanished HTTP client to end")[0]
        assert ended["state"] == "CANCELLED", ended
        assert ended["tokens"] < max_tokens
        wait_for(lambda: all(d["inflight"] == 0 for d in kernel.devices()), "idle hosts", 60)
    metrics = urllib.request.urlopen(f"{gateway.url}/metrics").read().decode()
    assert 'llmos_gateway_requests_total{route="/v1/chat/completions",status="499"} 1' in metrics
