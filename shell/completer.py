"""Completion: a pure :func:`suggest` over a :class:`CompletionContext`, and a thin
prompt_toolkit :class:`KernelCompleter` that keeps that context fresh from the kernel.

What is offered follows the command's parameters (:class:`~llmos.shell.commands.Param`):
command names first, then per parameter kind model names (``NAME:VERSION`` after a colon),
job ids, devices, drivers, datasets, file paths, command names or the parameter's choices;
option names after ``--``.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from llmos import Client
from llmos.contract.protocol import KernelError

from .commands import Command, CommandRegistry, Param
from .syntax import current_word

#: How long the kernel's lists are trusted before a completion fetches them again.
REFRESH_SECONDS = 3.0


@dataclass(slots=True)
class CompletionContext:
    """What completion can offer: commands, and what the kernel has right now."""

    registry: CommandRegistry
    models: dict[str, list[int]] = field(default_factory=dict)  # name -> versions
    jobs: list[int] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    drivers: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


def suggest(text_before_cursor: str, context: CompletionContext) -> list[str]:
    """The words that can replace the partial word before the cursor, sorted (job ids in
    numeric order)."""
    words, partial, _ = current_word(text_before_cursor)
    if not words:
        return _starting(context.registry.all_names(), partial)
    command = context.registry.find(words[0])
    if command is None:
        return []
    pending, index = _state(command, words[1:])
    if pending is not None:
        return values(pending, partial, context)
    if partial.startswith("--"):
        return _options(command, words[1:], partial, context)
    param = command.positional(index)
    return values(param, partial, context) if param is not None else []


def _state(command: Command, words: list[str]) -> tuple[Param | None, int]:
    """After ``words``: the option still waiting for its value, and how many positionals."""
    pending: Param | None = None
    index = 0
    for word in words:
        if pending is not None:
            pending = None
        elif word.startswith("--") and len(word) > 2:
            flag, eq, _ = word.partition("=")
            param = command.option(flag)
            if param is not None and param.kind != "flag" and not eq:
                pending = param
        else:
            index += 1
    return pending, index


def _options(command: Command, words: list[str], partial: str, context: CompletionContext) -> list[str]:
    flag, eq, value = partial.partition("=")
    if eq:
        param = command.option(flag)
        return [f"{flag}={v}" for v in values(param, value, context)] if param else []
    used = {w.partition("=")[0] for w in words if w.startswith("--")}
    return _starting([p.flag for p in command.options if p.flag not in used], partial)


def values(param: Param, partial: str, context: CompletionContext) -> list[str]:
    """The values ``param`` can take that start with ``partial``."""
    if param.choices:
        return _starting(param.choices, partial)
    if param.kind == "model":
        name, colon, _ = partial.partition(":")
        if colon:
            return _starting([f"{name}:{v}" for v in context.models.get(name, [])], partial)
        return _starting(context.models, partial)
    if param.kind == "job":
        return [str(j) for j in sorted(set(context.jobs)) if str(j).startswith(partial)]
    if param.kind == "path":
        return paths(partial)
    choices = {"device": context.devices, "driver": context.drivers, "dataset": context.datasets,
               "command": context.registry.all_names()}.get(param.kind, [])
    return _starting(choices, partial)


def paths(partial: str) -> list[str]:
    """Files and folders (with a trailing ``/``) whose path starts with ``partial``."""
    folder, base = os.path.split(partial)
    try:
        entries = os.listdir(os.path.expanduser(folder) or ".")
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.startswith(base) and (base.startswith(".") or not entry.startswith(".")):
            path = os.path.join(folder, entry)
            out.append(path + "/" if os.path.isdir(os.path.expanduser(path)) else path)
    return sorted(out)


def quote(word: str) -> str:
    """``word`` as it must be typed: quoted only if it holds blanks, quotes or operators."""
    return shlex.quote(word) if any(c.isspace() or c in "'\"\\;&#" for c in word) else word


def _starting(words: Iterable[str], partial: str) -> list[str]:
    return sorted({w for w in words if w.startswith(partial)})


class KernelCompleter(Completer):
    """prompt_toolkit's view of :func:`suggest`. It asks the kernel (on its own client, so a
    slow kernel costs at most ``timeout``) for models, jobs, devices, drivers and datasets when a
    completion is wanted and the lists are stale: after every command, or older than
    :data:`REFRESH_SECONDS`. A kernel that does not answer leaves the old lists."""

    def __init__(self, address: str, registry: CommandRegistry, timeout: float = 2.0) -> None:
        self.client = Client(address, name=f"shell-completer-{os.getpid()}", timeout=timeout)
        self.context = CompletionContext(registry)
        self._fetched = 0.0

    def invalidate(self) -> None:
        self._fetched = 0.0

    def refresh(self) -> None:
        try:
            models: dict[str, list[int]] = {}
            for row in self.client.models():
                models.setdefault(row["model"], []).append(int(row["version"]))
            self.context.models = models
            self.context.jobs = [j["id"] for j in self.client.jobs(finished=False)]
            self.context.devices = [d["name"] for d in self.client.devices()]
            self.context.drivers = [d["name"] for d in self.client.drivers()]
            self.context.datasets = [d["name"] for d in self.client.datasets()]
        except KernelError:
            return
        self._fetched = time.monotonic()

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        if time.monotonic() - self._fetched > REFRESH_SECONDS:
            self.refresh()
        text = document.text_before_cursor
        span = current_word(text)[2]
        for word in suggest(text, self.context):
            yield Completion(quote(word), start_position=-span, display=word)

    def close(self) -> None:
        self.client.close()
