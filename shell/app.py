"""``llmos shell``: the REPL and the runner for ``-c`` and script files.

:class:`Shell` runs command lines against one kernel and owns job control: a job command
runs in the foreground with a progress line (Ctrl-C cancels the job, not the shell) or,
ending with ``&``, in the background (``wait``/``fg`` bring it back). Errors are one line
with the kernel's code; the shell carries on after any of them. Non-interactive runs stop
at the first error with a non-zero status.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pluggy

from llmos import Client, Pending
from llmos.admin import disabled_from_env, get_plugin_manager
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.states import JobState

from . import hookspecs, render, views
from .cli import resolve_address, resolve_home, start_detached
from .commands import CommandRegistry, JobRequest, Output
from .syntax import CommandLine, split_commands

PROMPT = "llmos> "
#: How long a control syscall (anything but waiting for a job) may take.
CONTROL_TIMEOUT = 15.0
#: How often a waited-for job's progress line is refreshed.
POLL_SECONDS = 0.25
INTERRUPTED = 130


#: The shell's own built-in plugin: its commands, registered through its hook like a plugin's.
BUILTIN_COMMANDS_PLUGIN = "llmos.shell.builtin_commands"


def plugin_manager() -> pluggy.PluginManager:
    """The plugins' manager with the shell's hook specification and built-in commands added
    (LLMOS_DISABLE_PLUGINS applies to them too); a plugin that implements the hook with
    the wrong parameters, or a misspelled hook, raises PluginValidationError."""
    return get_plugin_manager(disabled_from_env(), specs=(hookspecs,),
                              builtins=(BUILTIN_COMMANDS_PLUGIN,))


def load_commands() -> CommandRegistry:
    """Every command the plugins register (built-ins included) through the hook."""
    registry = CommandRegistry()
    plugin_manager().hook.llmos_register_shell_commands(commands=registry)
    return registry


@dataclass(slots=True)
class Background:
    """A job this shell started with ``&``."""

    pending: Pending
    request: JobRequest
    line: str
    reported: bool = False


def _replied(pending: Pending, timeout: float) -> bool:
    """Whether the reply to ``pending`` has arrived, waiting at most ``timeout``."""
    try:
        pending.reply(timeout)
    except KernelError as exc:
        if exc.code is ErrorCode.TIMEOUT:
            return False
        raise
    return True


class Shell:
    """Runs command lines; the :class:`~llmos.shell.commands.ShellContext` of handlers."""

    def __init__(self, client: Client, registry: CommandRegistry, *, interactive: bool = False,
                 json_output: bool = False) -> None:
        self.client = client
        self.registry = registry
        self.interactive = interactive
        self.json_output = json_output
        self.background: dict[int, Background] = {}

    def run_line(self, line: str, where: str = "") -> int:
        """Run every command on ``line``; stop at the first that fails. Returns 0, 2 (an
        error, printed as one line prefixed with ``where``) or 130 (Ctrl-C). ``quit``
        raises EOFError."""
        try:
            commands = split_commands(line)
        except KernelError as exc:
            return self._failed(exc, where)
        for command in commands:
            status = self.run_command(command, where)
            if status:
                return status
        return 0

    def run_command(self, line: CommandLine, where: str = "") -> int:
        try:
            command = self.registry.get(line.words[0])
            result = command.run(self, line.words[1:])
            if isinstance(result, JobRequest):
                result = self._submit(result, line)
            elif line.background:
                raise KernelError(ErrorCode.BAD_REQUEST, f"{command.name} starts no job, so it "
                                  "cannot run in the background (&)")
            render.show(result, self.json_output)
            return 0
        except KernelError as exc:
            return self._failed(exc, where)
        except KeyboardInterrupt:
            return INTERRUPTED
        except EOFError:
            raise
        except Exception as exc:  # a bug in a handler must not end the shell
            return self._failed(KernelError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"),
                                where)

    @staticmethod
    def _failed(exc: KernelError, where: str) -> int:
        render.error(exc.code, f"{where}: {exc.message}" if where else exc.message)
        return 2

    # --- job control ---------------------------------------------------------------------

    def _submit(self, request: JobRequest, line: CommandLine) -> Output:
        pending = self.client.submit(request.syscall, dict(request.args), events=True)
        try:
            job_id = pending.job_id()
        except KernelError as exc:
            if exc.code is ErrorCode.TIMEOUT:
                raise
            # Failed before becoming a job (raised again here), or answered without one.
            return request.present(pending.result())
        if line.background:
            text = " ".join(line.words)
            self.background[job_id] = Background(pending, request, text)
            return views.message(f"[{job_id}] {text} &", {"job": job_id})
        self._until_done(job_id, lambda: _replied(pending, POLL_SECONDS), pending)
        return request.present(pending.result())

    def follow(self, job_id: int | None) -> Output:
        """``wait``/``fg``: see :meth:`ShellContext.follow`."""
        if job_id is None:
            if not self.background:
                raise KernelError(ErrorCode.BAD_REQUEST, "wait: this shell has no background "
                                  "job; give a job ID")
            job_id = max(self.background)
        entry = self.background.pop(job_id, None)
        if entry is not None:
            self._until_done(job_id, lambda: _replied(entry.pending, POLL_SECONDS), entry.pending)
            return entry.request.present(entry.pending.result())
        self._until_done(job_id, lambda: self._finished(job_id))
        return views.job(self.client.job(job_id))

    def _finished(self, job_id: int) -> bool:
        if JobState(self.client.job(job_id)["state"]).finished:
            return True
        time.sleep(POLL_SECONDS)
        return False

    def _until_done(self, job_id: int, done: Callable[[], bool], pending: Pending | None = None) -> None:
        """Call ``done()`` until true, showing the job's progress line in between. Ctrl-C
        cancels the job (and collects ``pending``'s CANCELLED reply), then re-raises."""
        try:
            while not done():
                render.progress(views.progress(self.client.job(job_id), time.time()))
        except KeyboardInterrupt:
            render.end_progress()
            self._cancel(job_id, pending)
            raise
        finally:
            render.end_progress()

    def _cancel(self, job_id: int, pending: Pending | None) -> None:
        try:
            self.client.cancel(job_id)
            if pending is not None:
                _replied(pending, 5.0)
        except KernelError:
            pass  # it ended on its own meanwhile
        render.error(ErrorCode.CANCELLED, f"job {job_id} cancelled (Ctrl-C)")

    def report_background(self) -> None:
        """Say which background jobs have ended since the last prompt (like a Unix shell)."""
        for job_id, entry in sorted(self.background.items()):
            if not entry.reported and _replied(entry.pending, 0.001):
                entry.reported = True
                reply = entry.pending.reply()
                state = "done" if reply.status == "ok" else reply.body.get("code", "failed")
                render.show(views.message(f"[{job_id}] {state}: {entry.line} "
                                          f"(wait {job_id} shows the result)"))


# --- entry points --------------------------------------------------------------------------


def _ensure_kernel(address: str, home: Path, interactive: bool) -> str:
    """The address of a kernel that answers: ``address``, or in an interactive session a
    local kernel started on request. KernelError(TIMEOUT) if there is none."""
    with Client(address) as probe:
        try:
            probe.ping(timeout=2.0)
            return address
        except KernelError as exc:
            if exc.code is not ErrorCode.TIMEOUT:
                raise
            missing = exc  # says why and what to run
    if not interactive:
        raise missing
    try:
        answer = input(f"no kernel answers at {address}; start a local kernel? [Y/n] ")
    except EOFError:
        answer = "n"
    if answer.strip().lower() not in ("", "y", "yes"):
        raise missing
    record = start_detached(home, ["--listen", address])
    render.show(views.message(f"kernel pid {record['pid']} listening on {record['address']} "
                              "(shutdown stops it)"))
    return str(record["address"])


def _script(args: argparse.Namespace) -> tuple[list[str], str] | None:
    """The lines to run and where they come from; None for an interactive session."""
    if args.shell_command is not None:
        return [args.shell_command], ""
    if args.script is not None:
        try:
            return Path(args.script).read_text().splitlines(), args.script
        except OSError as exc:
            raise KernelError(ErrorCode.BAD_REQUEST, f"cannot read {args.script}: "
                              f"{exc.strerror or exc}") from None
    if not sys.stdin.isatty():
        return sys.stdin.read().splitlines(), "<stdin>"
    return None


def run_script(shell: Shell, lines: list[str], source: str) -> int:
    """Run ``lines`` in order; stop at the first failure and return its status."""
    for number, line in enumerate(lines, 1):
        try:
            status = shell.run_line(line, f"{source}:{number}" if source else "")
        except EOFError:
            return 0
        if status:
            return status
    return 0


def run_shell(args: argparse.Namespace) -> int:
    """``llmos shell``: a REPL on a terminal; else run ``-c``, the SCRIPT or stdin."""
    script = _script(args)
    registry = load_commands()
    home = resolve_home(args)
    address = _ensure_kernel(resolve_address(args), home, interactive=script is None)
    with Client(address, timeout=CONTROL_TIMEOUT) as client:
        shell = Shell(client, registry, interactive=script is None, json_output=args.json)
        if script is not None:
            return run_script(shell, *script)
        from .repl import repl

        return repl(shell, address, home)
