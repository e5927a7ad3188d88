"""The ``compress`` and ``promote`` shell commands (``llmos compress``, ``llmos promote``).

Registered by this plugin through ``llmos_register_shell_commands``; imported the first
time one of them runs. A recipe is typed as ``STEP[:KEY=VALUE...]`` joined by commas, e.g.
``prune:sparsity=0.5,quantize:method=openvino-int8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.shell.commands import JobRequest, Output, ShellContext, Table
from llmos.shell.handlers import split_handle

Args = dict[str, Any]
QUALITY = ("VERSION", "ACCURACY", "DROP", "DROP INTERVAL", "MB", "SMALLER", "GATE")
#: The gate's decision as the quality table shows it.
VERDICTS = {"passed": "pass", "rejected": "FAIL", "undecided": "undecided"}
SPEED = ("VERSION", "RUNTIME", "BATCH 1 ms", "BATCH 32 ms", "SPEED-UP")


def parse_recipe(text: str) -> list[dict[str, Any]]:
    """``"prune:sparsity=0.5,quantize"`` -> ``[{"step": "prune", "sparsity": 0.5},
    {"step": "quantize"}]``; numbers become int or float; BAD_REQUEST for a bad word."""
    recipe = []
    for part in (p.strip() for p in text.split(",")):
        name, *pairs = part.split(":")
        if not name:
            raise KernelError(ErrorCode.BAD_REQUEST, f"compress: empty step in recipe {text!r}")
        step: dict[str, Any] = {"step": name}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise KernelError(ErrorCode.BAD_REQUEST, f"compress: {pair!r} in recipe step "
                                  f"{name!r} is not KEY=VALUE")
            step[key] = _number(value)
        recipe.append(step)
    return recipe


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def compress(context: ShellContext, args: Args) -> JobRequest:
    name, version = split_handle(args["model"])
    if bool(args["recipe"]) == bool(args["search"]):
        raise KernelError(ErrorCode.BAD_REQUEST, "compress: give --recipe STEPS or --search")
    if args["data"] and args["path"]:
        raise KernelError(ErrorCode.BAD_REQUEST, "compress: give a DATASET or --path (not both)")
    path = str(Path(args["path"]).expanduser().resolve()) if args["path"] else None
    request = {"model": name, "version": version, "search": args["search"],
               "recipe": parse_recipe(args["recipe"]) if args["recipe"] else None,
               "data": args["data"], "path": path,
               **{k: args[k] for k in ("name", "max_drop", "seed", "max_tokens", "eval_limit",
                                       "quantum", "priority", "timeout")}}
    plot = Path(args["plot"]).expanduser() if args["plot"] else None
    return JobRequest("compress", request, lambda result: compressed(result, plot))


def promote(context: ShellContext, args: Args) -> JobRequest:
    name, version = split_handle(args["model"])
    if version is None:
        raise KernelError(ErrorCode.BAD_REQUEST, "promote: give MODEL:VERSION, e.g. reviews:3")
    return JobRequest("promote", {"model": name, "version": version, "priority": args["priority"],
                                  "timeout": args["timeout"]}, promoted)


def promoted(result: dict[str, Any]) -> Output:
    where = f" on {', '.join(result['devices'])}" if result.get("devices") else " (not loaded)"
    return Output(data=result, text=f"{result['model']} now serves (was {result['previous']})"
                                    f"{where}")


def rows(result: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(version label, candidate entry or None for the parent, measurements) per line."""
    report = result["report"]
    lines: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
        (result["parent"], None, report["parent"])]
    if "candidates" in report:
        models = result["models"]
        for number, entry in enumerate(report["candidates"]):
            lines.append((models[number] or "-", entry, entry["result"]))
    else:
        lines.append((result["model"] or "-", report, report["result"]))
    return lines


def compressed(result: dict[str, Any], plot: Path | None = None) -> Output:
    """The report as two tables (quality and size; latency), parent first; each version's
    steps, per-layer ranks, the gate's verdict; the Pareto front of a search; a plot."""
    quality, speed, notes = [], [], []
    for label, entry, measured in rows(result):
        runtime, ms = next(iter(measured["latency_ms"].items()))
        parent = entry is None
        quality.append((label, f"{measured['accuracy']:.4f}",
                        "-" if parent else f"{entry['drop']:.2f}",
                        "-" if parent else _interval(entry["gate"]),
                        f"{measured['bytes'] / 1e6:.1f}",
                        "1.00x" if parent else f"{entry['ratios']['size']:.2f}x",
                        "parent" if parent else _verdict(entry["gate"])))
        speed.append((label, runtime, f"{ms['1']:.1f}", f"{ms['32']:.0f}",
                      "1.00x" if parent else f"{entry['ratios']['speedup_batch1']:.2f}x"))
        if parent:
            continue
        notes.append(f"{label}: {' + '.join(_step(s) for s in entry['steps'])}; "
                     f"{entry['gate']['reason']}")
        for step in entry["steps"]:
            if "ranks" in step:
                ranks = ", ".join(f"{name.removeprefix('bert.encoder.')}={rank}"
                                  for name, rank in step["ranks"].items())
                notes.append(f"{label} per-layer ranks: {ranks}")
    if "front" in result["report"]:
        front = [result["models"][i] for i in result["report"]["front"]]
        notes.append(f"Pareto front (size, batch-1 latency, accuracy): {', '.join(front) or 'none'}")
    if plot is not None:
        draw(result, plot)
        notes.append(f"plot written to {plot}")
    return Output(data=result, text="\n".join(notes), tables=(
        Table("accuracy (validation) and size", QUALITY, tuple(quality)),
        Table("latency, 128 tokens (parent: PyTorch fp32 eager)", SPEED, tuple(speed))))


def _verdict(gate: dict[str, Any]) -> str:
    return VERDICTS[gate.get("decision", "passed" if gate["passed"] else "rejected")]


def _interval(gate: dict[str, Any]) -> str:
    """The drop's interval and its confidence (reports since the paired gate), else ``-``."""
    if "interval" not in gate:
        return "-"
    low, high = gate["interval"]
    return f"[{low:+.2f}, {high:+.2f}] {gate['confidence']:.0%}"


def _step(step: dict[str, Any]) -> str:
    params = ",".join(f"{k}={v}" for k, v in step["params"].items()
                      if v is not None and k not in ("samples", "learning_rate"))
    return f"{step['step']}({params})"


def draw(result: dict[str, Any], path: Path) -> None:
    """Size and batch-1 latency against accuracy, one point per version, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (size_axis, speed_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, _entry, measured in rows(result):
        runtime, ms = next(iter(measured["latency_ms"].items()))
        accuracy = measured["accuracy"]
        size_axis.scatter(measured["bytes"] / 1e6, accuracy)
        size_axis.annotate(label, (measured["bytes"] / 1e6, accuracy), fontsize=7)
        speed_axis.scatter(ms["1"], accuracy)
        speed_axis.annotate(f"{label} ({runtime})", (ms["1"], accuracy), fontsize=7)
    size_axis.set(xlabel="weights on disk (MB)", ylabel="validation accuracy")
    speed_axis.set(xlabel="batch-1 latency (ms)", ylabel="validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
