"""The OpenAI-compatible gateway, driven by the official ``openai`` client over real HTTP,
in front of a real kernel with SmolLM2 and MiniLM loaded."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.plugins.gateway.http import Gateway

QUESTION = [{"role": "user", "content": "My order arrived damaged. What should I do?"}]


def start(gateway: Gateway) -> Gateway:
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    return gateway


def test_models_lists_loaded_versions(api):
    ids = {model.id for model in api.models.list()}
    assert {"smollm2", "smollm2:1", "minilm", "minilm:1"} <= ids


def test_completion(api, chat_kernel):
    result = api.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8,
                                    temperature=0)
    with chat_kernel.client() as client:
        direct = client.generate("smollm2", prompt="Once upon a time", max_tokens=8,
                                 temperature=0.0)
    assert result.choices[0].text == direct["text"] != ""
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.id.startswith("cmpl-")


def test_chat_completion_and_its_stream_agree(api):
    whole = api.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24,
                                        temperature=0)
    stream = api.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24,
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content != ""
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3


def test_streamed_completion_agrees_with_the_whole_one(api):
    request = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6,
               "temperature": 0}
    whole = api.completions.create(**request)
    chunks = list(api.completions.create(**request, stream=True))
    assert sum(1 for c in chunks if c.choices[0].text) >= 2
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text != ""
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_embeddings_match_the_kernel(api, chat_kernel):
    texts = ["The parcel is late.", "My delivery has not arrived."]
    result = api.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    floats = api.embeddings.create(model="minilm", input=texts, encoding_format="float")
    with chat_kernel.client() as client:
        direct = client.embed("minilm", texts)
    for encoded in (result, floats):
        vectors = np.array([d.embedding for d in encoded.data])
        assert vectors.shape == (2, 384)
        assert np.abs(vectors - direct).max() < 1e-6
    assert result.usage.prompt_tokens > 0


@pytest.mark.parametrize("change, error, status", [
    ({"model": "no-such-model"}, openai.NotFoundError, 404),
    ({"max_tokens": 0}, openai.BadRequestError, 400),
    ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, 400),
    ({"messages": "hello"}, openai.BadRequestError, 400),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, openai.BadRequestError, 400),
    ({"n": 2}, openai.BadRequestError, 400),
    ({"model": "minilm"}, openai.BadRequestError, 400),
])
def test_errors_have_openai_shape_and_status(api, change, error, status):
    request = {"model": "smollm2", "messages": QUESTION, "max_tokens": 4, **change}
    with pytest.raises(error) as info:
        api.chat.completions.create(**request)
    assert info.value.status_code == status
    assert info.value.body["message"] and info.value.body["type"]


def test_a_streamed_error_before_the_first_token_keeps_its_status(api):
    with pytest.raises(openai.BadRequestError):
        list(api.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=0,
                                         stream=True))


def test_http_level_errors(gateway):
    connection = http.client.HTTPConnection(*gateway.server_address[:2])
    connection.request("POST", "/v1/chat/completions", body=b"{not json",
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 400 and "JSON" in json.loads(response.read())["error"]["message"]
    connection.request("GET", "/v1/nowhere")
    response = connection.getresponse()
    assert response.status == 404 and json.loads(response.read())["error"]["type"]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(gateway, chat_kernel):
    connection = http.client.HTTPConnection(*gateway.server_address[:2])
    body = json.dumps({"model": "smollm2", "prompt": "Count from one to a million:",
                       "max_tokens": 3000, "ignore_eos": True, "stream": True})
    connection.request("POST", "/v1/completions", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.fp.readline()  # the first chunk is in: it is generating
    connection.sock.close()
    connection.close()
    with chat_kernel.client() as client:
        def settled() -> bool:
            last = [j for j in client.jobs() if j["syscall"] == "generate"][-1]
            idle = all(d["inflight"] == 0 for d in client.devices())
            return last["state"] != "RUNNING" and idle

        deadline = time.monotonic() + 120
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.1)
        last = [j for j in client.jobs() if j["syscall"] == "generate"][-1]
        assert last["state"] == "CANCELLED"
        assert all(d["inflight"] == 0 for d in client.devices())


def test_health_and_metrics(gateway, api):
    api.completions.create(model="smollm2", prompt="Hi", max_tokens=2)
    health = json.loads(urllib.request.urlopen(f"{gateway.url}/health").read())
    assert health["status"] == "ok"
    text = urllib.request.urlopen(f"{gateway.url}/metrics").read().decode()
    assert 'llmos_gateway_requests_total{route="/v1/completions",status="200"}' in text
    assert "llmos_kernel_up 1" in text
    generated = next(line for line in text.splitlines()
                     if line.startswith("llmos_gateway_completion_tokens_total"))
    assert int(float(generated.split()[-1])) >= 2


def test_an_api_key_is_required_beyond_loopback_and_checked(chat_kernel):
    with pytest.raises(KernelError) as info:
        Gateway("0.0.0.0", 0, chat_kernel.address)
    assert info.value.code is ErrorCode.BAD_REQUEST and "API key" in info.value.message
    guarded = start(Gateway("127.0.0.1", 0, chat_kernel.address, api_key="s3cret"))
    try:
        base = f"{guarded.url}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        models = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0).models.list()
        assert any(m.id == "smollm2" for m in models)
    finally:
        guarded.shutdown()
        guarded.server_close()


def llmos_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmos.shell", *args]


def test_llmos_chat_streams_the_answer(chat_kernel):
    question = "How do I reset my password?"
    result = subprocess.run(
        llmos_command("--address", chat_kernel.address, "chat", "smollm2", question,
                      "--max-tokens", "12", "--temperature", "0"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with chat_kernel.client() as client:
        direct = client.generate("smollm2", messages=[{"role": "user", "content": question}],
                                 max_tokens=12, temperature=0.0)
    assert result.stdout.strip() == direct["text"].strip() != ""


def test_llmos_serve_runs_until_interrupted(chat_kernel):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        llmos_command("--address", chat_kernel.address, "serve", "--http", f"127.0.0.1:{port}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "OpenAI-compatible API on" in server.stdout.readline()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
        assert health["status"] == "ok"
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    refused = subprocess.run(llmos_command("--address", chat_kernel.address, "serve", "--http",
                                           "0.0.0.0:0"), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "API key" in refused.stderr
