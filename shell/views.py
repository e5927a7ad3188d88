"""Syscall results as :class:`~llmos.shell.commands.Output`: the tables and lines that both
the ``llmos`` command and the shell show. Pure functions of the data; no printing."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from .commands import Output, Table

JOB_COLUMNS = ("ID", "OWNER", "SYSCALL", "MODEL", "STATE", "NI", "DEVICE", "CPU s", "MEM", "AGE",
               "ERROR")


def human_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(timestamp: float | None) -> str:
    """How long ago ``timestamp`` (Unix time) was, in s, m or h; ``-`` for none."""
    if not timestamp:
        return "-"
    seconds = max(0.0, datetime.datetime.now().timestamp() - timestamp)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], data: Any = None,
          text: str = "") -> Output:
    """One table as an Output (``data`` for --json)."""
    return Output(data=data, text=text,
                  tables=(Table(title, tuple(columns), tuple(tuple(r) for r in rows)),))


#: Keys whose values are byte counts, or durations in seconds (shown as such by mapping).
_BYTE_KEYS = ("rss", "memory", "bytes", "max_message_bytes")
_SECOND_KEYS = ("uptime", "seconds", "max_queue_delay")


def duration(seconds: float) -> str:
    """``3725.0`` -> ``1h 2m 5s``; under a minute with one decimal (``4.2s``)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    return " ".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def humane(key: str, value: Any) -> str:
    """A value as a person reads it: byte counts in KiB/MiB/GiB, durations in h/m/s, times
    (``*_at``) as local time and age, floats to 4 significant digits, empty maps and lists
    as ``-``; ``key`` (its last dotted part) says which unit applies."""
    name = key.rpartition(".")[2]
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, int | float) and name.endswith(_BYTE_KEYS):
        return human_bytes(value)
    if isinstance(value, int | float) and name.endswith(_SECOND_KEYS):
        return duration(float(value))
    if isinstance(value, int | float) and name.endswith("_at"):  # Unix time
        moment = datetime.datetime.fromtimestamp(value).isoformat(sep=" ", timespec="seconds")
        return f"{moment} ({age(value)} ago)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    return str(value) if value != {} else "-"


