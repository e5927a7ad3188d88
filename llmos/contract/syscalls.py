"""The syscall table: every syscall's arguments, checked at the boundary before any work.

docs/protocol.md documents each entry (a test keeps the two in step). Handlers live in
:mod:`llmos.kernel.core`; this module is pure data plus validation, so the IO thread can
reject bad requests without touching the scheduling loop.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from .protocol import ErrorCode, KernelError, quote

_MISSING = object()

#: Every ``int`` argument fits SQLite's signed 64-bit integers, whatever its own bounds.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Longest ``str`` argument, and longest item of a ``strs`` one, unless the argument sets
#: its own limit (in characters).
MAX_STRING_CHARS = 4096
#: Highest model version and job id a request may name.
MAX_VERSION = 2**31 - 1
MAX_JOB_ID = INT64_MAX
#: Longest owner name: a header ``client`` (256) or a routing id in hex (up to 510).
MAX_OWNER_CHARS = 512
#: Nice values, as in Unix: lower runs first.
MIN_PRIORITY, MAX_PRIORITY = -20, 19
#: Most data-parallel replicas, pipeline stages and DDP ranks one job may ask for.
MAX_REPLICAS, MAX_STAGES, MAX_WORLD_SIZE = 16, 8, 64


class Kind(enum.StrEnum):
    """The types an argument may have."""

    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    #: A list of strings.
    STRS = "strs"
    MAP = "map"
    #: A list of maps.
    MAPS = "maps"


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument: ``kind`` is one of :class:`Kind`; ``minimum``/``maximum`` bound a
    number, or the length of the others (a ``str`` is at most MAX_STRING_CHARS long unless
    ``maximum`` says otherwise; an ``int`` always lies within INT64_MIN..INT64_MAX).
    ``item_maximum`` bounds each item of a ``strs``. Only ``text`` arguments (free text such
    as a prompt) may hold NUL characters; names, paths and options may not."""

    name: str
    kind: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    item_maximum: int = MAX_STRING_CHARS
    text: bool = False

    def __post_init__(self) -> None:
        Kind(self.kind)  # ValueError for a kind that does not exist, when the table is built

    def parse(self, syscall: str, value: Any) -> Any:
        """``value`` checked against this argument (a float for ``float``); KernelError
        (BAD_REQUEST) naming the argument otherwise."""
        where = f"{syscall}: argument {self.name!r}"
        kind = Kind(self.kind)
        if not _KIND_CHECKS[kind](value):
            raise KernelError(
                ErrorCode.BAD_REQUEST, f"{where} must be {_KIND_NAMES[kind]}, "
                f"got {type(value).__name__}")
        if self.choices and value not in self.choices:
            raise KernelError(
                ErrorCode.BAD_REQUEST, f"{where} must be one of {', '.join(self.choices)}, "
                f"got {quote(value)}")
        if kind is Kind.FLOAT and not math.isfinite(value):
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where} must be a finite number")
        self._check_bounds(where, kind, value)
        if kind is Kind.STRS:
            for i, item in enumerate(value):
                if len(item) > self.item_maximum:
                    raise KernelError(ErrorCode.BAD_REQUEST,
                                      f"{where}: item {i} has {len(item)} characters "
                                      f"(limit {self.item_maximum})")
        if not self.text and kind in (Kind.STR, Kind.STRS):
            for item in [value] if kind is Kind.STR else value:
                if "\x00" in item:
                    raise KernelError(ErrorCode.BAD_REQUEST,
                                      f"{where} must not contain a NUL character")
        return float(value) if kind is Kind.FLOAT else value

    def _check_bounds(self, where: str, kind: Kind, value: Any) -> None:
        """The value (a number) or the length (the others) within the argument's bounds."""
        minimum, maximum = self.minimum, self.maximum
        if kind is Kind.INT:
            minimum = INT64_MIN if minimum is None else max(minimum, INT64_MIN)
            maximum = INT64_MAX if maximum is None else min(maximum, INT64_MAX)
        elif kind is Kind.STR and maximum is None:
            maximum = MAX_STRING_CHARS
        size = len(value) if kind in (Kind.STR, Kind.STRS, Kind.MAPS) else value
        if minimum is not None and size < minimum:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where} must be >= {minimum}")
        if maximum is not None and size > maximum:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where} must be <= {maximum}")


