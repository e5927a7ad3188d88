"""Shell commands: what a command is, the registry plugins fill, and what handlers return.

Plugins add commands through the ``llmos_register_shell_commands(commands)`` hook with
``commands.add(Command(...))``. A handler receives a :class:`ShellContext` and the parsed
arguments and returns data, never printed text: an :class:`Output` (tables, a line of text
and the machine-readable ``data`` that ``--json`` prints) or a :class:`JobRequest` (a
syscall that creates a job; the shell submits it in the foreground or, with ``&``, in the
background). Rendering happens in one place, :mod:`llmos.shell.render`.

Plugins that the kernel also loads import this module, so it must stay light: no
prompt_toolkit, no rich.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmos.contract.protocol import ErrorCode, KernelError

if TYPE_CHECKING:
    from llmos import Client

#: Parameter kinds. ``value``, ``int``, ``number`` and ``flag`` say how a word is parsed; the
#: others are values the completer can offer (``job`` is parsed as an int).
KINDS = frozenset({"value", "int", "number", "flag", "model", "job", "device", "driver",
                   "dataset", "path", "command"})


@dataclass(frozen=True, slots=True)
class Param:
    """One argument: a positional (``NAME``) or an option (``--name VALUE``, ``--name``;
    underscores in ``name`` are typed as hyphens: ``batch_size`` is ``--batch-size``).

    ``many`` (positionals only) takes every remaining word; ``choices`` restricts and
    completes the value; ``metavar`` is the name shown in usage (default ``NAME``).
    """

    name: str
    kind: str = "value"
    option: bool = False
    required: bool = False
    many: bool = False
    choices: tuple[str, ...] = ()
    metavar: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}")

    @property
    def shown(self) -> str:
        return self.metavar or ("|".join(self.choices) if self.choices else self.name.upper())

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def usage(self) -> str:
        if self.option:
            return f"[{self.flag}]" if self.kind == "flag" else f"[{self.flag} {self.shown}]"
        text = f"{self.shown}..." if self.many else self.shown
        return text if self.required else f"[{text}]"

    def convert(self, command: str, word: str) -> Any:
        """The word as this parameter's type; KernelError(BAD_REQUEST) if it is not one."""
        if self.choices and word not in self.choices:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{command}: {self.name} must be one of "
                              f"{', '.join(self.choices)}, got {word!r}"
                              f"{did_you_mean(word, self.choices)}")
        try:
            if self.kind in ("int", "job"):
                return int(word)
            if self.kind == "number":
                return float(word)
        except ValueError:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{command}: {self.shown} must be "
                              f"{'a number' if self.kind == 'number' else 'an integer'}, "
                              f"got {word!r}") from None
        return word


#: ``handler(context, args) -> Output | JobRequest``.
Handler = Callable[["ShellContext", dict[str, Any]], "Output | JobRequest"]


#: Options every command that creates a job takes.
JOB_OPTIONS = (Param("priority", "int", option=True, metavar="NICE"),
               Param("timeout", "number", option=True, metavar="SECONDS"))
#: Options of the commands whose time-sliced job measures on data (compress, update).
MEASURING_JOB_OPTIONS = (Param("seed", "int", option=True, metavar="N"),
                         Param("eval_limit", "int", option=True, metavar="ROWS"),
                         Param("quantum", "number", option=True, metavar="SECONDS"), *JOB_OPTIONS)


