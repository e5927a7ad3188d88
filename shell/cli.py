"""The ``llmos`` command: kernel control and one subcommand per everyday syscall."""

from __future__ import annotations

import argparse
import enum
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from llmos import Client, CurveKeys
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

from . import render, views

#: Commands the CLI hands to the shell's command of the same name (one implementation).
DELEGATED_HELP: dict[str, str] = {
    "train": "fine-tune a classifier (progress bar; see `llmos train help`)",
    "evaluate": "measure a classifier on a dataset split",
    "datasets": "the bundled labelled datasets",
    "chat": "ask a generative model and stream the answer (`llmos chat smollm2 'Hello'`)",
    "serve": "the OpenAI-compatible HTTP gateway (`llmos serve --http 127.0.0.1:8000`; a plugin)",
    "learn": "send labelled feedback to a classifier (`llmos learn MODEL --feedback FILE|-`)",
    "update": "learn from a classifier's feedback: train, gate, promote (`llmos update MODEL`)",
    "rollback": "serve again the version that served before the current one (hot swap)",
    "monitor": "a model's monitoring, live (`--plot PNG`: accuracy and drift over time)",
    "compress": "compress a classifier with a recipe, gated on accuracy",
    "promote": "make MODEL:VERSION serve MODEL (hot swap)",
}

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
    #: Nothing answered at the address.
    NO_KERNEL = "no kernel"


@dataclass(frozen=True, slots=True)
class Stopped:
    """The outcome of :func:`stop_kernel`; ``pid`` as the kernel reported it (None when
    nothing answered)."""

    outcome: StopOutcome
    pid: int | None = None


def stop_kernel(address: str, wait: float = STOP_WAIT_SECONDS) -> Stopped:
    """Ask the kernel at ``address`` to shut down and wait, at most ``wait`` seconds, until
    its process has exited: the pid is the one it reports in ``info``, watched here when
    the address is local (ipc or loopback), else until it no longer answers."""
    with Client(address, timeout=SHUTDOWN_SECONDS) as client:
        try:
            pid = int(client.submit("info", {}).result(ANSWER_SECONDS)["pid"])
        except KernelError as exc:
            if exc.code is ErrorCode.TIMEOUT:
                return Stopped(StopOutcome.NO_KERNEL)
            raise
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


def _start(args: argparse.Namespace) -> int:
    """``kernel start``: check the configuration (e.g. --curve's keys) before anything runs;
    then serve in the foreground, or spawn and report the pid that answers (--detach)."""
    config = config_from_args(args)
    if not args.detach:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        KernelServer(config).serve()
        return 0
    running = read_pid_file(config.home)
    if running:
        raise KernelError(ErrorCode.BUSY, f"a kernel (pid {running['pid']}) is already running "
                          f"at {running['address']} for {config.home}; `llmos kernel stop` first")
    curve = curve_client_keys(config.home) if config.curve else None
    record = start_detached(config.home, kernel_argv(args), curve=curve)
    render.console.print(f"kernel pid {record['pid']} listening on {record['address']}")
    return 0


def _stop(args: argparse.Namespace) -> int:
    """``kernel stop``: 0 once the kernel's process has exited; 1 if none answered or it
    still runs after ``--wait`` seconds."""
    address = resolve_address(args)
    stopped = stop_kernel(address, wait=args.wait)
    if stopped.outcome is StopOutcome.NO_KERNEL:
        render.error("TIMEOUT", f"no kernel answered at {address}")
        return 1
    if stopped.outcome is StopOutcome.STILL_RUNNING:
        render.error("TIMEOUT", f"the kernel (pid {stopped.pid}) acknowledged the shutdown but "
                     f"still runs after {args.wait:g} s (`kill {stopped.pid}` ends it)")
        return 1
    render.console.print(f"kernel stopped (pid {stopped.pid} exited)" if is_local(address)
                         else f"kernel stopped (pid {stopped.pid} at {address} no longer answers)")
    return 0


