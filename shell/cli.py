"""The ``llmos`` command: kernel control and one subcommand per everyday syscall.

Its help is generated, never written per command: a subcommand that sends one syscall is
described by that syscall's entry in :data:`~llmos.contract.syscalls.SYSCALLS`, one that
runs a shell command (:data:`DELEGATED`) by that command's entry in the shell's command
table, its usage and options included. ``-h``, ``--help`` and ``llmos help COMMAND`` work
on every subcommand; a mistyped command or option gets a suggestion. Exit statuses are
:class:`ExitStatus` (docs/shell.md has the table).
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import psutil

from llmos import Client, CurveKeys, __version__
from llmos.addresses import default_address, default_home, is_local
from llmos.admin import (
    AuditLog,
    KernelServer,
    KeyStore,
    add_kernel_options,
    config_from_args,
    kernel_argv,
    read_pid_file,
)
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import SYSCALLS

from . import render, views
from .commands import Command, CommandRegistry, Param, did_you_mean


class ExitStatus(enum.IntEnum):
    """What ``llmos`` exits with (the table in docs/shell.md)."""

    #: The command did what it was asked (help and ``--version`` included).
    OK = 0
    #: It ran, but the outcome was not reached in time: ``kernel stop`` whose kernel still
    #: runs after ``--wait`` seconds.
    NOT_DONE = 1
    #: An error, printed as one line ``error CODE: message`` on stderr: a usage mistake
    #: (BAD_REQUEST), no kernel answering (TIMEOUT), or the kernel's own error code.
    ERROR = 2
    #: Ctrl-C.
    INTERRUPTED = 130


#: Commands that run the shell command of the same name with the words that follow (one
#: implementation); their help is that command's, from the shell's command table.
DELEGATED: tuple[str, ...] = ("load", "unload", "export", "embed", "classify", "jobs", "ps",
                              "job", "kill", "nice", "wait", "top", "stats", "plugins",
                              "train", "evaluate", "datasets", "chat", "serve", "learn",
                              "update", "rollback", "monitor", "compress", "promote")
#: The syscall each syscall subcommand (words after ``llmos``) sends: its help is that
#: syscall's documentation.
SYSCALL_OF: dict[str, str] = {
    "ping": "ping", "info": "info", "drivers": "drivers", "devices": "devices",
    "models list": "models", "models import": "import", "cancel": "cancel", "renice": "renice",
}
#: Words that ask a delegated command for its help instead of running it.
HELP_FLAGS = ("-h", "--help")
#: Global options that take a value (their value is not a command name).
_GLOBAL_VALUES = ("--address", "--home")


def resolve_home(args: argparse.Namespace) -> Path:
    """--home, else LLMOS_HOME, else ~/.llmos."""
    return Path(args.home).expanduser() if args.home else default_home()


def resolve_address(args: argparse.Namespace) -> str:
    """--address, else LLMOS_ADDRESS, else the running kernel's record, else the default."""
    if args.address:
        return args.address
    if os.environ.get("LLMOS_ADDRESS"):
        return os.environ["LLMOS_ADDRESS"]
    home = resolve_home(args)
    record = read_pid_file(home)
    return record["address"] if record else default_address(home)


#: How long ``kernel start --detach`` waits for the new kernel to answer.
START_WAIT_SECONDS = 120.0
#: How long ``kernel stop`` waits for the kernel's process to exit (``--wait``).
STOP_WAIT_SECONDS = 60.0
#: How long a lifecycle command waits for a kernel's ``info`` (its IO thread answers).
ANSWER_SECONDS = 5.0
#: How long ``kernel stop`` waits for the reply to ``shutdown`` (its scheduling loop answers).
SHUTDOWN_SECONDS = 30.0


