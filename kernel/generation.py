"""The ``generate`` syscall: jobs that stream tokens from a continuous-batching host.

Queued ``generate`` jobs for one model
leave the queue together as one ``generate`` task; the driver host adds them to its
running batch (drivers/generation.py) and reports, once a decode step, a ``STREAM``
message of per-job events. This module turns those into ``token`` events for the client
and, at the end, the job's reply. Generation runs in the background of its hardware, like
training: it neither waits for nor blocks other work there, and its host stays free for
other tasks, which it interleaves with decode steps.

A job that ends early (cancel, deadline, the client gone) is removed from the host's batch
with a ``cancel`` task. A job whose host dies (or stalls, see kernel/devices.py) is queued
again and resumes where the client's stream stopped: the kernel keeps the ids of the tokens
it has streamed (:class:`Streamed`), and the retry sends them as ``resume`` with the number
of characters already sent, so the new host prefills prompt and tokens and the client
receives every character exactly once.

On the host a request is known by a **stream id**, new for every dispatch of the job, not
by the job id: events of an earlier dispatch (a stalled host that woke up, perhaps the very
host the job went back to) carry a stream id the kernel no longer maps to the job, and are
ignored.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, encode_event
from llmos.contract.states import FinishReason
from llmos.contract.syscalls import check_generation

from .devices import DeviceHost, HostState, Task
from .jobs import Job, JobState
from .kinds import Core, Handler, JobKind, Request, loaded_version
from .scheduler import Batch, BatchingConfig

#: Generate jobs leave the queue for their host at once, all together: the host batches.
GENERATE_BATCHING = BatchingConfig(max_batch_size=1024, max_queue_delay=0.0)
#: The arguments a driver host needs for one request.
#: Stream ids: a generate job's name on its host, new for each dispatch.
_stream_ids = itertools.count(1)
_REQUEST_ARGS = ("prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed",
                 "ignore_eos")


@dataclass(slots=True)
class Streamed:
    """What a generate job has streamed so far (its token ids and characters of text), and
    its current stream id on its host."""

    tokens: list[int] = field(default_factory=list)
    chars: int = 0
    sid: int = 0

    def resume(self) -> dict[str, Any]:
        """The ``resume`` field of a retried request (see drivers/generation.py)."""
        return {"tokens": self.tokens, "sent": self.chars}


class Generation(JobKind):
    """The ``generate`` handler and the streaming of its results."""

    def __init__(self, core: Core) -> None:
        super().__init__(core)
        #: Job id -> what it has streamed (entries leave when the job ends).
        self.streamed: dict[int, Streamed] = {}
        #: Current stream id -> job id (only the latest dispatch of each job).
        self.stream_jobs: dict[int, int] = {}

    def handlers(self) -> dict[str, Handler]:
        return {"generate": self._generate}

    def background(self, job: Job) -> bool:
        return True

    def batch_key(self, job: Job) -> Hashable:
        return (job.args["handle"], "generate")

    def candidates(self, job: Job) -> list[str]:
        handle = job.args["handle"]
        return [h.name for h in self.core.hosts().values()
                if handle in h.loaded and h.role.get("stage", 1) == 1]

    def batching(self, job: Job) -> BatchingConfig:
        return GENERATE_BATCHING

    def client_gone(self, job: Job, identity: bytes) -> bool:
        return bool(job.reply_route) and job.reply_route[0] == identity

    def on_lost(self, job: Job, stalled: bool) -> None:
        if stalled:
            self._stop(job)  # the host drops it when it wakes up

    def on_renice(self, job: Job) -> None:
        """Tell the host a running job's new priority (it decides preemption by it)."""
        if job.state in (JobState.RUNNING, JobState.PREEMPTED):
            self._tell_host(job, Task(TaskOp.RENICE, {"id": self.streamed[job.id].sid,
                                                      "priority": job.priority}))

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        """A generate task ends when its last request has; a job still unfinished then
        got no result."""
        for job in live + [j for j in task.jobs if j.state is JobState.PREEMPTED]:
            self.core.fail(job, JobState.FAILED, ErrorCode.INTERNAL,
                           f"{host.name} ended the generation without a result")

    def on_end(self, job: Job, state: JobState) -> None:
        """Remove an ended job from its host's batch (unless it finished there), and forget
        what it streamed and its stream id."""
        if state is not JobState.DONE:
            self._stop(job)
        streamed = self.streamed.pop(job.id, None)
        if streamed is not None:
            self.stream_jobs.pop(streamed.sid, None)

    def _generate(self, request: Request) -> Job:
        check_generation(request.args)
        version = loaded_version(self.core, request, "generate",
                                       "generate needs a causal language model such as smollm2")
        return self.core.admit(request, handle=version.ref)

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        jobs = batch.jobs
        requests = []
        for job in jobs:
            streamed = self.streamed.setdefault(job.id, Streamed())
            self.stream_jobs.pop(streamed.sid, None)  # what an earlier dispatch sends is stale
            streamed.sid = next(_stream_ids)
            self.stream_jobs[streamed.sid] = job.id
            request = {"id": streamed.sid, "priority": job.priority,
                       **{name: job.args[name] for name in _REQUEST_ARGS}}
            if streamed.tokens:
                request["resume"] = streamed.resume()
            requests.append(request)
        return Task(TaskOp.GENERATE, {"handle": jobs[0].args["handle"], "requests": requests}, jobs)

    def on_stream(self, host: str, events: list[dict[str, Any]]) -> None:
        """Apply host ``host``'s per-job generation events (unknown or ended jobs, and jobs
        that host no longer runs, are ignored)."""
        for event in events:
            job = self.core.active.get(self.stream_jobs.get(int(event.get("id", -1)), -1))
            if job is None or job.kind is not self or job.device != host or job.state not in (
                    JobState.RUNNING, JobState.PREEMPTED):
                continue
            if event.get("preempted"):
                job.transition(JobState.PREEMPTED)
                job.progress["preemptions"] = job.progress.get("preemptions", 0) + 1
                continue
            if job.state is JobState.PREEMPTED:
                job.transition(JobState.RUNNING)
            if "finish" in event:
                self._done(job, event)
                continue
            job.tokens += int(event.get("tokens", 0))
            job.progress["completion_tokens"] = job.tokens
            if "token" in event:
                self.streamed[job.id].tokens.append(int(event["token"]))
            self._stream(job, str(event.get("text", "")))

    def _stream(self, job: Job, text: str) -> None:
        if not text:
            return
        if job.id in self.streamed:
            self.streamed[job.id].chars += len(text)
        if job.wants_events and job.reply_route:
            identity, msg_id = job.reply_route
            self.core.send(identity, encode_event(msg_id, "generate", "token",
                                              {"job": job.id, "text": text}))

    def _done(self, job: Job, event: dict[str, Any]) -> None:
        job.cpu_seconds += float(event.get("cpu_seconds", 0.0))
        reason = str(event["finish"])
        if reason == "error":
            self.core.fail(job, JobState.FAILED, str(event.get("code", ErrorCode.INTERNAL)),
                       str(event.get("message", "generation failed")))
            return
        if reason == FinishReason.CANCELLED:  # cancelled on the host (the model was unloaded)
            self.core.fail(job, JobState.CANCELLED, ErrorCode.CANCELLED,
                       str(event.get("message", "the generation was cancelled")))
            return
        self._stream(job, str(event.get("delta", "")))
        prompt, completion = int(event["prompt_tokens"]), int(event["completion_tokens"])
        job.tokens = completion
        self.core.finish(job, {
            "model": job.args["handle"], "text": event["text"], "finish_reason": reason,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion,
                      "cached_tokens": int(event.get("cached_tokens", 0))},
            "preemptions": int(event.get("preemptions", 0)),
            "time_to_first_token": event.get("time_to_first_token"),
            "sampling": event.get("sampling"),
        })

    def _stop(self, job: Job) -> None:
        """Remove an unfinished job from its host's batch."""
        if job.id in self.streamed:
            self._tell_host(job, Task(TaskOp.CANCEL, {"ids": [self.streamed[job.id].sid]}))

    def _tell_host(self, job: Job, task: Task) -> None:
        """Send ``task`` to the host running ``job`` (nothing to do if that host is gone)."""
        host = self.core.hosts().get(job.device or "")
        if host is not None and host.state in (HostState.READY, HostState.STALLED):
            self.core.devices.submit(host, task)
