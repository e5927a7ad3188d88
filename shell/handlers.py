"""Handlers of the built-in shell commands (table in :mod:`llmos.shell.builtin_commands`).

Each takes the shell context and the parsed arguments and returns an Output or, for
syscalls that create a job, a JobRequest that the shell submits (foreground or ``&``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import MAX_FEEDBACK, MAX_INPUTS_PER_JOB
from llmos.data import parse_rows

from . import render, views
from .commands import Command, JobRequest, Output, ShellContext

Args = dict[str, Any]


def split_handle(text: str) -> tuple[str, int | None]:
    """``"minilm:2"`` -> ``("minilm", 2)``; ``"minilm"`` -> ``("minilm", None)``."""
    name, colon, version = text.partition(":")
    if not colon:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise KernelError(ErrorCode.BAD_REQUEST, f"bad model version in {text!r} "
                          "(use NAME or NAME:VERSION, e.g. minilm:1)")
    return name, int(version)


def _job_options(args: Args) -> dict[str, Any]:
    return {"priority": args["priority"], "timeout": args["timeout"]}


def _model(args: Args) -> dict[str, Any]:
    """MODEL[:VERSION] and the job options as syscall arguments."""
    name, version = split_handle(args["model"])
    return {"model": name, "version": version, **_job_options(args)}


def _texts(command: str, args: Args) -> list[str]:
    """The TEXT words followed by the non-blank lines of --file."""
    texts = list(args["texts"])
    if args["file"]:
        path = Path(args["file"]).expanduser()
        try:
            texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{command}: cannot read {path}: "
                              f"{exc.strerror or exc}") from None
    if not texts:
        raise KernelError(ErrorCode.BAD_REQUEST, f"{command}: give TEXT... or --file PATH")
    return texts


#: The chat command's answer length when --max-tokens is not given: a short answer first
#: (the syscall's own default, 256, is for programs).
CHAT_MAX_TOKENS = 128


def chat(context: ShellContext, args: Args) -> Output:
    """Stream the answer to PROMPT, then an end line on stderr (tokens, tokens/s, time to
    first token, finish reason); with no PROMPT, one turn per line read until a blank one
    or end of input (the conversation is kept). Ctrl-C stops the answer being generated
    (the job is cancelled): a one-shot chat ends, a conversation returns to its prompt;
    Ctrl-C at the prompt leaves the conversation."""
    messages = [{"role": "system", "content": args["system"]}] if args["system"] else []
    options = {**_model(args), "max_tokens": args["max_tokens"] or CHAT_MAX_TOKENS,
               "temperature": args["temperature"], "top_p": args["top_p"],
               "stop": [args["stop"]] if args["stop"] else None, "seed": args["seed"],
               "ignore_eos": args["ignore_eos"] or None}
    if args["prompt"]:
        return Output(data=_stream_answer(context, {**options, "messages": messages + [
            {"role": "user", "content": " ".join(args["prompt"])}]}))
    result: dict[str, Any] = {}
    while True:
        try:
            prompt = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            render.stream("\n")
            break
        if not prompt:
            break
        messages.append({"role": "user", "content": prompt})
        try:
            result = _stream_answer(context, {**options, "messages": messages})
        except KeyboardInterrupt:  # the answer was stopped: ask again
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": result["text"]})
    return Output(data=result or None)


def _stream_answer(context: ShellContext, args: dict[str, Any]) -> dict[str, Any]:
    """Submit the generation, print its tokens as they come and its end line; on Ctrl-C
    cancel the job, print where it stopped and re-raise KeyboardInterrupt."""
    started = time.monotonic()
    pending = context.client.submit("generate", {k: v for k, v in args.items() if v is not None},
                                    events=True)
    try:
        for event in pending.stream():
            if event.event == "token":
                render.stream(str(event.body["text"]))
    except KeyboardInterrupt:
        context.client.cancel(pending.job_id())
        render.stream("\n")
        render.note("[stopped: the answer was cancelled]")
        raise
    result = pending.result()
    render.stream("\n")
    render.note(views.generation_end(result, time.monotonic() - started))
    return result


def learn(context: ShellContext, args: Args) -> Output:
    """Send the examples in batches of MAX_FEEDBACK; each batch is acknowledged on disk."""
    if bool(args["feedback"]) == bool(args["text"]) or bool(args["text"]) != bool(args["label"]):
        raise KernelError(ErrorCode.BAD_REQUEST,
                          "learn: give --feedback PATH|- or both --text and --label")
    if args["text"]:
        rows = [(args["text"], args["label"])]
    else:
        rows = list(parse_rows(*_feedback_text(args["feedback"])))
    if not rows:
        raise KernelError(ErrorCode.BAD_REQUEST, "learn: the feedback has no rows")
    name, version = split_handle(args["model"])
    result: dict[str, Any] = {}
    accepted = 0
    for start in range(0, len(rows), MAX_FEEDBACK):
        batch = [{"text": t, "label": label} for t, label in rows[start:start + MAX_FEEDBACK]]
        result = context.client.learn(name, batch, version=version)
        accepted += result["accepted"]
    return Output(data={**result, "accepted": accepted},
                  text=f"{accepted} examples stored for {result['model']} "
                       f"({result['buffered']} in its feedback buffer)")


def _feedback_text(source: str) -> tuple[str, bool, str]:
    """(content, is JSON lines, name for errors) of a feedback file or of stdin (``-``)."""
    if source == "-":
        text = sys.stdin.read()
        return text, text.lstrip().startswith("{"), "stdin"
    path = Path(source).expanduser()
    try:
        return path.read_text(encoding="utf-8"), path.suffix == ".jsonl", str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise KernelError(ErrorCode.BAD_REQUEST, f"learn: cannot read {path}: {exc}") from None


def help_(context: ShellContext, args: Args) -> Output:
    if args["command"]:
        command = context.registry.get(args["command"])
        lines = [f"usage: {command.usage}", command.help]
        if command.aliases:
            lines.append(f"aliases: {', '.join(command.aliases)}")
        return views.message("\n".join(lines), _describe(command))
    commands = list(context.registry)
    return views.table("commands", ("COMMAND", "ALIASES", "DESCRIPTION"),
                       [(c.name, ", ".join(c.aliases), c.help) for c in commands],
                       data=[_describe(c) for c in commands],
                       text="help COMMAND shows its usage. End a job command with & to run it in "
                            "the background; Ctrl-C cancels the job in the foreground.")


def _describe(command: Command) -> dict[str, Any]:
    return {"name": command.name, "aliases": list(command.aliases), "usage": command.usage,
            "help": command.help}


def models(context: ShellContext, args: Args) -> Output:
    return views.models(context.client.models())


def _named_or_path(command: str, args: Args, key: str, shown: str) -> dict[str, Any]:
    """``args[key]`` (a name the kernel knows, ``shown`` in usage) or --path (made
    absolute: the kernel reads it), exactly one of them."""
    if bool(args[key]) == bool(args["path"]):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{command}: give a {shown} or --path "
                          "(not both)")
    path = str(Path(args["path"]).expanduser().resolve()) if args["path"] else None
    return {key: args[key], "path": path}


def import_(context: ShellContext, args: Args) -> JobRequest:
    source = _named_or_path("import", args, "source", "SOURCE")
    return JobRequest("import", {**source, "name": args["name"], **_job_options(args)},
                      views.imported)


def load(context: ShellContext, args: Args) -> JobRequest:
    return JobRequest("load", {**_model(args), "device": args["device"], "driver": args["driver"],
                               "precision": args["precision"], "calibrate": args["calibrate"],
                               "max_seqs": args["max_seqs"],
                               "prefix_cache_mb": args["prefix_cache_mb"], "replicas": args["replicas"],
                               "stages": args["stages"]},
                      views.loaded)


def unload(context: ShellContext, args: Args) -> JobRequest:
    return JobRequest("unload", {**_model(args), "device": args["device"]}, views.unloaded)


def export(context: ShellContext, args: Args) -> JobRequest:
    return JobRequest("export", {**_model(args), "format": args["format"]}, views.exported)


def embed(context: ShellContext, args: Args) -> JobRequest | Output:
    return _infer(context, args, "embed", _texts("embed", args), views.embedded)


def classify(context: ShellContext, args: Args) -> JobRequest | Output:
    texts = _texts("classify", args)
    return _infer(context, args, "classify", texts,
                  lambda result: views.classified(texts, result))


def _infer(context: ShellContext, args: Args, task: str, texts: list[str],
           present: Callable[[dict[str, Any]], Output]) -> JobRequest | Output:
    """One ``infer`` job for up to MAX_INPUTS_PER_JOB texts (job control applies); more
    (a long --file) run as consecutive jobs of that many, in the foreground with a progress
    line, and their results are joined in order."""
    request = {**_model(args), "task": task}
    if len(texts) <= MAX_INPUTS_PER_JOB:
        return JobRequest("infer", {**request, "inputs": texts}, present)
    parts: list[dict[str, Any]] = []
    try:
        for start in range(0, len(texts), MAX_INPUTS_PER_JOB):
            render.progress(f"{task}: {start}/{len(texts)} texts")
            pending = context.client.submit(
                "infer", {**request, "inputs": texts[start:start + MAX_INPUTS_PER_JOB]})
            try:
                parts.append(pending.result())
            except KeyboardInterrupt:
                context.client.cancel(pending.job_id())
                raise
    finally:
        render.end_progress()
    return present(join_results(parts))


def join_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``infer`` results of consecutive slices of the inputs as one: arrays concatenated
    along the rows, ``predictions`` in order, ``tokens`` summed, the rest from the first."""
    joined = dict(parts[0])
    for key, value in parts[0].items():
        if isinstance(value, np.ndarray):
            joined[key] = np.concatenate([part[key] for part in parts])
        elif key == "predictions":
            joined[key] = [row for part in parts for row in part[key]]
        elif key == "tokens":
            joined[key] = sum(int(part[key] or 0) for part in parts)
    joined.pop("job", None)
    joined["jobs"] = [part.get("job") for part in parts]
    return joined