def _kernel(args: argparse.Namespace) -> int:
    if args.kernel_command == "start":
        return _start(args)
    if args.kernel_command == "join":
        from llmos.plugins.parallel.launch import join

        try:
            return join(args.rendezvous, args.world_size, args.rank, args.ranks)
        except ValueError as exc:
            render.error("BAD_REQUEST", str(exc))
            return 2
    if args.kernel_command == "status":
        with Client(resolve_address(args)) as client:
            render.show(views.mapping("kernel", client.info()), args.json)
        return 0
    return _stop(args)


def _show(args: argparse.Namespace, client: Client) -> int:
    command = args.command
    if command == "ping":
        started = time.perf_counter()
        client.ping()
        render.console.print(f"pong from {client.address} in "
                             f"{(time.perf_counter() - started) * 1000:.2f} ms")
        return 0
    output = {
        "info": lambda: views.mapping("info", client.info()),
        "stats": lambda: (views.monitor(client.stats(args.model, version=args.version))
                          if args.model else views.mapping("stats", client.stats())),
        "drivers": lambda: views.drivers(client.drivers()),
        "devices": lambda: views.devices(client.devices()),
        "jobs": lambda: views.jobs(client.jobs(owner=args.owner, finished=not args.running)),
    }[command]()
    render.show(output, args.json)
    return 0


def _models(args: argparse.Namespace, client: Client) -> int:
    if args.models_command == "import":
        if not args.source and not args.path:
            raise KernelError(ErrorCode.BAD_REQUEST, "models import: give a source NAME or --path")
        output = views.imported(client.import_model(args.source, path=args.path, name=args.name,
                                                    **_job_options(args)))
    else:
        output = views.models(client.models())
    render.show(output, args.json)
    return 0


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--priority`` and ``--timeout``, which every job command takes."""
    return {"priority": args.priority, "timeout": args.timeout}


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--version`` and the job options, which every command on a model version takes."""
    return {"version": args.version, **_job_options(args)}


