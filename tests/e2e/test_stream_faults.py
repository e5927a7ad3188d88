"""Fault containment for streams (issue 17): one client's act never ends another's stream.

* 16 streamed chats through the gateway with the official openai client, half of them
  closed at random points (a chat UI's Stop button), for 5 rounds: the generation host never
  restarts and every stream left open finishes with ``length`` or ``stop``;
* kill -9 (or SIGSTOP past the stall timeout) of the generation host during 8 greedy
  streams: every stream completes, and the text it received equals the same request run
  alone (the generations resume on the restarted host after the tokens already sent);
* SIGSTOP of one of two hosts on the CPU while 32 clients send embeds: the other host keeps
  answering (the stalled one frees the hardware after 0.75 s, not the 10 s heartbeat
  timeout), and after SIGCONT, then after a kill, every request has exactly one good reply.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import openai
import pytest

from llmos.kernel.testing import running_kernel, wait_for

QUESTIONS = [
    "My parcel is late. What can I do?",
    "How do I reset my password?",
    "Can I change the delivery address of my order?",
    "The product arrived broken. How do I return it?",
    "Do you ship to Canada?",
    "How long does a refund take?",
    "I was charged twice for one order.",
    "Where can I find my invoice?",
]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def torch_host(devices: list[dict]) -> dict:
    return next(d for d in devices if d["driver"] == "torch" and not d["role"])


async def one_round(base_url: str, rng: random.Random) -> tuple[list[str], int]:
    """16 streamed chats at once, every other one closed after a random number of chunks;
    the finish reasons of those read to the end, and how many were closed early."""
    api = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

    async def one(index: int) -> str | None:
        stream = await api.chat.completions.create(
            model="smollm2", messages=chat(QUESTIONS[index % len(QUESTIONS)]), max_tokens=32,
            temperature=0.0, stream=True)
        close_after = rng.randint(1, 12) if index % 2 else None
        reason = None
        chunks = 0
        async for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
            if close_after is not None and chunks >= close_after:
                await stream.close()
                return "closed"
        return reason

    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await api.close()
    return [o for o in outcomes if o != "closed"], outcomes.count("closed")


@pytest.mark.timeout(900)
def test_streams_closed_at_random_points_never_end_the_others(chat_kernel, gateway):
    with chat_kernel.client() as client:
        before = torch_host(client.devices())
    base_url = f"http://127.0.0.1:{gateway.server_address[1]}/v1"
    rng = random.Random(17)
    for round_number in range(5):
        finished, closed = asyncio.run(one_round(base_url, rng))
        assert closed == 8, f"round {round_number}: only {closed} streams closed early"
        assert sorted(set(finished)) <= ["length", "stop"] and len(finished) == 8, (
            f"round {round_number}: {finished}")
    with chat_kernel.client() as client:
        after = torch_host(client.devices())
        answer = client.generate("smollm2", messages=chat("Hello"), max_tokens=4,
                                 temperature=0.0)
    assert after["restarts"] == before["restarts"] and after["pid"] == before["pid"], (
        "the generation host restarted")
    assert answer["usage"]["completion_tokens"] >= 1


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_generations_survive_their_host_with_every_token_once(chat_kernel, fault):
    """kill: the host dies and restarts, the jobs resume on the new one; stall: SIGSTOP for
    2 s (past the stall timeout), then SIGCONT: no other host serves the model, so the jobs
    stay and finish where they were."""
    args = [{"model": "smollm2", "messages": chat(q), "max_tokens": 40, "temperature": 0.0,
             "ignore_eos": True} for q in QUESTIONS]
    with chat_kernel.client() as client:
        alone = [client.generate(**a)["text"] for a in args]
        host = torch_host(client.devices())
        pendings = [client.submit("generate", a, events=True) for a in args]
        received = [""] * len(args)
        streams = [p.stream(timeout=300) for p in pendings]
        # read until every stream has some text, then kill the host mid-generation
        for index, stream in enumerate(streams):
            for event in stream:
                if event.event == "token":
                    received[index] += event.body["text"]
                    if received[index]:
                        break
        if fault == "kill":
            os.kill(host["pid"], signal.SIGKILL)
        else:
            os.kill(host["pid"], signal.SIGSTOP)
            time.sleep(2.0)
            os.kill(host["pid"], signal.SIGCONT)
        results = []
        for index, (pending, stream) in enumerate(zip(pendings, streams, strict=True)):
            for event in stream:
                if event.event == "token":
                    received[index] += event.body["text"]
            results.append(pending.result())
        wait_for(lambda: torch_host(client.devices())["state"] == "READY"
                 and "smollm2:1" in torch_host(client.devices())["loaded"],
                 "the host to serve the model again")
        after = torch_host(client.devices())
    if fault == "kill":
        assert after["restarts"] == host["restarts"] + 1 and after["pid"] != host["pid"]
    else:
        assert after["restarts"] == host["restarts"] and after["pid"] == host["pid"]
    assert [r["text"] for r in results] == alone
    assert received == alone, "a client missed text or received some twice"
    assert all(r["usage"]["completion_tokens"] == 40 for r in results)


class EmbedLoad:
    """32 client threads sending embeds in a loop; every reply's time and outcome."""

    def __init__(self, kernel, threads: int = 32) -> None:
        self.kernel, self.stop = kernel, threading.Event()
        self.replies: list[tuple[float, bool]] = []
        self.sent = 0
        self.lock = threading.Lock()
        self.workers = [threading.Thread(target=self._work, args=(i,), daemon=True)
                        for i in range(threads)]

    def __enter__(self) -> EmbedLoad:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=120)

    def _work(self, index: int) -> None:
        with self.kernel.client(f"load-{index}", timeout=120.0) as client:
            n = 0
            while not self.stop.is_set():
                with self.lock:
                    self.sent += 1
                try:
                    vectors = client.embed("minilm", [f"client {index} question {n}"])
                    ok = vectors.shape == (1, 384)
                except Exception:
                    ok = False
                with self.lock:
                    self.replies.append((time.monotonic(), ok))
                n += 1

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two replies (or a window edge) in [start, end]."""
        with self.lock:
            times = sorted(t for t, _ in self.replies if start <= t <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


@pytest.mark.timeout(900)
def test_a_stalled_host_frees_the_cpu_for_the_others(home, capsys):
    with running_kernel(home, "--devices", "torch:cpu,onnxruntime:cpu") as kernel:
        with kernel.client() as client:
            client.import_model("minilm")
            client.load("minilm")
            host = torch_host(client.devices())
        with EmbedLoad(kernel) as load:
            time.sleep(2.0)
            stopped_at = time.monotonic()
            os.kill(host["pid"], signal.SIGSTOP)
            time.sleep(3.0)
            os.kill(host["pid"], signal.SIGCONT)
            resumed_at = time.monotonic()
            time.sleep(2.0)
            os.kill(host["pid"], signal.SIGSTOP)
            killed_from = time.monotonic()
            time.sleep(2.0)
            os.kill(host["pid"], signal.SIGKILL)
            with kernel.client() as client:
                wait_for(lambda: torch_host(client.devices())["state"] == "READY"
                         and "minilm:1" in torch_host(client.devices())["loaded"],
                         "the killed host to come back")
            time.sleep(1.0)
            ended_at = time.monotonic()
        with kernel.client() as client:
            stats = client.stats()
    stall_gap = load.longest_gap(stopped_at, resumed_at)
    kill_gap = load.longest_gap(killed_from, ended_at)
    with capsys.disabled():
        print(f"\nSIGSTOP under 32 embed clients: longest gap in replies while stopped "
              f"{stall_gap:.3f} s, around the stop and kill (with the reload) {kill_gap:.3f} s; "
              f"{len(load.replies)} replies")
    assert load.replies and all(ok for _, ok in load.replies), "a request failed"
    assert len(load.replies) == load.sent, "a request got no reply"
    # On main the hardware stayed held for the whole 10 s heartbeat timeout.
    assert stall_gap < 5.0, f"no replies for {stall_gap:.1f} s while one host was stopped"
    assert stats["finished"].get("FAILED", 0) == 0