@dataclass(frozen=True, slots=True)
class Command:
    """A shell command. ``handler`` is a callable or a ``"package.module:function"`` string
    imported on first use (so registering a command imports nothing heavy).

    ``handler(context, args)`` gets ``args`` keyed by parameter name (absent options and
    positionals are ``None``, ``many`` ones a list, flags a bool) and returns an
    :class:`Output` or a :class:`JobRequest`; it raises KernelError for errors.
    """

    name: str
    help: str
    handler: Handler | str
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def usage(self) -> str:
        return " ".join([self.name, *(p.usage for p in self.positionals), *(p.usage for p in self.options)])

    @property
    def positionals(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.option)

    @property
    def options(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.option)

    def option(self, flag: str) -> Param | None:
        """The option typed as ``flag`` (``--batch-size``)."""
        return next((p for p in self.options if p.flag == flag), None)

    def positional(self, index: int) -> Param | None:
        """The parameter the ``index``-th positional word fills (``many`` repeats)."""
        positionals = self.positionals
        if index < len(positionals):
            return positionals[index]
        return positionals[-1] if positionals and positionals[-1].many else None

    def parse(self, words: list[str]) -> dict[str, Any]:
        """Arguments by name. A word starting with ``--`` is an option (``--name VALUE`` or
        ``--name=VALUE``), so ``-5`` is a positional; after a bare ``--`` every word is.
        KernelError(BAD_REQUEST) naming the usage for unknown options, missing or extra words."""
        args: dict[str, Any] = {p.name: ([] if p.many else False if p.kind == "flag" else None)
                                for p in self.params}
        positional = 0
        words = list(words)
        options_end = False
        while words:
            word = words.pop(0)
            if word == "--" and not options_end:
                options_end = True
                continue
            if word.startswith("--") and not options_end:
                flag, eq, value = word.partition("=")
                param = self.option(flag)
                if param is None:
                    raise self.error(f"unknown option {flag}"
                                     f"{did_you_mean(flag, [p.flag for p in self.options])}")
                if param.kind == "flag":
                    args[param.name] = True
                    continue
                if not eq:
                    if not words:
                        raise self.error(f"{flag} needs a value")
                    value = words.pop(0)
                args[param.name] = param.convert(self.name, value)
                continue
            param = self.positional(positional)
            if param is None:
                raise self.error(f"unexpected argument {word!r}")
            value = param.convert(self.name, word)
            if param.many:
                args[param.name].append(value)
            else:
                args[param.name] = value
            positional += 1
        for param in self.positionals:
            if param.required and args[param.name] in (None, []):
                raise self.error(f"missing {param.shown}")
        return args

    def error(self, problem: str) -> KernelError:
        return KernelError(ErrorCode.BAD_REQUEST, f"{self.name}: {problem}; usage: {self.usage}")

    def run(self, context: ShellContext, words: list[str]) -> Output | JobRequest:
        """Parse ``words`` and call the handler."""
        handler = self.handler
        if isinstance(handler, str):
            module, _, name = handler.partition(":")
            handler = getattr(importlib.import_module(module), name)
        return handler(context, self.parse(words))


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean X?"`` naming the candidates closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


class CommandRegistry:
    """Commands by name and alias; names and aliases are unique (ValueError otherwise)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._lookup: dict[str, Command] = {}

    def add(self, command: Command) -> None:
        for name in (command.name, *command.aliases):
            if name in self._lookup:
                raise ValueError(f"shell command {name!r} is already registered")
        self._commands[command.name] = command
        for name in (command.name, *command.aliases):
            self._lookup[name] = command

    def get(self, name: str) -> Command:
        """The command called ``name`` (or aliased so); KernelError(NOT_FOUND) otherwise."""
        try:
            return self._lookup[name]
        except KeyError:
            raise KernelError(ErrorCode.NOT_FOUND,
                              f"unknown command {name!r} (type help for the list)") from None

    def find(self, name: str) -> Command | None:
        return self._lookup.get(name)

    def names(self) -> list[str]:
        """Command names, sorted (aliases not included)."""
        return sorted(self._commands)

    def all_names(self) -> list[str]:
        """Names and aliases, sorted: everything that can start a command."""
        return sorted(self._lookup)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._lookup


@dataclass(frozen=True, slots=True)
class Table:
    """Rows under named columns; ``None`` cells show as ``-``."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]


@dataclass(frozen=True, slots=True)
class Output:
    """A command's result: ``text`` and ``tables`` for people, ``data`` for ``--json``
    (``None``: nothing to print as JSON)."""

    data: Any = None
    text: str = ""
    tables: tuple[Table, ...] = ()


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A job to submit: the syscall, its arguments, and how to present the result."""

    syscall: str
    args: Mapping[str, Any]
    present: Callable[[dict[str, Any]], Output] = field(default=lambda result: Output(data=result))


class ShellContext(Protocol):
    """What a handler may use: the kernel client, the registry, and the shell's job control."""

    client: Client
    registry: CommandRegistry
    interactive: bool

    def follow(self, job_id: int | None) -> Output:
        """Wait for a job (this shell's last background job when ``None``) with a progress
        line; Ctrl-C cancels it. Returns its presented result or, for another client's
        job, its summary."""
        ...
