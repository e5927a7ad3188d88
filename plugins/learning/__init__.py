"""Built-in incremental learning: the update methods (online, lora, finetune) and the
shell's ``update`` and ``rollback`` commands, registered like a third party's.

The kernel imports this module when it builds its plugin manager, so it holds only the
tables: the methods and the update job's session (named by qualname) import torch and peft
inside the driver host that learns.
"""

from __future__ import annotations

from llmos.contract.hookspecs import hookimpl
from llmos.contract.syscalls import Arg
from llmos.kernel.recipes import StepSpec, UpdateMethodRegistry
from llmos.kernel.registries import SessionRegistry, SessionSpec
from llmos.shell.commands import (
    JOB_OPTIONS,
    MEASURING_JOB_OPTIONS,
    Command,
    CommandRegistry,
    Param,
)

_LR = {"minimum": 1e-7, "maximum": 10.0}
_EPOCHS = {"minimum": 0.01, "maximum": 100.0}
METHODS: tuple[StepSpec, ...] = (
    StepSpec("lora", "llmos.plugins.learning.methods:lora", (
        Arg("rank", "int", default=8, minimum=1, maximum=256),
        Arg("alpha", "float", default=16.0, minimum=0.01, maximum=1024.0),
        Arg("targets", "strs", default=("query", "key", "value", "dense"), minimum=1, maximum=16),
        Arg("learning_rate", "float", default=5e-4, **_LR),
        Arg("epochs", "float", default=3.0, **_EPOCHS),
    ), "LoRA adapters (peft) on the layers named in `targets` (Linear or Embedding), and the "
       "classification head; the version keeps the adapter in PEFT's format under adapter/ and the merged "
       "weights."),
    StepSpec("online", "llmos.plugins.learning.methods:online", (
        Arg("layers", "int", default=2, minimum=0, maximum=1000),
        Arg("learning_rate", "float", default=1e-4, **_LR),
        Arg("epochs", "float", default=3.0, **_EPOCHS),
    ), "Online SGD (AdamW) on the classification head and the top `layers` layers."),
    StepSpec("finetune", "llmos.plugins.learning.methods:finetune", (
        Arg("learning_rate", "float", default=5e-5, **_LR),
        Arg("epochs", "float", default=3.0, **_EPOCHS),
    ), "Every parameter trains (with --replay 0 --distill 0: the naive fine-tune that "
       "forgets)."),
)


@hookimpl
def llmos_register_update_methods(methods: UpdateMethodRegistry) -> None:
    for spec in METHODS:
        methods.add(spec)


@hookimpl
def llmos_register_sessions(sessions: SessionRegistry) -> None:
    sessions.add(SessionSpec("update", "llmos.plugins.learning.session:UpdateSession",
                             "an update job: a candidate learned from feedback, gated and saved"))


_SHELL = "llmos.plugins.learning.shell:"
COMMANDS: tuple[Command, ...] = (
    Command("update", "Learn from MODEL's feedback buffer (llmos learn): --method lora|online|"
            "finetune with --params KEY=VALUE,..., replaying old data and distilling from the "
            "serving version; the candidate is gated row by row against the serving version at 95% "
            "confidence (held-out feedback must improve, old data may drop at most --max-drop "
            "points; too few rows to tell: undecided) and promoted only when it passes, else kept "
            "as a version that does not serve.",
            _SHELL + "update",
            (Param("model", "model", required=True, metavar="MODEL[:VERSION]"),
             Param("method", option=True, choices=tuple(spec.name for spec in METHODS)),
             Param("params", option=True, metavar="KEY=VALUE,..."),
             Param("replay", "int", option=True, metavar="ROWS"),
             Param("distill", "number", option=True, metavar="WEIGHT"),
             Param("max_drop", "number", option=True, metavar="POINTS"),
             Param("holdout", "number", option=True, metavar="FRACTION"),
             Param("limit", "int", option=True, metavar="EXAMPLES"),
             Param("max_tokens", "int", option=True, metavar="N"),
             Param("no_promote", "flag", option=True),
             Param("data", "dataset", option=True, metavar="DATASET"),
             Param("path", "path", option=True), *MEASURING_JOB_OPTIONS)),
    Command("rollback", "Serve again the version of MODEL that served before the current one "
            "(a hot swap: no request fails).", _SHELL + "rollback",
            (Param("model", "model", required=True, metavar="MODEL"), *JOB_OPTIONS)),
)


@hookimpl
def llmos_register_shell_commands(commands: CommandRegistry) -> None:
    for command in COMMANDS:
        commands.add(command)
