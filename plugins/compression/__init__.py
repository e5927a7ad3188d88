"""Built-in compression steps: prune, quantize, lowrank (registered like a third party's).

The kernel imports this module when it builds its plugin manager, so it holds only the
step table and the name of the job's session: the functions and the session (named by
qualname) import torch, ONNX Runtime, OpenVINO and nncf inside the driver host that
compresses.
"""

from __future__ import annotations

from typing import Any

from llmos.contract.hookspecs import hookimpl
from llmos.contract.syscalls import Arg
from llmos.kernel.recipes import StepRegistry, StepSpec
from llmos.kernel.registries import SessionRegistry, SessionSpec
from llmos.shell.commands import (
    JOB_OPTIONS,
    MEASURING_JOB_OPTIONS,
    Command,
    CommandRegistry,
    Param,
)

#: Quantization methods: the form each produces (and so the drivers that serve it).
QUANTIZE_METHODS: dict[str, str] = {
    "openvino-int8": "openvino",  # nncf full post-training quantization, calibrated
    "openvino-int8-weights": "openvino",  # nncf int8 weight compression
    "onnxruntime-int8": "onnx",  # onnxruntime dynamic quantization
    "onnxruntime-int8-static": "onnx",  # onnxruntime static quantization, calibrated
    "torch-int8": "torch",  # torch dynamic int8 Linear layers, applied at load
    "fp16": "torch",
    "bf16": "torch",
}


def _one_lowrank_target(params: dict[str, Any]) -> str | None:
    given = [name for name in ("energy", "budget", "rank") if params[name] is not None]
    if len(given) > 1:
        return f"give one of energy, budget or rank (got {', '.join(given)})"
    return None


STEPS: tuple[StepSpec, ...] = (
    StepSpec("prune", "llmos.plugins.compression.prune:prune", (
        Arg("method", "str", default="magnitude", choices=("magnitude", "heads", "neurons")),
        Arg("sparsity", "float", default=0.5, minimum=0.01, maximum=0.99),
        Arg("recover_steps", "int", default=0, minimum=0, maximum=100_000),
        Arg("learning_rate", "float", default=5e-5, minimum=1e-7, maximum=1.0),
    ), "magnitude: zero the smallest weights of every Linear (made permanent); heads / "
       "neurons: remove that share of attention heads / FFN neurons (matrices shrink); then "
       "`recover_steps` of fine-tuning."),
    StepSpec("quantize", "llmos.plugins.compression.quantize:quantize", (
        Arg("method", "str", default="openvino-int8", choices=tuple(QUANTIZE_METHODS)),
        Arg("samples", "int", default=128, minimum=1, maximum=4096),
    ), "int8 for OpenVINO (nncf), ONNX Runtime or torch, or fp16/bf16; calibrated on "
       "`samples` training rows where the method needs it."),
    StepSpec("lowrank", "llmos.plugins.compression.lowrank:lowrank", (
        Arg("energy", "float", minimum=0.01, maximum=1.0),
        Arg("budget", "float", minimum=0.01, maximum=0.99),
        Arg("rank", "int", minimum=1, maximum=65536),
        Arg("allocation", "str", default="uniform", choices=("uniform", "global")),
        Arg("recover_steps", "int", default=0, minimum=0, maximum=100_000),
        Arg("learning_rate", "float", default=5e-5, minimum=1e-7, maximum=1.0),
    ), "Each encoder Linear becomes two factors of a truncated SVD; the rank keeps `energy` "
       "of the spectrum, or fits a `budget` of the parameters (default 0.5; `allocation` "
       "uniform per layer, or global by energy per parameter), or is `rank`; then "
       "`recover_steps` of fine-tuning distilled from the parent.", consistent=_one_lowrank_target),
)


@hookimpl
def llmos_register_compression_steps(steps: StepRegistry) -> None:
    for spec in STEPS:
        steps.add(spec)


@hookimpl
def llmos_register_sessions(sessions: SessionRegistry) -> None:
    sessions.add(SessionSpec("compress", "llmos.plugins.compression.session:CompressionSession",
                             "a compress job: recipes run, measured, gated and saved"))


_SHELL = "llmos.plugins.compression.shell:"
COMMANDS: tuple[Command, ...] = (
    Command("compress", "Compress a classifier with a recipe of steps (STEP[:KEY=VALUE...],... "
            "e.g. prune:sparsity=0.5,quantize:method=openvino-int8) or --search a grid; gated on "
            "validation accuracy (--max-drop POINTS); prints the report. Long: try it with &.",
            _SHELL + "compress",
            (Param("model", "model", required=True, metavar="MODEL[:VERSION]"),
             Param("data", "dataset", metavar="DATASET"),
             Param("recipe", option=True, metavar="STEPS"), Param("search", "flag", option=True),
             Param("max_drop", "number", option=True, metavar="POINTS"),
             Param("path", "path", option=True), Param("name", option=True),
             Param("plot", "path", option=True, metavar="PNG"),
             Param("max_tokens", "int", option=True, metavar="N"), *MEASURING_JOB_OPTIONS)),
    Command("promote", "Make MODEL:VERSION the version that serves MODEL: loaded where the "
            "serving one is, then switched; no request fails.", _SHELL + "promote",
            (Param("model", "model", required=True, metavar="MODEL:VERSION"), *JOB_OPTIONS)),
)


@hookimpl
def llmos_register_shell_commands(commands: CommandRegistry) -> None:
    for command in COMMANDS:
        commands.add(command)
