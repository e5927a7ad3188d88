"""The syscall table (``SYSCALLS``) is the one truth about each syscall's arguments: the
client's methods, the ``llmos`` subcommands, the shell's commands and docs/protocol.md
agree with it argument by argument, except where ``EXCEPTIONS`` says otherwise and why."""

import argparse
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from llmos import Client
from llmos.contract.syscalls import SYSCALLS
from llmos.kernel.client import _Syscalls
from llmos.shell import cli
from llmos.shell.app import load_commands
from llmos.shell.commands import Command, CommandRegistry

ROOT = Path(__file__).resolve().parent.parent

#: The client method of each syscall whose method is not named like it.
CLIENT_METHODS = {"import": "import_model"}
#: The client's convenience methods over one syscall with one argument fixed: method ->
#: (syscall, fixed argument, its value, {argument: parameter that carries it}).
CLIENT_SHORTHANDS = {"embed": ("infer", "task", "embed", {"inputs": "texts"}),
                     "classify": ("infer", "task", "classify", {"inputs": "texts"})}
#: The ``llmos`` subcommand (words after ``llmos``) of each syscall it offers directly (the
#: others run the shell's command of the same name: cli.DELEGATED).
CLI_SUBCOMMANDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ping": (("ping",),), "info": (("info",),), "drivers": (("drivers",),),
    "devices": (("devices",),), "models": (("models", "list"),),
    "import": (("models", "import"),), "cancel": (("cancel",),), "renice": (("renice",),),
}
#: The shell command(s) of each syscall.
SHELL_COMMANDS: dict[str, tuple[str, ...]] = {
    "ping": ("ping",), "info": ("info",), "drivers": ("drivers",), "devices": ("devices",),
    "models": ("models",), "import": ("import",), "export": ("export",), "load": ("load",),
    "unload": ("unload",), "infer": ("embed", "classify"), "generate": ("chat",),
    "learn": ("learn",), "datasets": ("datasets",), "train": ("train",),
    "evaluate": ("evaluate",), "compress": ("compress",), "promote": ("promote",),
    "update": ("update",), "rollback": ("rollback",), "jobs": ("ps",), "job": ("job",),
    "cancel": ("kill",), "renice": ("nice",), "stats": ("stats",), "shutdown": ("shutdown",),
}

#: Every deliberate disagreement: (surface, syscall, argument) -> how that surface takes
#: the argument instead, and why. ``*`` as the syscall: every syscall with that argument.
EXCEPTIONS: dict[tuple[str, str, str], str] = {
    ("client", "job", "id"): "job_id: a parameter `id` would shadow the builtin",
    ("client", "cancel", "id"): "job_id: a parameter `id` would shadow the builtin",
    ("client", "renice", "id"): "job_id: a parameter `id` would shadow the builtin",
    ("cli", "shutdown", ""): "no subcommand: `llmos kernel stop` sends it and waits for the "
                             "kernel's process to exit",
    ("cli", "noop", ""): "no subcommand: a probe for benchmarks (`ping` checks the kernel)",
    ("shell", "noop", ""): "no command: a probe for benchmarks (`ping` checks the kernel)",
    ("shell", "*", "version"): "MODEL[:VERSION]: the version rides on the model's name",
    ("shell", "infer", "task"): "the command is the task (`embed`, `classify`)",
    ("shell", "infer", "inputs"): "TEXT... or --file PATH (one text a line)",
    ("shell", "generate", "prompt"): "PROMPT... is sent as a chat message (the conversation "
                                     "goes on turn by turn)",
    ("shell", "generate", "messages"): "built from --system and the turns of the chat",
    ("shell", "learn", "examples"): "--feedback PATH|- (CSV/JSONL rows), or --text with "
                                    "--label; sent in batches of MAX_FEEDBACK",
    ("shell", "update", "promote"): "--no-promote, the inverse (the kernel promotes by default)",
    ("shell", "jobs", "finished"): "--all: `ps` lists unfinished jobs only, like Unix ps",
}
#: Client parameters that are no syscall argument: (method, parameter) -> why.
CLIENT_EXTRA_PARAMS = {("ping", "timeout"): "how long the client waits for the answer"}


