"""generate through a real kernel and driver host with SmolLM2: streaming, continuous
batching, preemption with resume, cancellation, clients that disappear, bad requests."""

from __future__ import annotations

import pytest

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.testing import wait_for

QUESTIONS = ["My parcel has not arrived yet. What should I do?",
             "How do I reset my password?",
             "Can I get a refund for a damaged item?",
             "What are your opening hours on Sunday?"]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def greedy(client, question: str, max_tokens: int = 24, **options):
    return client.generate("smollm2", messages=chat(question), max_tokens=max_tokens,
                           temperature=0.0, **options)


def host_idle(client) -> bool:
    """No task in flight on any driver host: a generate task stays in flight until every
    one of its sequences has left the host's batch."""
    return all(device["inflight"] == 0 for device in client.devices())


def test_streamed_tokens_make_up_the_text(chat_kernel):
    with chat_kernel.client() as client:
        pending = client.submit("generate", {"model": "smollm2", "messages": chat(QUESTIONS[0]),
                                             "max_tokens": 20, "temperature": 0.0}, events=True)
        tokens = [e.body["text"] for e in pending.stream() if e.event == "token"]
        result = pending.result()
    assert len(tokens) >= 2
    assert "".join(tokens) == result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["usage"]["completion_tokens"] <= 20
    assert result["usage"]["prompt_tokens"] > 5


def test_concurrent_requests_equal_each_run_alone(chat_kernel):
    with chat_kernel.client() as client:
        alone = [greedy(client, q)["text"] for q in QUESTIONS]
        pendings = [client.submit("generate", {"model": "smollm2", "messages": chat(q),
                                               "max_tokens": 24, "temperature": 0.0})
                    for q in QUESTIONS]
        together = [p.result()["text"] for p in pendings]
    assert together == alone
    assert len(set(alone)) > 1


