"""The ``update`` and ``rollback`` shell commands (``llmos update``, ``llmos rollback``).

Registered by this plugin through ``llmos_register_shell_commands``; imported the first
time one of them runs. Method parameters are typed as ``KEY=VALUE`` joined by commas, e.g.
``--params rank=4,learning_rate=0.001``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.plugins.compression.shell import parse_recipe, promoted
from llmos.shell.commands import JobRequest, Output, ShellContext, Table
from llmos.shell.handlers import split_handle

Args = dict[str, Any]
COLUMNS = ("VERSION", "HELD-OUT FEEDBACK", "OLD DOMAIN")
GATE_COLUMNS = ("MEASURE (POINTS)", "ROWS", "WON", "LOST", "MEASURED", "INTERVAL", "CONFIDENCE",
                "TO PASS")
SCORE_COLUMNS = ("VERSION", "ROWS OF", "ACCURACY", "MACRO-F1", "BALANCED", "MAJORITY ACC",
                 "MAJORITY F1")


def parse_params(text: str) -> dict[str, Any]:
    """``"rank=4,targets=query"`` -> ``{"rank": 4, "targets": ["query"]}`` (``targets`` is a
    list: several are joined with ``+``); BAD_REQUEST for a word that is not KEY=VALUE."""
    params = parse_recipe("method:" + text.replace(",", ":"))[0]
    params.pop("step")
    if isinstance(params.get("targets"), str):
        params["targets"] = params["targets"].split("+")
    return params


def update(context: ShellContext, args: Args) -> JobRequest:
    name, version = split_handle(args["model"])
    if args["data"] and args["path"]:
        raise KernelError(ErrorCode.BAD_REQUEST, "update: give --data or --path (not both)")
    request = {"model": name, "version": version, "method": args["method"],
               "params": parse_params(args["params"]) if args["params"] else None,
               "promote": not args["no_promote"], "data": args["data"],
               "path": str(Path(args["path"]).expanduser().resolve()) if args["path"] else None,
               **{k: args[k] for k in ("replay", "distill", "max_drop", "holdout", "limit",
                                       "max_tokens", "seed", "eval_limit", "quantum", "priority",
                                       "timeout")}}
    return JobRequest("update", request, updated)


def updated(result: dict[str, Any]) -> Output:
    report = result["report"]
    gate = report["gate"]
    rows = ((result["parent"], report["current"]["new"], report["current"]["old"]),
            (result["model"], report["candidate"]["new"], report["candidate"]["old"]))
    examples = report["examples"]
    decision = gate.get("decision", "passed" if result["passed"] else "rejected")
    verdict = "promoted" if result["promoted"] else {
        "passed": "passed (not promoted)", "rejected": "rejected",
        "undecided": "undecided (not promoted)"}[decision]
    text = (f"{result['model']} {verdict}: {result['reason']}\n"
            f"{report['method']} on {examples['train']} feedback examples + {report['replay']} "
            f"replayed per epoch, distill {report['distill']:g}, {report['steps']} steps, "
            f"{report['seconds']:.0f} s; measured on {examples['held_out']} held-out and "
            f"{examples['old']} old-domain rows")
    tables = [Table("accuracy: current vs candidate", COLUMNS, rows)]
    if "new" in gate and "old" in gate:  # intervals (reports since the paired gate)
        confidence = f"{gate['confidence']:.0%}"
        tables.append(Table(
            f"paired gate ({gate['method']})", GATE_COLUMNS,
            tuple((label, part["rows"], part["wins"], part["losses"], part[key],
                   f"[{part['interval'][0]:+.2f}, {part['interval'][1]:+.2f}]", confidence, limit)
                  for label, part, key, limit in (
                      ("held-out feedback: gain", gate["new"], "gain", "> 0"),
                      ("old domain: drop", gate["old"], "drop", f"<= {gate['max_drop']:g}")))))
    if "scores" in report:
        tables.append(Table("scores beside the majority class (same rows)", SCORE_COLUMNS, tuple(
            (handle, domain, scores["accuracy"], scores["macro_f1"], scores["balanced_accuracy"],
             scores["majority_baseline"]["accuracy"], scores["majority_baseline"]["macro_f1"])
            for handle, side in ((result["parent"], "current"), (result["model"], "candidate"))
            for domain, scores in (("held-out feedback", report["scores"][side]["new"]),
                                   ("old domain", report["scores"][side]["old"])))))
    return Output(data=result, text=text, tables=tuple(tables))


def rollback(context: ShellContext, args: Args) -> JobRequest:
    name, version = split_handle(args["model"])
    if version is not None:
        raise KernelError(ErrorCode.BAD_REQUEST, "rollback: give MODEL (the serving history "
                          "decides the version); to serve a chosen one: llmos promote MODEL:N")
    return JobRequest("rollback", {"model": name, "priority": args["priority"],
                                   "timeout": args["timeout"]}, promoted)