def excused(surface: str, syscall: str, argument: str) -> bool:
    """Whether ``surface`` takes ``argument`` of ``syscall`` its own way (``""``: the surface
    offers no command for the syscall at all)."""
    return (surface, syscall, argument) in EXCEPTIONS or (surface, "*", argument) in EXCEPTIONS


def test_every_exception_names_a_real_syscall_and_argument():
    for surface, syscall, argument in EXCEPTIONS:
        assert surface in ("client", "cli", "shell")
        if syscall != "*":
            assert argument in {"", *(a.name for a in SYSCALLS[syscall].args)}, (syscall, argument)


def test_every_syscall_has_a_client_method_cli_subcommand_and_shell_command():
    assert set(SHELL_COMMANDS) == {n for n in SYSCALLS if not excused("shell", n, "")}
    delegated = {"generate", "learn", "datasets", "train", "evaluate", "compress", "promote",
                 "update", "rollback", "load", "unload", "export", "infer", "jobs", "job",
                 "stats"}
    for name in SYSCALLS:
        assert hasattr(Client, CLIENT_METHODS.get(name, name)), name
        in_cli = name in CLI_SUBCOMMANDS or excused("cli", name, "")
        in_shell = name in delegated and all(c in cli.DELEGATED for c in SHELL_COMMANDS[name])
        assert in_cli or in_shell, f"`llmos` offers no subcommand for {name}"


# --- the client -------------------------------------------------------------------------


class _Sent(Exception):
    """Raised by :class:`Recorder` once a request is recorded (nothing is sent)."""


class Recorder(_Syscalls):
    """A client that records the request a method makes instead of sending it."""

    address = "inproc://recorder"

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def _call(self, syscall, args, shape=None, timeout=None):
        self.sent.append((syscall, dict(args)))
        raise _Sent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _client_parameter(syscall: str, argument: str) -> str:
    return "job_id" if excused("client", syscall, argument) else argument


def _params(method: str) -> dict[str, inspect.Parameter]:
    signature = inspect.signature(getattr(_Syscalls, method))
    return {name: p for name, p in signature.parameters.items()
            if name != "self" and (method, name) not in CLIENT_EXTRA_PARAMS}


def _sent(method: str, params: dict[str, inspect.Parameter]) -> tuple[str, dict[str, Any], dict]:
    """The request ``method`` makes when every parameter gets a distinct value."""
    values = {name: f"<{name}>" for name in params}
    positional = [values[n] for n, p in params.items() if p.default is inspect.Parameter.empty]
    keywords = {n: values[n] for n, p in params.items() if p.default is not inspect.Parameter.empty}
    recorder = Recorder()
    with pytest.raises(_Sent):
        getattr(recorder, method)(*positional, **keywords)
    (syscall, args), = recorder.sent
    return syscall, args, values


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_the_client_method_takes_exactly_the_syscalls_arguments(name):
    method = CLIENT_METHODS.get(name, name)
    params = _params(method)
    table = SYSCALLS[name].args
    assert set(params) == {_client_parameter(name, a.name) for a in table}, method
    for arg in table:
        param = params[_client_parameter(name, arg.name)]
        if arg.required:
            assert param.default is inspect.Parameter.empty, f"{method}: {arg.name} is required"
            assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (method, arg.name)
        else:
            assert param.default in (None, arg.default), \
                f"{method}: {arg.name} defaults to {param.default!r}, the kernel to {arg.default!r}"
    syscall, args, values = _sent(method, params)
    assert syscall == name
    assert args == {a.name: values[_client_parameter(name, a.name)] for a in table}, method