def test_seeded_sampling_is_reproducible(chat_kernel):
    with chat_kernel.client() as client:
        runs = [client.generate("smollm2", prompt="A short poem about the sea:", max_tokens=16,
                                temperature=0.9, top_p=0.9, seed=7)["text"] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_stop_strings_end_the_text(chat_kernel):
    with chat_kernel.client() as client:
        full = client.generate("smollm2", prompt="1, 2, 3, 4,", max_tokens=16,
                               temperature=0.0)["text"]
        assert " 6," in full
        stopped = client.generate("smollm2", prompt="1, 2, 3, 4,", max_tokens=16,
                                  temperature=0.0, stop=[" 6,"])
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full[:full.index(" 6,")]


@pytest.fixture(scope="module")
def one_slot(chat_kernel):
    """SmolLM2 again under another name, loaded with room for one sequence at a time."""
    with chat_kernel.client() as client:
        path = next(m["path"] for m in client.models() if m["model"] == "smollm2")
        client.import_model(path=path, name="smollm2-one")
        client.load("smollm2-one", max_seqs=1)
    return "smollm2-one"


def test_preempted_generation_resumes_with_identical_output(chat_kernel, one_slot):
    with chat_kernel.client() as client:
        args = {"model": one_slot, "messages": chat(QUESTIONS[1]), "max_tokens": 40,
                "temperature": 0.0, "ignore_eos": True}
        alone = client.generate(**args)
        low = client.submit("generate", {**args, "priority": 5}, events=True)
        stream = low.stream()
        for _ in range(3):  # it is running: three tokens are out
            assert next(e for e in stream if e.event == "token")
        urgent = client.generate(one_slot, messages=chat(QUESTIONS[2]), max_tokens=8,
                                 temperature=0.0, priority=-5)
        state_after_urgent = client.job(low.job_id())["state"]
        resumed = low.result()
    assert urgent["finish_reason"] in ("length", "stop")
    assert state_after_urgent in ("RUNNING", "PREEMPTED")  # not finished before the urgent one
    assert resumed["preemptions"] == 1 and alone["preemptions"] == 0
    assert resumed["text"] == alone["text"]
    cached = resumed["usage"].pop("cached_tokens")
    assert alone["usage"].pop("cached_tokens") == 0 and cached >= 16  # the same prompt again
    assert resumed["usage"] == alone["usage"]


def test_cancel_frees_the_slot(chat_kernel, one_slot):
    with chat_kernel.client() as client:
        long = client.submit("generate", {"model": one_slot, "prompt": "Tell me a long story.",
                                          "max_tokens": 2000, "ignore_eos": True}, events=True)
        next(e for e in long.stream() if e.event == "token")
        client.cancel(long.job_id())
        with pytest.raises(KernelError) as info:
            long.result()
        assert info.value.code is ErrorCode.CANCELLED
        wait_for(lambda: host_idle(client), "the host to drop the cancelled sequence")
        after = client.generate(one_slot, prompt="Hello", max_tokens=4, temperature=0.0)
    assert after["usage"]["completion_tokens"] == 4 and after["preemptions"] == 0


def test_a_client_that_disappears_mid_stream_frees_its_slot(chat_kernel, one_slot):
    with chat_kernel.client("watcher") as watcher:
        leaving = chat_kernel.client("leaving")
        pending = leaving.submit("generate", {"model": one_slot, "prompt": "Count to a thousand:",
                                              "max_tokens": 2000, "ignore_eos": True}, events=True)
        next(e for e in pending.stream() if e.event == "token")
        job_id = pending.job_id()
        leaving.close()
        job = wait_for(lambda: (j := watcher.job(job_id))["state"] != "RUNNING" and j,
                       "the job of the vanished client to end")
        assert job["state"] == "CANCELLED"
        assert "went away" in job["error"]
        wait_for(lambda: host_idle(watcher), "the host to drop the abandoned sequence")
        after = watcher.generate(one_slot, prompt="Hello", max_tokens=4, temperature=0.0)
        assert after["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("bad, code", [
    ({"prompt": "hi", "max_tokens": 0}, ErrorCode.BAD_REQUEST),
    ({"prompt": "hi", "max_tokens": 10**6}, ErrorCode.BAD_REQUEST),
    ({"prompt": "hi", "messages": chat("hi")}, ErrorCode.BAD_REQUEST),
    ({}, ErrorCode.BAD_REQUEST),
    ({"prompt": "   "}, ErrorCode.BAD_REQUEST),
    ({"messages": [{"role": "robot", "content": "hi"}]}, ErrorCode.BAD_REQUEST),
    ({"messages": [{"role": "user"}]}, ErrorCode.BAD_REQUEST),
    ({"messages": ["hi"]}, ErrorCode.BAD_REQUEST),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, ErrorCode.BAD_REQUEST),
    ({"prompt": "word " * 9000, "max_tokens": 10}, ErrorCode.BAD_REQUEST),
    ({"prompt": "hi", "stop": [""]}, ErrorCode.BAD_REQUEST),
    ({"prompt": "hi", "temperature": -1.0}, ErrorCode.BAD_REQUEST),
])
def test_bad_requests_get_clear_errors(chat_kernel, bad, code):
    with chat_kernel.client() as client:
        with pytest.raises(KernelError) as info:
            client._call("generate", {"model": "smollm2", **bad})
        assert info.value.code is code
        assert info.value.message
        assert client.ping()["pong"]


def test_models_that_cannot_generate_or_are_unknown(chat_kernel):
    with chat_kernel.client() as client:
        with pytest.raises(KernelError) as info:
            client.generate("minilm", prompt="hello")
        assert info.value.code is ErrorCode.BAD_REQUEST and "cannot generate" in info.value.message
        with pytest.raises(KernelError) as info:
            client.generate("no-such-model", prompt="hello")
        assert info.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(KernelError) as info:
            client.load("smollm2", driver="onnxruntime")
        assert info.value.code is ErrorCode.BAD_REQUEST


def test_renice_reaches_the_engine_and_preempts(chat_kernel, one_slot):
    with chat_kernel.client() as client:
        base = {"model": one_slot, "max_tokens": 400, "ignore_eos": True, "temperature": 0.0,
                "priority": 5}
        running = client.submit("generate", {**base, "prompt": "Tell me about trains."},
                                events=True)
        next(e for e in running.stream() if e.event == "token")
        waiting = client.submit("generate", {**base, "prompt": "Tell me about ships.",
                                             "max_tokens": 3}, events=True)
        waiting_id = waiting.job_id()
        wait_for(lambda: client.job(waiting_id)["state"] == "RUNNING",  # dispatched to the
                 "the second generation on the host", timeout=60)  # host, waiting for a slot
        client.renice(waiting_id, -5)
        assert waiting.result()["usage"]["completion_tokens"] == 3
        preempted = client.job(running.job_id())
        client.cancel(running.job_id())
        with pytest.raises(KernelError):
            running.result()
    assert preempted["progress"].get("preemptions") == 1  # renice made the waiting one urgent
    assert preempted["state"] in ("RUNNING", "PREEMPTED") and preempted["tokens"] < 400