def _flat(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested maps as dotted keys (``devices.torch:cpu.rss``), in key order."""
    rows: list[tuple[str, Any]] = []
    for key in sorted(data, key=str):
        value, name = data[key], f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flat(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def mapping(title: str, data: Mapping[str, Any]) -> Output:
    """A KEY/VALUE table of a map: nested maps flattened to dotted keys, sorted, values in
    humane units (:func:`humane`); ``data`` keeps the raw map for --json."""
    return table(title, ("KEY", "VALUE"), [(k, humane(k, v)) for k, v in _flat(data)],
                 data=dict(data))


def message(text: str, data: Any = None) -> Output:
    return Output(data=data, text=text)


def jobs(rows: list[dict[str, Any]], title: str = "jobs") -> Output:
    """The ps table: id, owner, syscall, model, state, nice, device, CPU s, memory, age."""
    return table(title, JOB_COLUMNS,
                 [(j["id"], j["owner"], j["syscall"], j["model"], j["state"], j["priority"],
                   j["device"], f"{j['cpu_seconds']:.2f}", human_bytes(j["peak_memory"]),
                   age(j["created_at"]), j["error"] or "") for j in rows], data=rows)


def models(rows: list[dict[str, Any]]) -> Output:
    return table("models", ("MODEL", "VERSION", "SERVING", "PARENT", "RECIPE", "LOADED ON"),
                 [(m["model"], m["version"], "*" if m["serving"] else "", m["parent"],
                   m["recipe"].get("op"), ", ".join(m["loaded_on"]) or "-") for m in rows], data=rows)


def drivers(rows: list[dict[str, Any]]) -> Output:
    return table("drivers", ("NAME", "DEVICES", "AVAILABLE", "DESCRIPTION / REASON"),
                 [(d["name"], ", ".join(d["devices"]), d["available"],
                   d["description"] if d["available"] else d["reason"]) for d in rows], data=rows)


def devices(rows: list[dict[str, Any]]) -> Output:
    return table("devices", ("NAME", "STATE", "PID", "THREADS", "RSS", "LOADED", "RESTARTS"),
                 [(d["name"], d["state"], d["pid"], d["threads"], human_bytes(d["rss"]),
                   ", ".join(d["loaded"]) or "-", d["restarts"]) for d in rows], data=rows)


def plugins(info: Mapping[str, Any]) -> Output:
    """lsmod: the kernel's registered plugins (from ``info``)."""
    names = list(info["plugins"])
    return table("plugins", ("NAME",), [(n,) for n in names], data=names)


def datasets(rows: list[dict[str, Any]]) -> Output:
    return table("datasets", ("NAME", "DESCRIPTION"),
                 [(d["name"], d["description"]) for d in rows], data=rows)


def _scores(metrics: Mapping[str, Any]) -> str:
    """Accuracy beside the majority class's, macro-F1 and balanced accuracy (scores saved
    before the baseline was reported show without it)."""
    baseline = metrics.get("majority_baseline")
    majority = f" (majority class {baseline['accuracy']:.3f})" if baseline else ""
    balanced = (f", balanced accuracy {metrics['balanced_accuracy']:.3f}"
                if "balanced_accuracy" in metrics else "")
    return (f"accuracy {metrics['accuracy']:.3f}{majority}, macro-F1 {metrics['macro_f1']:.3f}"
            f"{balanced} ({metrics['rows']} rows)")


#: How a line of a command's text that warns starts (render shows it in bold yellow).
WARNING = "warning: "


def _warning(result: Mapping[str, Any]) -> list[str]:
    """The result's warning that the model learned little, as a line (none without one)."""
    return [f"{WARNING}{result['warning']}"] if result.get("warning") else []


def _settings(training: Mapping[str, Any]) -> str:
    """The hyper-parameters a train job used and the step its model was selected at."""
    stopped = ", stopped early" if training["stopped_early"] else ""
    return (f"settings: {training['epochs']:g} epochs, batches of {training['batch_size']}, "
            f"learning rate {training['learning_rate']:.0e}; best validation macro-F1 "
            f"{training['selection_macro_f1']:.3f} at step {training['best_step']}{stopped}")


def trained(result: dict[str, Any]) -> Output:
    lines = [f"trained {result['model']} from {result['parent']} in {result['steps']} steps"]
    if result.get("training"):
        lines.append(_settings(result["training"]))
    lines += [f"{split}: {_scores(result['metrics'][split])}" for split in ("validation", "test")
              if split in result["metrics"]]
    return message("\n".join(lines + _warning(result)), result)


def evaluated(result: dict[str, Any]) -> Output:
    """The scores, any warning, and the confusion matrix (rows: true label, columns:
    predicted)."""
    labels = result["labels"]
    text = "\n".join([f"{result['model']} {result['split']}: {_scores(result)}",
                      *_warning(result)])
    return table(f"confusion on {result['split']} (rows true, columns predicted)",
                 ("", *labels), [(label, *row) for label, row in zip(labels, result["confusion"],
                                                                      strict=True)],
                 data=result, text=text)


def imported(result: dict[str, Any]) -> Output:
    verb = "imported" if result["created"] else "already imported as"
    return message(f"{verb} {result['model']}:{result['version']} ({result['path']})", result)


def loaded(result: dict[str, Any]) -> Output:
    return message(f"loaded {result['model']} on " + ", ".join(
        f"{d} ({result['precision'][d]})" for d in result["devices"]), result)


def unloaded(result: dict[str, Any]) -> Output:
    return message(f"unloaded {result['model']} from {', '.join(result['devices'])}", result)


def exported(result: dict[str, Any]) -> Output:
    state = "exported" if result["created"] else "already exported"
    return message(f"{state} {result['model']} to {result['path']}", result)


def embedded(result: dict[str, Any]) -> Output:
    """The first values of each embedding (``result["embeddings"]``: an (n, dim) array)."""
    return message("\n".join(f"[{i}] dim {v.shape[0]}: {' '.join(f'{x:+.3f}' for x in v[:6])} ..."
                             for i, v in enumerate(result["embeddings"])), result)


def classified(texts: Sequence[str], result: dict[str, Any]) -> Output:
    return table("predictions", ("TEXT", "LABEL", "SCORE"),
                 [(t, p["label"], f"{p['score']:.3f}")
                  for t, p in zip(texts, result["predictions"], strict=True)], data=result)


def generation_end(result: Mapping[str, Any], seconds: float) -> str:
    """A generation's end line: completion tokens, their rate over ``seconds`` (submit to
    result, as the user waited), the time to the first token and the finish reason, e.g.
    ``[42 tokens in 3.1 s, 13.5 tokens/s, first token 0.42 s, finished: stop]``."""
    tokens = int(result["usage"]["completion_tokens"])
    rate = f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "- tokens/s"
    first = result.get("time_to_first_token")
    first_text = "-" if first is None else f"{first:.2f} s"
    return (f"[{tokens} tokens in {seconds:.1f} s, {rate}, first token {first_text}, "
            f"finished: {result['finish_reason']}]")


def cancelled(summary: dict[str, Any]) -> Output:
    return message(f"job {summary['id']} cancelled", summary)


def reniced(summary: dict[str, Any]) -> Output:
    return message(f"job {summary['id']} priority {summary['priority']}", summary)


def job(summary: dict[str, Any]) -> Output:
    return mapping(f"job {summary['id']}", summary)


def progress(summary: dict[str, Any], now: float) -> str:
    """The one-line progress of a job being waited for."""
    where = f" on {summary['device']}" if summary.get("device") else ""
    started = summary.get("started_at") or summary.get("created_at") or now
    done = summary.get("progress") or {}
    loss = f" loss {done['loss']:.3f}" if done.get("loss") is not None else ""
    if {"phase", "fraction"} <= done.keys():  # compress
        steps = f" {done['phase']} ({done['fraction']:.0%})"
    elif "phase" in done:  # update
        steps = f" {done['phase']}{loss}"
    elif {"step", "total_steps"} <= done.keys():  # train
        best = (f" best F1 {done['best_macro_f1']:.3f}"
                if done.get("best_macro_f1") is not None else "")
        steps = f" step {done['step']}/{done['total_steps']}{loss}{best}"
    else:
        steps = ""
    return (f"job {summary['id']} {summary['state']}{where}{steps} "
            f"{max(0.0, now - started):.1f} s (Ctrl-C cancels)")


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def monitor(snapshot: dict[str, Any]) -> Output:
    """One model version's monitoring (``stats MODEL``): traffic, latency, feedback, drift."""
    latency = snapshot["latency_ms"]
    drift = snapshot["drift"]
    feedback = snapshot["feedback"]
    rows = [
        ("requests / texts / errors", f"{snapshot['requests']} / {snapshot['texts']} / "
                                      f"{snapshot['errors']}"),
        ("requests/s (last minute)", _fmt(snapshot["requests_per_s_last_minute"])),
        ("latency p50 / p95 / p99 ms", " / ".join(_fmt(latency[k], 1) for k in ("p50", "p95", "p99"))),
        ("input words (mean)", _fmt(snapshot["input_words"]["mean"], 1)),
        ("confidence (mean)", _fmt(snapshot["confidence"]["mean"])),
        ("feedback: examples / judged", f"{feedback['examples']} / {feedback['judged']} "
                                        f"({snapshot['buffered_feedback']} buffered)"),
        ("feedback accuracy", _fmt(feedback["accuracy"])),
        ("drift PSI: input length", _fmt(drift["input_length"])),
        ("drift PSI: confidence", _fmt(drift["confidence"])),
        ("alerts", "; ".join(f"{a['kind']} PSI {a['psi']}" for a in snapshot["alerts"]) or "none"),
    ]
    return table(f"monitor {snapshot['model']}", ("METRIC", "VALUE"), rows, data=snapshot)