def start_detached(home: Path, extra: list[str], wait: float = START_WAIT_SECONDS,
                   curve: CurveKeys | None = None) -> dict[str, Any]:
    """Start ``python -m llmos.kernel`` in its own session and return its record
    ``{pid, address}`` once that very process answers ``info`` with its own pid (over
    CURVE with ``curve``; default: LLMOS_CLIENT_KEY/LLMOS_SERVER_KEY if set). If it exits
    first: KernelError(INTERNAL) with the last line it logged; if it does not answer within
    ``wait`` seconds it is killed and KernelError(TIMEOUT) raised."""
    log_path = home / "logs" / "kernel.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        logged_before = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos.kernel", "--home", str(home), *extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise KernelError(ErrorCode.INTERNAL, f"the kernel exited with status "
                              f"{process.returncode}: {_last_line(log_path, logged_before)} "
                              f"(see {log_path})")
        record = read_pid_file(home)
        if record and int(record["pid"]) == process.pid and _answers_as(record, curve):
            return record
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise KernelError(ErrorCode.TIMEOUT, f"the kernel (pid {process.pid}) did not answer "
                      f"within {wait:g} s and was killed; see {log_path}")


def _answers_as(record: dict[str, Any], curve: CurveKeys | None) -> bool:
    """True if the kernel at ``record["address"]`` answers ``info`` with ``record["pid"]``."""
    with Client(record["address"], timeout=1.0, curve=curve) as client:
        try:
            return int(client.info()["pid"]) == int(record["pid"])
        except KernelError:
            return False


