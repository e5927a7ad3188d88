"""The built-in shell commands, registered through ``llmos_register_shell_commands`` exactly
like a plugin's (the shell registers this module as a built-in plugin,
:data:`llmos.shell.app.BUILTIN_COMMANDS_PLUGIN`).

It holds only the command table: handlers are named as ``"llmos.shell.handlers:NAME"``
and imported the first time a shell runs one.
"""

from __future__ import annotations

from llmos import hookimpl

from .commands import JOB_OPTIONS, Command, CommandRegistry, Param

_H = "llmos.shell.handlers:"
_MODEL = Param("model", "model", required=True, metavar="MODEL[:VERSION]")
_JOB = Param("id", "job", required=True, metavar="ID")
_TEXTS = (Param("texts", many=True, metavar="TEXT"),
          Param("file", "path", option=True, metavar="PATH"))
_DATA = (Param("data", "dataset", metavar="DATASET"), Param("path", "path", option=True))
_SEED = Param("seed", "int", option=True, metavar="N")
_NONE: tuple[Param, ...] = ()

BUILTIN_COMMANDS: tuple[Command, ...] = (
    Command("help", "List the commands, or show one command's usage and options.", _H + "help_",
            (Param("command", "command"),), aliases=("?",)),
    Command("models", "List registry versions: which one serves, where each is loaded.",
            _H + "models", _NONE),
    Command("import", "Import a model from a named source (e.g. minilm) or a local Hugging "
            "Face folder (--path).", _H + "import_",
            (Param("source"), Param("path", "path", option=True, metavar="DIR"),
             Param("name", option=True), *JOB_OPTIONS)),
    Command("load", "Load a model version onto one device, one driver's devices, or every "
            "driver (default, autotuned); --replicas N: onto N new hosts, batches balanced; "
            "--stages N: its layers split across N hosts (a pipeline).", _H + "load",
            (_MODEL, Param("device", "device", option=True), Param("driver", "driver", option=True),
             Param("precision", option=True, choices=("f32", "bf16", "int8")),
             Param("calibrate", "dataset", option=True, metavar="DATASET|PATH"),
             Param("max_seqs", "int", option=True, metavar="N"),
             Param("prefix_cache_mb", "int", option=True, metavar="MB"),
             Param("replicas", "int", option=True, metavar="N"),
             Param("stages", "int", option=True, metavar="N"), *JOB_OPTIONS)),
    Command("unload", "Unload a model version from a device (everywhere if none is named).",
            _H + "unload", (_MODEL, Param("device", "device", option=True), *JOB_OPTIONS)),
    Command("export", "Export a model version to ONNX or OpenVINO IR (cached per version).",
            _H + "export",
            (_MODEL, Param("format", required=True, choices=("onnx", "openvino")), *JOB_OPTIONS)),
    Command("embed", "Embed texts (the words, or one text a line from --file); prints the "
            "first values of each vector.", _H + "embed", (_MODEL, *_TEXTS, *JOB_OPTIONS)),
    Command("classify", "Classify texts (the words, or one text a line from --file).",
            _H + "classify", (_MODEL, *_TEXTS, *JOB_OPTIONS)),
    Command("chat", "Ask a generative model (e.g. smollm2) and stream its answer (at most "
            "128 tokens unless --max-tokens; sampling from the model's generation config, "
            "else temperature 0.7, top_p 0.9), then an end line; without a PROMPT, chat turn "
            "by turn until an empty line. Ctrl-C stops the answer.", _H + "chat",
            (_MODEL, Param("prompt", many=True, metavar="PROMPT"),
             Param("system", option=True, metavar="TEXT"),
             Param("max_tokens", "int", option=True, metavar="N"),
             Param("temperature", "number", option=True, metavar="T"),
             Param("top_p", "number", option=True, metavar="P"),
             Param("stop", option=True, metavar="TEXT"), _SEED,
             Param("ignore_eos", "flag", option=True), *JOB_OPTIONS),
            aliases=("generate",)),
    Command("learn", "Send labelled feedback to a classifier: rows of a CSV/JSONL file "
            "(--feedback PATH, - for stdin) with text and label, or one --text with its --label.",
            _H + "learn",
            (_MODEL, Param("feedback", "path", option=True, metavar="PATH|-"),
             Param("text", option=True, metavar="TEXT"),
             Param("label", option=True, metavar="LABEL"))),
    Command("datasets", "The bundled labelled datasets that train and evaluate can use.",
            _H + "datasets", _NONE),
    Command("train", "Fine-tune a classifier on a bundled DATASET or a CSV/JSONL file (--path); "
            "the result is a new model version. --parallel ddp --world-size N: N DDP ranks; "
            "--resume JOB: continue a failed job from its checkpoint. Long: try it with &.",
            _H + "train",
            (_MODEL, *_DATA, Param("name", option=True),
             Param("epochs", "number", option=True, metavar="N"),
             Param("batch_size", "int", option=True, metavar="N"),
             Param("learning_rate", "number", option=True, metavar="RATE"), _SEED,
             Param("max_tokens", "int", option=True, metavar="N"),
             Param("limit", "int", option=True, metavar="ROWS"),
             Param("quantum", "number", option=True, metavar="SECONDS"),
             Param("checkpoint_every", "number", option=True, metavar="SECONDS"),
             Param("parallel", option=True, choices=("none", "ddp")),
             Param("world_size", "int", option=True, metavar="N"),
             Param("local_ranks", "int", option=True, metavar="N"),
             Param("master_addr", option=True, metavar="HOST"),
             Param("master_port", "int", option=True, metavar="PORT"),
             Param("resume", "job", option=True, metavar="JOB"), *JOB_OPTIONS)),
    Command("evaluate", "Accuracy, macro-F1 and confusion matrix of a classifier on a dataset "
            "split.", _H + "evaluate",
            (_MODEL, *_DATA, Param("split", option=True, choices=("train", "validation", "test", "all")),
             _SEED, *JOB_OPTIONS)),
    Command("drivers", "Registered drivers, their devices, and why any is unavailable.",
            _H + "drivers", _NONE),
    Command("devices", "Driver hosts: state, pid, memory, loaded models, restarts.",
            _H + "devices", _NONE),
    Command("plugins", "The kernel's registered plugins.", _H + "plugins", _NONE,
            aliases=("lsmod",)),
    Command("ps", "List jobs: unfinished ones, or with --all the recent finished ones too.",
            _H + "ps", (Param("all", "flag", option=True), Param("owner", option=True)),
            aliases=("jobs",)),
    Command("job", "One job's status.", _H + "job", (_JOB,)),
    Command("kill", "Cancel a job (any client's); its submitter gets CANCELLED.", _H + "kill",
            (_JOB,), aliases=("cancel",)),
    Command("nice", "Change a job's priority (nice value -20..19, lower runs first).",
            _H + "nice", (_JOB, Param("priority", "int", required=True, metavar="NICE")),
            aliases=("renice",)),
    Command("wait", "Wait for a job (default: this shell's last background job) with a "
            "progress line, then show its result; Ctrl-C cancels it.", _H + "wait",
            (Param("id", "job", metavar="ID"),), aliases=("fg",)),
    Command("stats", "Kernel counters: requests, errors, queue depth, jobs, memory; with a "
            "MODEL, its monitoring (traffic, latency, feedback accuracy, drift, alerts).",
            _H + "stats", (Param("model", "model", metavar="MODEL[:VERSION]"),)),
    Command("monitor", "A model's monitoring, refreshed every --interval seconds until Ctrl-C: "
            "traffic, latency, errors, feedback accuracy, drift scores, alerts; --plot PNG "
            "draws accuracy and drift over time.", _H + "monitor",
            (_MODEL, Param("interval", "number", option=True, metavar="SECONDS"),
             Param("plot", "path", option=True, metavar="PNG"))),
    Command("top", "A live view of devices, models, queues, throughput and memory; q quits.",
            _H + "top", _NONE),
    Command("ping", "Check the kernel answers, and how fast.", _H + "ping", _NONE),
    Command("info", "Kernel version, protocol, address, policy, plugins, uptime.", _H + "info",
            _NONE),
    Command("shutdown", "Stop the kernel (every unfinished job is cancelled).", _H + "shutdown",
            _NONE),
    Command("quit", "Leave the shell (Ctrl-D does too).", _H + "quit_", _NONE, aliases=("exit",)),
)


@hookimpl
def llmos_register_shell_commands(commands: CommandRegistry) -> None:
    for command in BUILTIN_COMMANDS:
        commands.add(command)