def datasets(context: ShellContext, args: Args) -> Output:
    return views.datasets(context.client.datasets())


_TRAIN_OPTIONS = ("name", "epochs", "batch_size", "learning_rate", "seed", "max_tokens", "limit",
                  "quantum", "checkpoint_every", "parallel", "world_size", "local_ranks",
                  "master_addr", "master_port", "resume")


def train(context: ShellContext, args: Args) -> JobRequest:
    data = {} if args["resume"] and not (args["data"] or args["path"]) else \
        _named_or_path("train", args, "data", "DATASET")  # resume: the old job's data
    return JobRequest("train", {**_model(args), **data, **{k: args[k] for k in _TRAIN_OPTIONS}},
                      views.trained)


def evaluate(context: ShellContext, args: Args) -> JobRequest:
    data = _named_or_path("evaluate", args, "data", "DATASET")
    return JobRequest("evaluate", {**_model(args), **data, "split": args["split"],
                                   "seed": args["seed"]}, views.evaluated)


def drivers(context: ShellContext, args: Args) -> Output:
    return views.drivers(context.client.drivers())


def devices(context: ShellContext, args: Args) -> Output:
    return views.devices(context.client.devices())


def plugins(context: ShellContext, args: Args) -> Output:
    return views.plugins(context.client.info())