def _work(args: argparse.Namespace, client: Client) -> int:
    command = args.command
    if command == "load":
        output = views.loaded(client.load(args.model, device=args.device,
                                          driver=args.driver, precision=args.precision,
                                          calibrate=args.calibrate, max_seqs=args.max_seqs,
                                          prefix_cache_mb=args.prefix_cache_mb,
                                          replicas=args.replicas, stages=args.stages, **_model_options(args)))
    elif command == "unload":
        output = views.unloaded(client.unload(args.model, device=args.device, **_model_options(args)))
    elif command == "export":
        output = views.exported(client.export(args.model, args.format, **_model_options(args)))
    elif command in ("embed", "classify"):
        if command == "embed":
            output = views.embedded({"embeddings": client.embed(args.model, args.texts,
                                                                **_model_options(args))})
        else:
            output = views.classified(args.texts, {"predictions": client.classify(
                args.model, args.texts, **_model_options(args))})
    elif command == "cancel":
        output = views.cancelled(client.cancel(args.id))
    elif command == "renice":
        output = views.reniced(client.renice(args.id, args.priority))
    else:  # job
        output = views.job(client.job(args.id))
    render.show(output, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="Talk to (or run) an llmos kernel.")
    parser.add_argument("--address", help="kernel address (default: LLMOS_ADDRESS or the home's)")
    parser.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    kernel = sub.add_parser("kernel", help="start, inspect or stop a kernel")
    ksub = kernel.add_subparsers(dest="kernel_command", required=True)
    start = ksub.add_parser("start", help="run a kernel (foreground unless --detach)")
    add_kernel_options(start)
    _keep_global(start, "home")
    start.add_argument("--detach", action="store_true", help="run in the background")
    join = ksub.add_parser("join", help="run DDP ranks of a kernel's train job from this "
                           "machine (see docs/distributed.md)")
    join.add_argument("rendezvous", metavar="HOST:PORT", help="the job's rendezvous address")
    join.add_argument("--world-size", type=int, required=True, help="ranks in the job in all")
    join.add_argument("--rank", type=int, required=True, help="the first rank to run here")
    join.add_argument("--ranks", type=int, default=1, help="how many ranks to run here")
    ksub.add_parser("status", help="show the running kernel's info")
    stop = ksub.add_parser("stop", help="shut the kernel down and wait for its process to exit")
    stop.add_argument("--wait", type=float, default=STOP_WAIT_SECONDS, metavar="SECONDS",
                      help=f"the longest wait for the exit (default {STOP_WAIT_SECONDS:g})")

    for name, text in (("ping", "check the kernel answers"), ("info", "kernel information"),
                       ("drivers", "registered drivers"), ("devices", "driver hosts")):
        sub.add_parser(name, help=text)
    stats = sub.add_parser("stats", help="kernel counters; with a MODEL, its monitoring")
    stats.add_argument("model", nargs="?", help="a model name: its monitoring instead")
    stats.add_argument("--version", type=int, help="the model's version (default: the serving one)")
    jobs = sub.add_parser("jobs", help="list jobs (ps)")
    jobs.add_argument("--running", action="store_true", help="only unfinished jobs")
    jobs.add_argument("--owner", help="only this client's jobs")

    models = sub.add_parser("models", help="list or import models")
    msub = models.add_subparsers(dest="models_command")
    msub.add_parser("list", help="list registry versions")
    imp = msub.add_parser("import", help="import a bundled model or a local folder")
    imp.add_argument("source", nargs="?", help="a named source, e.g. minilm")
    imp.add_argument("--path", help="a local Hugging Face folder (safetensors)")
    imp.add_argument("--name", help="registry name (default: the source or folder name)")
    _add_job_options(imp)

    for name in ("load", "unload"):
        p = sub.add_parser(name, help=f"{name} a model version")
        p.add_argument("model")
        p.add_argument("--version", type=int)
        p.add_argument("--device", help="driver:device, e.g. torch:cpu")
        if name == "load":
            p.add_argument("--driver", help="only this driver (default: every driver, autotuned)")
            p.add_argument("--precision", choices=("f32", "bf16", "int8"),
                           help="the lowest precision allowed (bf16, int8: OpenVINO)")
            p.add_argument("--calibrate", metavar="DATASET|PATH",
                           help="int8: texts to calibrate on (default: the training data)")
            p.add_argument("--replicas", type=int, help="N new hosts of one driver hold it")
            p.add_argument("--stages", type=int, help="split its layers across N hosts")
            p.add_argument("--max-seqs", type=int, help="generative models: most sequences "
                           "in the running batch (default 16)")
            p.add_argument("--prefix-cache-mb", type=int, help="generative models: memory for "
                           "shared prompt prefixes (default 64; 0: off)")
        _add_job_options(p)
    export = sub.add_parser("export", help="export a model version to ONNX or OpenVINO IR")
    export.add_argument("model")
    export.add_argument("--to", dest="format", required=True, choices=("onnx", "openvino"))
    export.add_argument("--version", type=int)
    _add_job_options(export)
    for name in ("embed", "classify"):
        p = sub.add_parser(name, help=f"{name} texts")
        p.add_argument("model")
        p.add_argument("texts", nargs="+")
        p.add_argument("--version", type=int)
        _add_job_options(p)
    for name in ("job", "cancel"):
        sub.add_parser(name, help=f"{name} a job").add_argument("id", type=int)
    renice = sub.add_parser("renice", help="change a job's priority")
    renice.add_argument("id", type=int)
    renice.add_argument("priority", type=int, help="nice value, -20 (first) .. 19")
    sub.add_parser("demo", help="start a kernel, run the main job, stop it")
    for name, text in DELEGATED_HELP.items():
        # One implementation: these run the shell's command of the same name.
        sub.add_parser(name, help=text, add_help=False).add_argument(
            "rest", nargs=argparse.REMAINDER, help="as in the shell (`help train`)")
    keys = sub.add_parser("keys", help="CURVE keys for remote clients (see docs/security.md)")
    kcmd = keys.add_subparsers(dest="keys_command", required=True)
    create = kcmd.add_parser("create", help="make the kernel's key pair (and a client's)")
    create.add_argument("--client", help="also make a key pair for this client name")
    allow = kcmd.add_parser("allow", help="allow a client's public key with capabilities")
    allow.add_argument("name")
    allow.add_argument("public_key", help="the client's NAME.key file")
    allow.add_argument("--caps", default="infer", help="comma list of infer, train, admin")
    audit = sub.add_parser("audit", help="the audit log of privileged syscalls")
    audit.add_argument("--limit", type=int, default=50)
    shell = sub.add_parser("shell", help="an interactive shell; or run -c COMMANDS or a SCRIPT")
    shell.add_argument("-c", dest="shell_command", metavar="COMMANDS",
                       help="run these commands (';' or newline between them) and exit")
    shell.add_argument("script", nargs="?", help="a file of shell commands, one a line")
    shell.add_argument("--address", help="kernel address")
    shell.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    shell.add_argument("--json", action="store_true", help="machine-readable output")
    _keep_global(shell, "address", "home", "json")
    return parser


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """The options of every command that creates a job."""
    parser.add_argument("--priority", type=int, help="nice value, -20 (first) .. 19")
    parser.add_argument("--timeout", type=float, help="deadline in seconds")