@pytest.mark.parametrize("method", sorted(CLIENT_SHORTHANDS))
def test_the_clients_shorthands_take_the_rest_of_their_syscalls_arguments(method):
    name, fixed, value, renamed = CLIENT_SHORTHANDS[method]
    params = _params(method)
    expected = {renamed.get(a.name, a.name) for a in SYSCALLS[name].args if a.name != fixed}
    assert set(params) == expected
    syscall, args, values = _sent(method, params)
    assert syscall == name and args.pop(fixed) == value
    assert args == {a.name: values[renamed.get(a.name, a.name)]
                    for a in SYSCALLS[name].args if a.name != fixed}


# --- the llmos command ------------------------------------------------------------------


def _subparser(words: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for word in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def _own_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.dest != "help" and a.default is not argparse.SUPPRESS
            and not isinstance(a, argparse._SubParsersAction)]


def _sample(action: argparse.Action) -> list[str]:
    """Words that give ``action`` a value."""
    if action.nargs == 0:
        return list(action.option_strings[:1])
    value = action.choices[0] if action.choices else {int: "2", float: "1.5"}.get(action.type, "x")
    return [*action.option_strings[:1], str(value)]


CLI_CASES = [(name, words) for name, cases in sorted(CLI_SUBCOMMANDS.items()) for words in cases]


@pytest.mark.parametrize("name, words", CLI_CASES, ids=[" ".join(w) for _, w in CLI_CASES])
def test_the_cli_subcommand_takes_and_sends_every_argument(name, words, monkeypatch):
    actions = _own_actions(_subparser(words))
    dests = {a.dest for a in actions}
    table = [a for a in SYSCALLS[name].args if not excused("cli", name, a.name)]
    missing = [a.name for a in table if a.name not in dests]
    assert not missing, f"`llmos {' '.join(words)}` lacks {missing}"
    argv = [*words, *(word for action in actions for word in _sample(action))]
    recorder = Recorder()
    monkeypatch.setattr(cli, "Client", lambda *args, **kwargs: recorder)
    with pytest.raises(_Sent):
        cli.main(argv)
    (syscall, args), = recorder.sent
    assert syscall == name
    unsent = [a.name for a in table if args.get(a.name) is None]
    assert not unsent, f"`llmos {' '.join(argv)}` does not send {unsent}"


# --- the shell --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> CommandRegistry:
    return load_commands()


def _covers(command: Command, syscall: str, argument: str) -> bool:
    return argument in {p.name for p in command.params} or excused("shell", syscall, argument)


@pytest.mark.parametrize("name", sorted(SHELL_COMMANDS))
def test_the_shell_command_takes_every_argument(name, registry):
    for command_name in SHELL_COMMANDS[name]:
        command = registry.get(command_name)
        missing = [a.name for a in SYSCALLS[name].args if not _covers(command, name, a.name)]
        assert not missing, f"shell `{command.usage}` lacks {missing}"
        if any(a.name == "version" for a in SYSCALLS[name].args):
            model = next(p for p in command.params if p.name == "model")
            assert "VERSION" in model.shown, command.usage


# --- docs/protocol.md -------------------------------------------------------------------


def _documented_arguments(name: str) -> set[str]:
    """The arguments in the ``| Argument |`` table of ``name``'s section of docs/protocol.md
    (none without one)."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = re.search(rf"^### `{name}`\n(.*?)(?=^##)", text, flags=re.MULTILINE | re.DOTALL)
    assert section, f"docs/protocol.md has no section for {name}"
    table = re.search(r"^\| Argument \|.*?\n((?:\|.*\n)+)", section.group(1), flags=re.MULTILINE)
    rows = re.findall(r"^\| (`\w+`(?:(?:, | / )`\w+`)*) \|", table.group(1) if table else "",
                      flags=re.MULTILINE)
    return {word for row in rows for word in re.findall(r"`(\w+)`", row)}


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_the_protocol_document_lists_exactly_the_arguments(name):
    assert _documented_arguments(name) == {a.name for a in SYSCALLS[name].args}