def ps(context: ShellContext, args: Args) -> Output:
    return views.jobs(context.client.jobs(owner=args["owner"], finished=args["all"]))


def job(context: ShellContext, args: Args) -> Output:
    return views.job(context.client.job(args["id"]))


def kill(context: ShellContext, args: Args) -> Output:
    return views.cancelled(context.client.cancel(args["id"]))


def nice(context: ShellContext, args: Args) -> Output:
    return views.reniced(context.client.renice(args["id"], args["priority"]))


def wait(context: ShellContext, args: Args) -> Output:
    return context.follow(args["id"])


def stats(context: ShellContext, args: Args) -> Output:
    if args["model"]:
        name, version = split_handle(args["model"])
        return views.monitor(context.client.stats(name, version=version))
    return views.mapping("stats", context.client.stats())


def monitor(context: ShellContext, args: Args) -> Output:
    """Refresh the model's monitoring every --interval seconds until Ctrl-C (one snapshot
    when not interactive); with --plot, draw its history into a PNG once."""
    name, version = split_handle(args["model"])
    interval = args["interval"] or 2.0
    if interval <= 0:
        raise KernelError(ErrorCode.BAD_REQUEST, "monitor: --interval must be > 0")
    if args["plot"]:
        from .monitor_plot import draw

        snapshot = context.client.stats(name, version=version)
        path = Path(args["plot"]).expanduser()
        points = draw(snapshot, path)
        shown = views.monitor(snapshot)
        return Output(data=snapshot, text=f"{points} points of accuracy and drift written to "
                                          f"{path}", tables=shown.tables)
    if not context.interactive:
        return views.monitor(context.client.stats(name, version=version))
    try:
        while True:
            render.console.clear()
            render.show(views.monitor(context.client.stats(name, version=version)))
            time.sleep(interval)
    except KeyboardInterrupt:
        return Output()


def top(context: ShellContext, args: Args) -> Output:
    """Full screen in a terminal; one snapshot otherwise (scripts, ``-c``)."""
    from . import top as screen

    if context.interactive:
        screen.run_top(context.client)
        return Output()
    return screen.gather(screen.sample(context.client, cpu_interval=0.2), None)


def ping(context: ShellContext, args: Args) -> Output:
    started = time.perf_counter()
    context.client.ping()
    ms = (time.perf_counter() - started) * 1000
    return views.message(f"pong from {context.client.address} in {ms:.2f} ms",
                         {"pong": True, "ms": ms})


def info(context: ShellContext, args: Args) -> Output:
    return views.mapping("info", context.client.info())


def shutdown(context: ShellContext, args: Args) -> Output:
    return views.message("kernel stopping", context.client.shutdown())


def quit_(context: ShellContext, args: Args) -> Output:
    raise EOFError