def _local(args: argparse.Namespace) -> int:
    """``keys`` and ``audit``: files under LLMOS_HOME, no kernel needed."""
    home = resolve_home(args)
    if args.command == "audit":
        entries = AuditLog(home).read(args.limit)
        render.show(views.table("audit", ["TIME", "WHO", "SYSCALL", "RESULT", "ARGS"], [
            (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])), e["who"],
             e["syscall"], e["result"], " ".join(f"{k}={v}" for k, v in e["args"].items()))
            for e in entries], data=entries), json_output=args.json)
        return 0
    store = KeyStore(home)
    if args.keys_command == "allow":
        store.allow(args.name, Path(args.public_key), [c for c in args.caps.split(",") if c])
        render.console.print(f"allowed {args.name} ({args.caps}); restart the kernel to apply")
        return 0
    store.server_keys(create=True)
    render.console.print(f"kernel key: {store.root / 'server.key'} (give this public file to "
                         "clients as LLMOS_SERVER_KEY)")
    if args.client:
        secret = store.create_client(args.client)
        render.console.print(f"client key: {secret} (the client's LLMOS_CLIENT_KEY); allow it "
                             f"with: llmos keys allow {args.client} {secret.with_suffix('.key')}")
    return 0


def _keep_global(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Let a subcommand repeat global options: absent there, the global value stays
    (a subparser's own default would otherwise overwrite it)."""
    for action in parser._actions:
        if action.dest in dests:
            action.default = argparse.SUPPRESS


#: Commands that run the shell command of the same name with the words that follow.
DELEGATED = tuple(DELEGATED_HELP)
#: Global options that take a value (their value is not a command name).
_GLOBAL_VALUES = ("--address", "--home")


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed arguments. A delegated command's words are kept verbatim in ``rest``
    (argparse's REMAINDER would reject one that starts with an option, e.g. ``--http``)."""
    parser = build_parser()
    index = 0
    while index < len(argv) and argv[index].startswith("-"):
        index += 1 if "=" in argv[index] or argv[index] not in _GLOBAL_VALUES else 2
    if index < len(argv) and argv[index] in DELEGATED:
        args = parser.parse_args(argv[:index + 1])
        args.rest = argv[index + 1:]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
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
            if args.command in ("ping", "info", "drivers", "devices", "stats", "jobs"):
                return _show(args, client)
            return _work(args, client)
    except KernelError as exc:
        render.error(exc.code, exc.message)
        return 2
    except KeyboardInterrupt:
        return 130