_KIND_CHECKS = {
    Kind.STR: lambda v: isinstance(v, str),
    Kind.INT: lambda v: isinstance(v, int) and not isinstance(v, bool),
    Kind.FLOAT: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    Kind.BOOL: lambda v: isinstance(v, bool),
    Kind.STRS: lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
    Kind.MAP: lambda v: isinstance(v, dict),
    Kind.MAPS: lambda v: isinstance(v, list) and all(isinstance(m, dict) for m in v),
}
_KIND_NAMES = {Kind.STR: "a string", Kind.INT: "an integer", Kind.FLOAT: "a number",
               Kind.BOOL: "a boolean", Kind.STRS: "a list of strings", Kind.MAP: "a map",
               Kind.MAPS: "a list of maps"}


#: Unknown argument names quoted in one error message.
MAX_UNKNOWN_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Syscall:
    """A syscall's contract. ``job`` syscalls create a job and reply when it ends."""

    name: str
    args: tuple[Arg, ...]
    doc: str
    job: bool = False

    def parse(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validated arguments with defaults filled in; KernelError(BAD_REQUEST) otherwise."""
        known = {a.name for a in self.args}
        unknown = sorted(quote(key) for key in set(body) - known)
        if unknown:
            shown = ", ".join(unknown[:MAX_UNKNOWN_SHOWN])
            more = f" and {len(unknown) - MAX_UNKNOWN_SHOWN} more" if len(unknown) > MAX_UNKNOWN_SHOWN else ""
            raise KernelError(
                ErrorCode.BAD_REQUEST,
                f"{self.name}: unknown argument(s) {shown}{more}; "
                f"expected {', '.join(sorted(known)) or 'none'}")
        parsed: dict[str, Any] = {}
        for arg in self.args:
            value = body.get(arg.name, _MISSING)
            if value is _MISSING or value is None:
                if arg.required:
                    raise KernelError(
                        ErrorCode.BAD_REQUEST, f"{self.name}: missing argument {arg.name!r}")
                parsed[arg.name] = arg.default
            else:
                parsed[arg.name] = arg.parse(self.name, value)
        return parsed


#: Limits that apply to every kernel (the per-kernel ones are in KernelConfig).
MAX_INPUTS_PER_JOB = 256
MAX_TEXT_CHARS = 100_000
#: Most tokens one ``generate`` may produce, and most chat messages and stop strings.
MAX_NEW_TOKENS = 4096
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024
#: Most labelled examples one ``learn`` call may carry.
MAX_FEEDBACK = 1024

_JOB_OPTIONS = (
    Arg("priority", "int", default=0, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY),
    Arg("timeout", "float", minimum=0.001, maximum=7 * 24 * 3600),
)
#: Train jobs yield to inference: a lower default priority (a higher nice value).
TRAIN_PRIORITY = 10
_MODEL = Arg("model", "str", required=True, minimum=1, maximum=64)
_DATA = (Arg("data", "str", minimum=1, maximum=64), Arg("path", "str", minimum=1, maximum=4096))
_VERSION = Arg("version", "int", minimum=1, maximum=MAX_VERSION)

SYSCALLS: dict[str, Syscall] = {s.name: s for s in (
    Syscall("ping", (), "Liveness check; answered on the IO thread."),
    Syscall("noop", (), "Does nothing, answered by the scheduling loop: measures a "
            "syscall's round trip through the kernel core."),
    Syscall("info", (), "Kernel version, protocol, address, policy, plugins, uptime."),
    Syscall("drivers", (), "Registered drivers, their devices, and why any is unavailable."),
    Syscall("devices", (), "Driver hosts: state, pid, memory, loaded models, restarts."),
    Syscall("models", (), "Registry versions, which version serves each name, where loaded."),
    Syscall("import", (
        Arg("source", "str", minimum=1, maximum=64),
        Arg("path", "str", minimum=1, maximum=4096),
        Arg("name", "str", minimum=1, maximum=64),
        *_JOB_OPTIONS,
    ), "Import a model from a named source (a package) or a local Hugging Face folder.",
        job=True),
    Syscall("export", (
        _MODEL, _VERSION, Arg("format", "str", required=True, choices=("onnx", "openvino")),
        *_JOB_OPTIONS,
    ), "Export a model version to ONNX or OpenVINO IR (cached per version).", job=True),
    Syscall("load", (
        _MODEL, _VERSION, Arg("device", "str", maximum=128), Arg("driver", "str", maximum=64),
        Arg("precision", "str", default="f32", choices=("f32", "bf16", "int8")),
        Arg("calibrate", "str", minimum=1, maximum=4096),
        Arg("max_seqs", "int", minimum=1, maximum=256),
        Arg("prefix_cache_mb", "int", minimum=0, maximum=65536),
        Arg("replicas", "int", default=1, minimum=1, maximum=MAX_REPLICAS),
        Arg("stages", "int", default=1, minimum=1, maximum=MAX_STAGES), *_JOB_OPTIONS,
    ), "Load a model version: onto one device, one driver's, or (default) every driver, "
       "timing each so batches go where they run fastest. precision is the lowest each driver "
       "may use (int8: OpenVINO, calibrated on the calibrate dataset or the version's training "
       "data). Generative models go to drivers that generate; max_seqs caps their running "
       "batch (default 16), prefix_cache_mb their cache of shared prompt prefixes (default 64, "
       "0: off). replicas: N new driver hosts each hold the model; stages: N hosts "
       "each hold a slice of its layers.", job=True),
    Syscall("unload", (_MODEL, _VERSION, Arg("device", "str", maximum=128), *_JOB_OPTIONS),
            "Unload a model version from a device (where it is loaded if not named).", job=True),
    Syscall("infer", (
        _MODEL, _VERSION,
        Arg("task", "str", required=True, choices=("embed", "classify")),
        Arg("inputs", "strs", required=True, minimum=1, maximum=MAX_INPUTS_PER_JOB,
            item_maximum=MAX_TEXT_CHARS, text=True),
        *_JOB_OPTIONS,
    ), "Run embed or classify on a list of texts; batched with compatible jobs.", job=True),
    Syscall("generate", (
        _MODEL, _VERSION,
        Arg("prompt", "str", minimum=1, maximum=MAX_TEXT_CHARS, text=True),
        Arg("messages", "maps", minimum=1, maximum=MAX_MESSAGES),
        Arg("max_tokens", "int", default=256, minimum=1, maximum=MAX_NEW_TOKENS),
        Arg("temperature", "float", minimum=0.0, maximum=2.0),
        Arg("top_p", "float", minimum=0.001, maximum=1.0),
        Arg("stop", "strs", maximum=MAX_STOP_STRINGS, item_maximum=MAX_STOP_CHARS, text=True),
        Arg("seed", "int", minimum=0, maximum=2**63 - 1),
        Arg("ignore_eos", "bool", default=False),
        *_JOB_OPTIONS,
    ), "Generate text from a prompt or chat messages with continuous batching; new text "
       "streams as `token` events; a more urgent job may preempt (and later resume) it.",
        job=True),
    Syscall("learn", (
        _MODEL, _VERSION,
        Arg("examples", "maps", required=True, minimum=1, maximum=MAX_FEEDBACK),
    ), "Labelled feedback for a classifier (text, label), stored durably before the reply; "
       "a batch with a bad example is refused whole."),
    Syscall("datasets", (), "The bundled labelled datasets (users may also pass CSV/JSONL)."),
    Syscall("train", (
        _MODEL, _VERSION, *_DATA,
        Arg("name", "str", minimum=1, maximum=64),
        Arg("epochs", "float", minimum=0.01, maximum=100),
        Arg("batch_size", "int", minimum=1, maximum=1024),
        Arg("learning_rate", "float", minimum=1e-7, maximum=1.0),
        Arg("seed", "int", default=0, minimum=0, maximum=2**31 - 1),
        Arg("max_tokens", "int", default=128, minimum=8, maximum=8192),
        Arg("limit", "int", default=0, minimum=0, maximum=10**7),
        Arg("quantum", "float", default=1.0, minimum=0.05, maximum=600),
        Arg("checkpoint_every", "float", default=30.0, minimum=0.0, maximum=24 * 3600),
        Arg("parallel", "str", default="none", choices=("none", "ddp")),
        Arg("world_size", "int", default=1, minimum=1, maximum=MAX_WORLD_SIZE),
        Arg("local_ranks", "int", minimum=1, maximum=MAX_WORLD_SIZE),
        Arg("master_addr", "str", minimum=1, maximum=255),
        Arg("master_port", "int", minimum=1, maximum=65535),
        Arg("resume", "int", minimum=1, maximum=MAX_JOB_ID),
        Arg("priority", "int", default=TRAIN_PRIORITY, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY),
        Arg("timeout", "float", minimum=0.001, maximum=30 * 24 * 3600),
    ), "Fine-tune a sequence classifier on labelled texts, time-sliced with inference; "
       "epochs, batch_size and learning_rate left out are chosen from the model and the data, "
       "and the weights with the best validation macro-F1 are kept; "
       "the result is a new model version. parallel=ddp runs it as world_size ranks of "
       "torch DistributedDataParallel; resume continues a failed job from its checkpoint.",
        job=True),
    Syscall("evaluate", (
        _MODEL, _VERSION, *_DATA,
        Arg("split", "str", choices=("train", "validation", "test", "all")),
        Arg("seed", "int", default=0, minimum=0, maximum=2**31 - 1),
        *_JOB_OPTIONS,
    ), "Accuracy, macro-F1, balanced accuracy and confusion matrix of a classifier beside the "
       "majority-class baseline, on a file's rows (all of them unless split is given) or a "
       "bundled dataset's split (test by default).",
        job=True),
    Syscall("compress", (
        _MODEL, _VERSION, Arg("recipe", "maps", minimum=1, maximum=16),
        Arg("search", "bool", default=False), *_DATA,
        Arg("name", "str", minimum=1, maximum=64),
        Arg("max_drop", "float", minimum=0.0, maximum=100.0),
        Arg("seed", "int", minimum=0, maximum=2**31 - 1),
        Arg("max_tokens", "int", default=128, minimum=8, maximum=8192),
        Arg("eval_limit", "int", default=0, minimum=0, maximum=10**7),
        Arg("quantum", "float", default=1.0, minimum=0.05, maximum=600),
        Arg("priority", "int", default=TRAIN_PRIORITY, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY),
        Arg("timeout", "float", minimum=0.001, maximum=30 * 24 * 3600),
    ), "Compress a classifier with a recipe of plugin steps (prune, quantize, lowrank...), "
       "gated on validation accuracy; a passing result is a new model version with a report.",
        job=True),
    Syscall("promote", (_MODEL, Arg("version", "int", required=True, minimum=1, maximum=MAX_VERSION),
                        *_JOB_OPTIONS),
            "Make a version the one that serves its model name: load it where the serving one "
            "is, switch, then unload the old one once its jobs are done (no request fails).",
        job=True),
    Syscall("update", (
        _MODEL, _VERSION,
        Arg("method", "str", default="lora", minimum=1, maximum=64),
        Arg("params", "map"),
        Arg("replay", "int", default=300, minimum=0, maximum=100_000),
        Arg("distill", "float", default=1.0, minimum=0.0, maximum=100.0),
        Arg("max_drop", "float", default=2.0, minimum=0.0, maximum=100.0),
        Arg("holdout", "float", default=0.2, minimum=0.05, maximum=0.5),
        Arg("limit", "int", default=0, minimum=0, maximum=100_000),
        Arg("eval_limit", "int", default=0, minimum=0, maximum=10**7),
        Arg("promote", "bool", default=True), *_DATA,
        Arg("seed", "int", default=0, minimum=0, maximum=2**31 - 1),
        Arg("max_tokens", "int", default=128, minimum=8, maximum=8192),
        Arg("quantum", "float", default=1.0, minimum=0.05, maximum=600),
        Arg("priority", "int", default=TRAIN_PRIORITY, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY),
        Arg("timeout", "float", minimum=0.001, maximum=30 * 24 * 3600),
    ), "Learn from a classifier's feedback buffer: an update method (plugins: lora, online, "
       "finetune) trains a candidate with replay of old data and distillation from the "
       "current version, as a low-priority time-sliced job; the candidate is gated on held-out "
       "feedback (must improve) and old data (may drop at most max_drop points), then "
       "promoted or kept as rejected with the reason.", job=True),
    Syscall("rollback", (_MODEL, *_JOB_OPTIONS),
            "Serve the version that served before the current one (the same hot swap as "
            "promote: no request fails).", job=True),
    Syscall("jobs", (Arg("owner", "str", maximum=MAX_OWNER_CHARS),
                     Arg("finished", "bool", default=True)),
            "List jobs (ps): unfinished ones and recent finished ones."),
    Syscall("job", (Arg("id", "int", required=True, minimum=1, maximum=MAX_JOB_ID),), "One job's status."),
    Syscall("cancel", (Arg("id", "int", required=True, minimum=1, maximum=MAX_JOB_ID),),
            "Cancel (kill) a job; its submitter gets CANCELLED."),
    Syscall("renice", (
        Arg("id", "int", required=True, minimum=1, maximum=MAX_JOB_ID),
        Arg("priority", "int", required=True, minimum=MIN_PRIORITY, maximum=MAX_PRIORITY),
    ), "Change a queued or running job's priority (nice value, lower runs first)."),
    Syscall("stats", (Arg("model", "str", minimum=1, maximum=64), _VERSION),
            "Counters: requests, errors, drops, queue depth, jobs, memory; with a model, its "
            "monitoring: traffic, latency, errors, feedback accuracy, drift, alerts."),
    Syscall("shutdown", (), "Stop the kernel: reply, stop driver hosts, exit."),
)}


def check_inputs(inputs: list[str]) -> None:
    """KernelError(BAD_REQUEST) for blank texts (their length is checked by ``Arg.parse``)."""
    for i, text in enumerate(inputs):
        if not text.strip():
            raise KernelError(ErrorCode.BAD_REQUEST, f"infer: input {i} is empty")


#: Roles a chat message may have, and the keys a message may carry.
CHAT_ROLES = ("system", "user", "assistant")
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
#: A chat message's optional ``name`` (the speaker, as in OpenAI's API).
_MESSAGE_NAME = Arg("name", "str", maximum=64)


def check_generation(args: dict[str, Any]) -> None:
    """KernelError(BAD_REQUEST) unless ``generate`` has exactly one of a prompt or a list of
    well-formed chat messages, and non-empty stop strings."""
    prompt, messages = args["prompt"], args["messages"]
    if (prompt is None) == (messages is None):
        raise KernelError(ErrorCode.BAD_REQUEST, "generate: give exactly one of prompt or messages")
    if prompt is not None and not prompt.strip():
        raise KernelError(ErrorCode.BAD_REQUEST, "generate: the prompt is empty")
    total = 0
    for i, message in enumerate(messages or []):
        where = f"generate: message {i}"
        extra = sorted(quote(k) for k in set(message) - _MESSAGE_KEYS)
        if extra:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where} has unknown key(s) "
                              f"{', '.join(extra[:MAX_UNKNOWN_SHOWN])}")
        if message.get("role") not in CHAT_ROLES:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{where}: role must be one of {', '.join(CHAT_ROLES)}, "
                              f"got {quote(message.get('role'))}")
        content = message.get("content")
        if not isinstance(content, str):
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where}: content must be a string")
        if message.get("name") is not None:
            _MESSAGE_NAME.parse(where, message["name"])
        total += len(content)
    if total > MAX_TEXT_CHARS:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"generate: the messages have {total} characters (limit {MAX_TEXT_CHARS})")
    if messages is not None and not any(m["content"].strip() for m in messages):
        raise KernelError(ErrorCode.BAD_REQUEST, "generate: the messages are empty")
    if any(not stop for stop in args["stop"] or []):
        raise KernelError(ErrorCode.BAD_REQUEST, "generate: a stop string is empty")