def _last_line(log_path: Path, offset: int) -> str:
    """The last non-empty line written to ``log_path`` after ``offset`` (a traceback ends
    with its error), or a note that there is none."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[-1].strip()[:500] if lines else "it logged nothing"


def curve_client_keys(home: Path) -> CurveKeys:
    """The keys ``kernel start --detach --curve`` checks the new kernel with:
    LLMOS_CLIENT_KEY (the secret key file of a client on ``home``'s allowlist) and
    LLMOS_SERVER_KEY (``home``'s kernel public key). KernelError(DENIED) at once, saying
    what to set, if they are missing, unreadable or not this kernel's."""
    store = KeyStore(home)
    how = (f"make a client key with `llmos keys create --client NAME`, allow it with "
           f"`llmos keys allow NAME {store.root / 'clients' / 'NAME.key'}`, then set "
           f"LLMOS_CLIENT_KEY={store.root / 'clients' / 'NAME.key_secret'} and "
           f"LLMOS_SERVER_KEY={store.root / 'server.key'} (docs/security.md)")
    try:
        keys = CurveKeys.from_env()
    except (OSError, ValueError) as exc:
        raise KernelError(ErrorCode.DENIED, f"kernel start --curve: cannot read "
                          f"LLMOS_CLIENT_KEY/LLMOS_SERVER_KEY ({exc}); {how}") from None
    if keys is None:
        raise KernelError(ErrorCode.DENIED, "kernel start --detach --curve: this command "
                          "checks the new kernel answers, over CURVE, so it needs a client "
                          f"key: {how}")
    if keys.public not in store.allowed():
        raise KernelError(ErrorCode.DENIED, f"kernel start --curve: the key in "
                          f"LLMOS_CLIENT_KEY is not on the allowlist ({store.allowed_dir}); {how}")
    if keys.server != store.server_keys()[0]:
        raise KernelError(ErrorCode.DENIED, f"kernel start --curve: LLMOS_SERVER_KEY is not "
                          f"this kernel's key; {how}")
    return keys


class StopOutcome(enum.Enum):
    """What ``kernel stop`` saw happen."""

    #: The kernel's process exited (or, remote, it stopped answering).
    STOPPED = "stopped"
    #: It acknowledged the shutdown but still runs when the wait ran out.
    STILL_RUNNING = "still running"


@dataclass(frozen=True, slots=True)
class Stopped:
    """The outcome of :func:`stop_kernel`; ``pid`` as the kernel reported it."""

    outcome: StopOutcome
    pid: int


def stop_kernel(address: str, wait: float = STOP_WAIT_SECONDS) -> Stopped:
    """Ask the kernel at ``address`` to shut down and wait, at most ``wait`` seconds, until
    its process has exited: the pid is the one it reports in ``info``, watched here when
    the address is local (ipc or loopback), else until it no longer answers. The client's
    KernelError(TIMEOUT) within seconds if no kernel answers there."""
    with Client(address, timeout=SHUTDOWN_SECONDS) as client:
        pid = int(client.submit("info", {}).result(ANSWER_SECONDS)["pid"])
        client.shutdown()
    deadline = time.monotonic() + wait
    running = (lambda: _alive(pid)) if is_local(address) else (lambda: _answers(address))
    while running():
        if time.monotonic() >= deadline:
            return Stopped(StopOutcome.STILL_RUNNING, pid)
        time.sleep(0.1)
    return Stopped(StopOutcome.STOPPED, pid)


def _answers(address: str) -> bool:
    """True while a kernel answers ``ping`` at ``address`` (within a second)."""
    with Client(address, timeout=1.0) as client:
        try:
            client.ping(timeout=1.0)
        except KernelError:
            return False
    return True


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie left by our own Popen counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start(args: argparse.Namespace) -> ExitStatus:
    """``kernel start``: check the configuration (e.g. --curve's keys) before anything runs;
    then serve in the foreground, or spawn and report the pid that answers (--detach)."""
    config = config_from_args(args)
    if not args.detach:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        KernelServer(config).serve()
        return ExitStatus.OK
    running = read_pid_file(config.home)
    if running:
        raise KernelError(ErrorCode.BUSY, f"a kernel (pid {running['pid']}) is already running "
                          f"at {running['address']} for {config.home}; `llmos kernel stop` first")
    curve = curve_client_keys(config.home) if config.curve else None
    record = start_detached(config.home, kernel_argv(args), curve=curve)
    render.console.print(f"kernel pid {record['pid']} listening on {record['address']}")
    return ExitStatus.OK


def _stop(args: argparse.Namespace) -> ExitStatus:
    """``kernel stop``: OK once the kernel's process has exited; NOT_DONE if it still runs
    after ``--wait`` seconds (no kernel answering is the client's error)."""
    address = resolve_address(args)
    stopped = stop_kernel(address, wait=args.wait)
    if stopped.outcome is StopOutcome.STILL_RUNNING:
        render.error("TIMEOUT", f"the kernel (pid {stopped.pid}) acknowledged the shutdown but "
                     f"still runs after {args.wait:g} s (`kill {stopped.pid}` ends it)")
        return ExitStatus.NOT_DONE
    render.console.print(f"kernel stopped (pid {stopped.pid} exited)" if is_local(address)
                         else f"kernel stopped (pid {stopped.pid} at {address} no longer answers)")
    return ExitStatus.OK


def _kernel(args: argparse.Namespace) -> int:
    if args.kernel_command == "start":
        return _start(args)
    if args.kernel_command == "join":
        from llmos.plugins.parallel.launch import join

        try:
            return join(args.rendezvous, args.world_size, args.rank, args.ranks)
        except ValueError as exc:
            raise KernelError(ErrorCode.BAD_REQUEST, str(exc)) from None
    if args.kernel_command == "status":
        with Client(resolve_address(args)) as client:
            render.show(views.mapping("kernel", client.info()), args.json)
        return ExitStatus.OK
    return _stop(args)


def _show(args: argparse.Namespace, client: Client) -> ExitStatus:
    command = args.command
    if command == "ping":
        started = time.perf_counter()
        client.ping()
        render.console.print(f"pong from {client.address} in "
                             f"{(time.perf_counter() - started) * 1000:.2f} ms")
        return ExitStatus.OK
    output = {
        "info": lambda: views.mapping("info", client.info()),
        "drivers": lambda: views.drivers(client.drivers()),
        "devices": lambda: views.devices(client.devices()),
    }[command]()
    render.show(output, args.json)
    return ExitStatus.OK


def _models(args: argparse.Namespace, client: Client) -> ExitStatus:
    if args.models_command == "import":
        if not args.source and not args.path:
            raise KernelError(ErrorCode.BAD_REQUEST, "models import: give a source NAME or --path")
        output = views.imported(client.import_model(args.source, path=args.path, name=args.name,
                                                    **_job_options(args)))
    else:
        output = views.models(client.models())
    render.show(output, args.json)
    return ExitStatus.OK


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--priority`` and ``--timeout``, which every job command takes."""
    return {"priority": args.priority, "timeout": args.timeout}


def _work(args: argparse.Namespace, client: Client) -> ExitStatus:
    """``cancel`` and ``renice`` (the shell's ``kill`` and ``nice``, by their syscalls'
    names)."""
    if args.command == "cancel":
        output = views.cancelled(client.cancel(args.id))
    else:
        output = views.reniced(client.renice(args.id, args.priority))
    render.show(output, args.json)
    return ExitStatus.OK


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (KernelError(BAD_REQUEST), which ``main`` prints like
    any other) and a suggestion for a mistyped command or choice."""

    def error(self, message: str) -> NoReturn:
        raise KernelError(ErrorCode.BAD_REQUEST, f"{self.prog}: {message} (`{self.prog} "
                          "--help` shows the usage)")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        choices = [str(choice) for choice in action.choices]
        if isinstance(action, argparse._SubParsersAction):
            raise argparse.ArgumentError(None, f"unknown command {value!r}"
                                               f"{did_you_mean(str(value), choices)}")
        raise argparse.ArgumentError(action, f"invalid choice {value!r} (choose from "
                                             f"{', '.join(choices)}){did_you_mean(str(value), choices)}")


#: The longest a command's line in ``llmos --help`` is made by :func:`summary`.
SUMMARY_CHARS = 64


def summary(doc: str) -> str:
    """A command's line in ``llmos --help`` from its documentation: the first clause (up
    to ``;`` or a sentence's end); if that is longer than :data:`SUMMARY_CHARS`, without
    its parentheses, then up to its first ``:`` (none counted inside brackets)."""
    text = _clause(doc.strip(), (". ", "; "))
    if len(text) > SUMMARY_CHARS:
        while (shorter := re.sub(r"\s*\([^()]*\)", "", text)) != text:
            text = shorter
    if len(text) > SUMMARY_CHARS:
        text = _clause(text, (": ",))
    return text.rstrip(".")


def _clause(text: str, separators: tuple[str, ...]) -> str:
    """``text`` up to the first of ``separators`` that is outside any brackets."""
    depth = 0
    for index, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0 and text.startswith(separators, index):
            return text[:index]
    return text


def _epilog() -> str:
    return ("`llmos COMMAND --help` (or `llmos help COMMAND`) shows a command's arguments. "
            f"Exit status: {ExitStatus.OK:d} done; {ExitStatus.NOT_DONE:d} not done in time "
            f"(`kernel stop`: the kernel still runs); {ExitStatus.ERROR:d} an error, one line "
            "`error CODE: message` on stderr (TIMEOUT: no kernel answers); "
            f"{ExitStatus.INTERRUPTED:d} Ctrl-C. More in docs/shell.md.")


def build_parser(registry: CommandRegistry | None = None) -> argparse.ArgumentParser:
    """The ``llmos`` parser; the delegated commands' help comes from ``registry`` (default:
    the shell's commands, plugins' included; one whose plugin is off is left out)."""
    parser = _Parser(prog="llmos", epilog=_epilog(),
                     description="Talk to (or run) an llmos kernel: one subcommand per "
                                 "everyday syscall, the shell's job commands, kernel control.")
    parser.add_argument("--version", action="version", version=f"llmos {__version__}")
    parser.add_argument("--address", help="kernel address (default: LLMOS_ADDRESS or the home's)")
    parser.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    help_ = sub.add_parser("help", help="This help, or a command's (`llmos help train`)")
    help_.add_argument("topic", nargs="*", metavar="COMMAND", help="a command (and subcommand)")
    _add_kernel_commands(sub)
    _add_syscall_commands(sub)
    sub.add_parser("demo", help="Start a kernel, run the main job, stop it")
    _add_delegated_commands(sub, registry or _shell_commands())
    _add_local_commands(sub)
    return parser


def _shell_commands() -> CommandRegistry:
    """The shell's command table (imported here: the shell's app imports this module)."""
    from .app import load_commands

    return load_commands()


def _add_kernel_commands(sub: argparse._SubParsersAction) -> None:
    kernel = sub.add_parser("kernel", help="Start, inspect or stop a kernel")
    ksub = kernel.add_subparsers(dest="kernel_command", required=True, metavar="SUBCOMMAND")
    start = ksub.add_parser("start", help="Run a kernel (foreground unless --detach)")
    add_kernel_options(start)
    _keep_global(start, "home")
    start.add_argument("--detach", action="store_true", help="run in the background")
    join = ksub.add_parser("join", help="Run DDP ranks of a kernel's train job from this "
                           "machine (see docs/distributed.md)")
    join.add_argument("rendezvous", metavar="HOST:PORT", help="the job's rendezvous address")
    join.add_argument("--world-size", type=int, required=True, help="ranks in the job in all")
    join.add_argument("--rank", type=int, required=True, help="the first rank to run here")
    join.add_argument("--ranks", type=int, default=1, help="how many ranks to run here")
    ksub.add_parser("status", help="Show the running kernel's info")
    stop = ksub.add_parser("stop", help="Shut the kernel down and wait for its process to exit")
    stop.add_argument("--wait", type=float, default=STOP_WAIT_SECONDS, metavar="SECONDS",
                      help=f"the longest wait for the exit (default {STOP_WAIT_SECONDS:g})")


def _syscall_parser(sub: argparse._SubParsersAction, path: str) -> argparse.ArgumentParser:
    """The subcommand ``path`` (its last word is added to ``sub``), described by the
    syscall it sends (:data:`SYSCALL_OF`)."""
    name, syscall = path.split()[-1], SYSCALLS[SYSCALL_OF[path]]
    line = summary(syscall.doc)
    if any(arg.name == "task" and name in arg.choices for arg in syscall.args):
        line = f"{line} (here: {name})"  # one syscall, one subcommand per task
    return sub.add_parser(name, help=line, description=syscall.doc)


def _add_syscall_commands(sub: argparse._SubParsersAction) -> None:
    for name in ("ping", "info", "drivers", "devices"):
        _syscall_parser(sub, name)
    models = sub.add_parser("models", help="List registry versions (`models list`, the "
                            "default) or import a model (`models import`)")
    msub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    _syscall_parser(msub, "models list")
    imp = _syscall_parser(msub, "models import")
    imp.add_argument("source", nargs="?", help="a named source, e.g. minilm")
    imp.add_argument("--path", help="a local Hugging Face folder (safetensors)")
    imp.add_argument("--name", help="registry name (default: the source or folder name)")
    _add_job_options(imp)
    _syscall_parser(sub, "cancel").add_argument("id", type=int, help="a job id (`llmos ps`)")
    renice = _syscall_parser(sub, "renice")
    renice.add_argument("id", type=int, help="a job id (`llmos ps`)")
    renice.add_argument("priority", type=int, help="nice value, -20 (first) .. 19")


#: What a shell parameter's kind takes, said in a delegated command's help.
_KIND_HELP = {
    "model": "a model: NAME (its serving version) or NAME:VERSION",
    "job": "a job id (`llmos jobs`)",
    "device": "driver:device, e.g. torch:cpu (`llmos devices`)",
    "driver": "a driver (`llmos drivers`)",
    "dataset": "a bundled dataset (`llmos datasets`)",
    "path": "a file or folder",
    "int": "an integer",
    "number": "a number",
}


def _param_help(param: Param) -> str:
    """What ``param`` takes, from its kind, choices and arity."""
    parts = [_KIND_HELP.get(param.kind, "")]
    if param.choices:
        parts.append(f"one of {', '.join(param.choices)}")
    if param.many:
        parts.append("one or more words" if param.required else "any number of words")
    elif param.required:
        parts.append("required")
    return "; ".join(part for part in parts if part)


def _add_delegated_commands(sub: argparse._SubParsersAction, registry: CommandRegistry) -> None:
    """One subcommand per :data:`DELEGATED` shell command in ``registry``: its help is the
    command's (usage, text, parameters). Its words are never parsed here: :func:`parse`
    hands them to the shell command verbatim."""
    for name in DELEGATED:
        command = registry.find(name)
        if command is not None:
            _add_shell_command(sub, command, name)


def _add_shell_command(sub: argparse._SubParsersAction, command: Command, name: str) -> None:
    """Subcommand ``name`` (the command's name or one of its aliases) with its help."""
    others = [n for n in (command.name, *command.aliases) if n != name]
    aliases = f" Also: {', '.join(others)}." if others else ""
    parser = sub.add_parser(name, help=summary(command.help), usage=_usage(command, name),
                            description=command.help + aliases)
    for param in command.params:
        names = [param.flag] if param.option else [param.name]
        options: dict[str, Any] = {"help": _param_help(param), "default": argparse.SUPPRESS}
        if param.kind == "flag":
            options["action"] = "store_true"
        else:
            options["metavar"] = param.shown
            options["nargs"] = None if param.option else "*" if param.many else "?"
        parser.add_argument(*names, **options)


#: Width of a delegated command's usage lines.
USAGE_CHARS = 79


def _usage(command: Command, name: str) -> str:
    """``llmos NAME`` and ``command``'s usage, wrapped between its words' groups (``[--name
    VALUE]`` stays on one line)."""
    groups = [f"llmos {name}", *(p.usage for p in command.positionals),
              *(p.usage for p in command.options)]
    prefix = "usage: "
    text = textwrap.fill(" ".join(g.replace(" ", "\xa0") for g in groups), USAGE_CHARS,
                         initial_indent=prefix, subsequent_indent=" " * len(f"{prefix}{groups[0]} "),
                         break_long_words=False, break_on_hyphens=False)
    return text[len(prefix):].replace("\xa0", " ").replace("%", "%%")


def _add_local_commands(sub: argparse._SubParsersAction) -> None:
    """The commands that need no kernel (``keys``, ``audit``) and ``shell``."""
    keys = sub.add_parser("keys", help="CURVE keys for remote clients (see docs/security.md)")
    kcmd = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    create = kcmd.add_parser("create", help="Make the kernel's key pair (and a client's)")
    create.add_argument("--client", help="also make a key pair for this client name")
    allow = kcmd.add_parser("allow", help="Allow a client's public key with capabilities")
    allow.add_argument("name", help="the client's name")
    allow.add_argument("public_key", help="the client's NAME.key file")
    allow.add_argument("--caps", default="infer", help="comma list of infer, train, admin")
    audit = sub.add_parser("audit", help="The audit log of privileged syscalls")
    audit.add_argument("--limit", type=int, default=50, help="the latest N entries (default 50)")
    shell = sub.add_parser("shell", help="An interactive shell; or run -c COMMANDS or a SCRIPT")
    shell.add_argument("-c", dest="shell_command", metavar="COMMANDS",
                       help="run these commands (';' or newline between them) and exit")
    shell.add_argument("script", nargs="?", help="a file of shell commands, one a line")
    shell.add_argument("--address", help="kernel address")
    shell.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    shell.add_argument("--json", action="store_true", help="machine-readable output")
    _keep_global(shell, "address", "home", "json")


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that creates a job."""
    parser.add_argument("--priority", type=int, help="nice value, -20 (first) .. 19")
    parser.add_argument("--timeout", type=float, help="deadline in seconds")


def _local(args: argparse.Namespace) -> ExitStatus:
    """``keys`` and ``audit``: files under LLMOS_HOME, no kernel needed."""
    home = resolve_home(args)
    if args.command == "audit":
        entries = AuditLog(home).read(args.limit)
        render.show(views.table("audit", ["TIME", "WHO", "SYSCALL", "RESULT", "ARGS"], [
            (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])), e["who"],
             e["syscall"], e["result"], " ".join(f"{k}={v}" for k, v in e["args"].items()))
            for e in entries], data=entries), json_output=args.json)
        return ExitStatus.OK
    store = KeyStore(home)
    if args.keys_command == "allow":
        store.allow(args.name, Path(args.public_key), [c for c in args.caps.split(",") if c])
        render.console.print(f"allowed {args.name} ({args.caps}); restart the kernel to apply")
        return ExitStatus.OK
    store.server_keys(create=True)
    render.console.print(f"kernel key: {store.root / 'server.key'} (give this public file to "
                         "clients as LLMOS_SERVER_KEY)")
    if args.client:
        secret = store.create_client(args.client)
        render.console.print(f"client key: {secret} (the client's LLMOS_CLIENT_KEY); allow it "
                             f"with: llmos keys allow {args.client} {secret.with_suffix('.key')}")
    return ExitStatus.OK


def _keep_global(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Let a subcommand repeat global options: absent there, the global value stays
    (a subparser's own default would otherwise overwrite it)."""
    for action in parser._actions:
        if action.dest in dests:
            action.default = argparse.SUPPRESS


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    """The action holding ``parser``'s subcommands, if it has any."""
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _chosen(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that ``args`` names."""
    while (action := _subcommands(parser)) is not None:
        name = getattr(args, action.dest, None)
        if name not in action.choices:
            break
        parser = action.choices[name]
    return parser


def _command_index(argv: list[str]) -> int:
    """Where the command word is in ``argv`` (``len(argv)`` when there is none)."""
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        index += 1 if "=" in argv[index] or argv[index] not in _GLOBAL_VALUES else 2
    return index


def parse(argv: list[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The parsed arguments; KernelError(BAD_REQUEST) for a usage mistake, with a suggestion
    for a mistyped command or option. No command, or ``-h``/``--help`` among a delegated
    command's words (before a bare ``--``), is the ``help`` command. A delegated command's
    words are kept verbatim in ``rest`` (argparse's REMAINDER would reject one that starts
    with an option, e.g. ``--http``)."""
    parser = parser or build_parser()
    index = _command_index(argv)
    if index == len(argv) and not {*HELP_FLAGS, "--version"} & set(argv):
        return parser.parse_args([*argv, "help"])
    if index < len(argv) and argv[index] in DELEGATED:
        rest = argv[index + 1:]
        if set(HELP_FLAGS) & set(rest[:rest.index("--")] if "--" in rest else rest):
            return parser.parse_args([*argv[:index], "help", argv[index]])
        args = parser.parse_args(argv[:index + 1])
        args.rest = rest
        _check_words(argv[index], rest)
        return args
    args, extras = parser.parse_known_args(argv)
    if extras:
        chosen = _chosen(parser, args)
        options = [o for action in chosen._actions for o in action.option_strings]
        flag = next((word.partition("=")[0] for word in extras if word.startswith("--")), "")
        chosen.error(f"unknown argument(s) {' '.join(extras)}"
                     f"{did_you_mean(flag, options) if flag else ''}")
    return args


def _check_words(name: str, words: list[str]) -> None:
    """A delegated command's words parsed as the shell will, before any kernel is asked:
    KernelError(BAD_REQUEST) ``llmos NAME: ...`` for a mistake (with a suggestion for a
    mistyped option)."""
    command = _shell_commands().find(name)
    if command is None:
        return
    try:
        command.parse(words)
    except KernelError as exc:
        raise KernelError(exc.code, f"llmos {exc.message}") from None


def _help(parser: argparse.ArgumentParser, topic: list[str]) -> ExitStatus:
    """``llmos help [COMMAND [SUBCOMMAND]]``: that (sub)command's help on stdout."""
    for word in topic:
        action = _subcommands(parser)
        if action is None or word not in action.choices:
            choices = list(action.choices) if action is not None else []
            parser.error(f"no command {word!r}{did_you_mean(word, choices)}")
        parser = action.choices[word]
    parser.print_help()
    return ExitStatus.OK


def main(argv: list[str] | None = None) -> int:
    """Run one ``llmos`` command line; returns its :class:`ExitStatus`."""
    try:
        parser = build_parser()
        args = parse(sys.argv[1:] if argv is None else argv, parser)
        return _run(parser, args)
    except SystemExit as exc:  # argparse's own --help and --version
        return int(exc.code or 0)
    except KernelError as exc:
        render.error(exc.code, exc.message)
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Dispatch the parsed command; KernelError for any error."""
    if args.command == "help":
        return _help(parser, args.topic)
    if args.command == "kernel":
        return _kernel(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo()
    if args.command in ("keys", "audit"):
        return _local(args)
    if args.command == "shell" or args.command in DELEGATED:
        from .app import run_shell

        if args.command != "shell":
            args.shell_command, args.script = shlex.join([args.command, *args.rest]), None
        return run_shell(args)
    with Client(resolve_address(args)) as client:
        if args.command == "models":
            return _models(args, client)
        if args.command in ("ping", "info", "drivers", "devices"):
            return _show(args, client)
        return _work(args, client)
