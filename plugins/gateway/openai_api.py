"""OpenAI's API shapes: request bodies to syscall arguments, results and errors to JSON.

Pure functions (no sockets), so the HTTP layer stays small and each mapping is testable.
Only what llmos can honour is accepted: asking for ``n`` > 1, ``logprobs``, ``echo``, tools
or token-id prompts is a 400 that says so, never a silently different answer. Embedding
inputs may be token ids (OpenAI's tokenizer's, decoded by :mod:`.token_ids`) and up to
:data:`MAX_EMBEDDING_INPUTS` of them, more than one kernel job takes (the HTTP layer splits
them).

Every body is checked before any of it reaches the kernel (:func:`parse_body`): nesting at
most :data:`MAX_DEPTH` levels, every string valid Unicode (no lone surrogates), every
integer within int64, every number finite. A breach is a 400 whose message names the field
(``messages[0].content``) and whose ``param`` is the top-level field.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import MAX_TEXT_CHARS

#: Kernel error code -> (HTTP status, OpenAI error type).
STATUS = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error"),
    ErrorCode.UNKNOWN_SYSCALL: (400, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "not_found_error"),
    ErrorCode.BUSY: (429, "rate_limit_error"),
    ErrorCode.DENIED: (403, "permission_error"),
    ErrorCode.TIMEOUT: (504, "timeout_error"),
    ErrorCode.CANCELLED: (409, "cancelled_error"),
    ErrorCode.DEVICE_FAILED: (503, "service_unavailable_error"),
    ErrorCode.INTERNAL: (500, "server_error"),
}
#: Default max_tokens when a request names none (OpenAI's completions default is 16).
COMPLETION_MAX_TOKENS = 16
CHAT_MAX_TOKENS = 512
#: Most inputs one /v1/embeddings request may carry (OpenAI's limit); the gateway splits
#: them into kernel jobs of at most MAX_INPUTS_PER_JOB.
MAX_EMBEDDING_INPUTS = 2048
#: Deepest nesting of arrays and objects a body may have (OpenAI's shapes need 4).
MAX_DEPTH = 32
#: Integers anywhere in a body must fit a signed 64-bit integer (msgpack's and SQLite's).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The strings and brackets of a JSON text: enough to measure its nesting without parsing.
_JSON_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
#: A kernel error message's argument name (``generate: argument 'max_tokens' must ...``).
_KERNEL_ARGUMENT = re.compile(r"argument '(\w+)'")
#: Kernel argument names that differ from the OpenAI field they come from.
_OPENAI_FIELD = {"inputs": "input", "version": "model"}


@dataclass
class ApiError(Exception):
    """An error to answer with: HTTP status and OpenAI's error object. (Not frozen: raising
    it through a context manager sets its ``__traceback__``.)"""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def from_kernel(cls, exc: KernelError) -> ApiError:
        """The kernel's error with its HTTP status; ``param`` is the OpenAI field of the
        argument a BAD_REQUEST names, if it names one."""
        status, kind = STATUS.get(exc.code, (500, "server_error"))
        named = _KERNEL_ARGUMENT.search(exc.message) if exc.code is ErrorCode.BAD_REQUEST else None
        param = _OPENAI_FIELD.get(named[1], named[1]) if named else None
        return cls(status, exc.message, kind, str(exc.code).lower(), param)


def bad_field(path: str, problem: str, param: str | None = None) -> ApiError:
    """A 400 about the field at ``path`` (``messages[0].content``), named in the message;
    ``param`` is its top-level field (default: ``path`` itself)."""
    return ApiError(400, f"'{path}' {problem}", param=param or path)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object whose every value the kernel's wire can carry;
    ApiError(400) naming the field otherwise (see the module's docstring)."""
    _check_depth(raw)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    for key, value in body.items():
        field = _printable(key)
        _check_value(key, field, field)
        _check_value(value, field, field)
    return body


def _check_depth(raw: bytes) -> None:
    """ApiError(400) if ``raw`` nests arrays or objects deeper than MAX_DEPTH, naming the
    top-level field the deep value is under (the string just before it at depth 1)."""
    depth, field = 0, ""
    for token in _JSON_TOKENS.finditer(raw):
        text = token[0]
        if text in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise bad_field(field or "body", f"nests arrays and objects deeper than "
                                f"{MAX_DEPTH} levels", field or None)
        elif text in (b"]", b"}"):
            depth -= 1
        elif depth == 1:
            field = text[1:-1].decode("utf-8", "replace")


def _printable(key: str) -> str:
    """A key as it can be shown: any lone surrogate escaped (``\\ud800``)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_value(value: Any, path: str, field: str) -> None:
    """ApiError(400) for a lone surrogate, an integer beyond int64 or a non-finite number
    anywhere in ``value``, found at ``path`` under the top-level ``field`` (the depth is
    bounded by :func:`_check_depth`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad_field(path, f"is not valid Unicode: a lone surrogate "
                            f"U+{ord(value[exc.start]):04X} at character {exc.start}",
                            field) from None
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            digits = str(value)
            shown = digits if len(digits) <= 24 else f"a {len(digits)}-digit number"
            raise bad_field(path, f"is out of range ({shown}): integers must be from "
                            f"{INT64_MIN} to {INT64_MAX}", field)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise bad_field(path, f"must be a finite number, got {value}", field)
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{_printable(key)}"
            _check_value(key, inner, field)
            _check_value(item, inner, field)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]", field)


def split_model(model: Any) -> tuple[str, int | None]:
    """``"smollm2"`` or ``"smollm2:1"`` -> (name, version); the version from 1 to int64's
    maximum."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", param="model")
    name, colon, version = model.partition(":")
    if not name:
        raise ApiError(400, f"'model' has no name in {model!r} (use NAME or NAME:VERSION)",
                       param="model")
    if not colon:
        return name, None
    if not (version.isascii() and version.isdigit() and 1 <= int(version) <= INT64_MAX):
        raise ApiError(400, f"'model' has a bad version in {model!r}: use NAME or "
                       f"NAME:VERSION with VERSION from 1 to {INT64_MAX}", param="model")
    return name, int(version)


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of a completion body."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return bool(stream), bool((options or {}).get("include_usage"))


def _unsupported(body: dict[str, Any]) -> None:
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in ("logprobs", "top_logprobs", "tools", "functions", "suffix"):
        if body.get(name) not in (None, False, []):
            raise ApiError(400, f"'{name}' is not supported", param=name)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", param="echo")


def _sampling(body: dict[str, Any], default_max: int) -> dict[str, Any]:
    """The syscall's sampling arguments (the kernel validates types and ranges)."""
    stop = body.get("stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    args = {"max_tokens": default_max if max_tokens is None else max_tokens,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "stop": [stop] if isinstance(stop, str) else stop, "seed": body.get("seed"),
            "priority": body.get("priority"), "ignore_eos": body.get("ignore_eos")}
    return {k: v for k, v in args.items() if v is not None}


def completion_args(body: dict[str, Any]) -> dict[str, Any]:
    """``generate`` arguments for a /v1/completions body."""
    _unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    name, version = split_model(body.get("model"))
    return {"model": name, "version": version, "prompt": prompt,
            **_sampling(body, COMPLETION_MAX_TOKENS)}


def chat_args(body: dict[str, Any]) -> dict[str, Any]:
    """``generate`` arguments for a /v1/chat/completions body."""
    _unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param="messages")
        if not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}].role must be a string", param="messages")
        role = "system" if message["role"] == "developer" else message["role"]
        converted.append({"role": role, "content": _text_content(message.get("content"), i)})
    name, version = split_model(body.get("model"))
    return {"model": name, "version": version, "messages": converted,
            **_sampling(body, CHAT_MAX_TOKENS)}


def _text_content(content: Any, index: int) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   param="messages")


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """A /v1/embeddings body, checked: the model, and the inputs as texts or as token ids."""

    name: str
    version: int | None
    texts: list[str] | None  # None: the inputs are token ids
    token_ids: list[list[int]] | None
    encoding: str  # float or base64


def embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    """A /v1/embeddings body as OpenAI defines ``input``: a string, a list of strings, a
    list of token ids (one input) or a list of lists of token ids; at most
    :data:`MAX_EMBEDDING_INPUTS` inputs (the gateway splits them into kernel jobs)."""
    texts, token_ids = _embedding_inputs(body.get("input"))
    count = len(texts if texts is not None else token_ids or [])
    if count > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"'input' has {count} inputs (limit {MAX_EMBEDDING_INPUTS} "
                       "a request)", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be float or base64", param="encoding_format")
    if body.get("dimensions") is not None:
        raise ApiError(400, "'dimensions' is not supported", param="dimensions")
    name, version = split_model(body.get("model"))
    return EmbeddingRequest(name, version, texts, token_ids, encoding)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(type(i) is int for i in value)


def _embedding_inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists) of an ``input``; ApiError(400) otherwise."""
    shapes = ("'input' must be a string, a list of strings, a list of token ids or a list "
              "of lists of token ids")
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{shapes} (not empty)", param="input")
    if all(isinstance(item, str) for item in value):
        return value, None
    if _is_ids(value):
        return None, [value]
    if all(_is_ids(item) for item in value):
        for i, ids in enumerate(value):
            if not ids:
                raise bad_field(f"input[{i}]", "is empty (no token ids)", "input")
        return None, value
    kinds = sorted({type(item).__name__ for item in value})
    raise ApiError(400, f"{shapes}; got a list of {' and '.join(kinds)}", param="input")


def check_texts(texts: list[str]) -> None:
    """ApiError(400) naming the first input (by its index in the request, not in a kernel
    job) that is blank or longer than the kernel takes."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise bad_field(f"input[{i}]", "is empty (or only whitespace)", "input")
        if len(text) > MAX_TEXT_CHARS:
            raise bad_field(f"input[{i}]", f"has {len(text)} characters (limit "
                            f"{MAX_TEXT_CHARS})", "input")


def embedding_chunks(count: int, size: int) -> list[range]:
    """The inputs ``0..count-1`` in consecutive chunks of at most ``size`` (one kernel job
    each, answered in order)."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


#: A kernel refusal of a task the model cannot do (``smollm2:1 cannot embed (it can: ...``).
_CANNOT = re.compile(r"^(\S+) cannot (\w+) \(it can: ([^)]*)\)")
#: The OpenAI routes that do each task.
_ROUTE_OF_TASK = {"embed": "/v1/embeddings",
                  "generate": "/v1/chat/completions or /v1/completions"}
_MODEL_FOR_TASK = {"embed": "an embedding model such as minilm",
                   "generate": "a causal language model such as smollm2",
                   "classify": "a model with a classification head"}


def wrong_task(exc: KernelError) -> ApiError | None:
    """For the kernel's refusal of a task the model cannot do, a 400 naming that task, what
    the model can do and which route does it; None for any other error. (The kernel's own
    hint is about one task only: embedding a chat model would be told about classify.)"""
    found = _CANNOT.match(exc.message) if exc.code is ErrorCode.BAD_REQUEST else None
    if found is None:
        return None
    ref, task, can = found[1], found[2], [t.strip() for t in found[3].split(",")]
    routes = [_ROUTE_OF_TASK[t] for t in can if t in _ROUTE_OF_TASK]
    instead = f"; send it to {' or '.join(routes)}" if routes else ""
    needs = _MODEL_FOR_TASK.get(task, "a model that can")
    return ApiError(400, f"{ref} cannot {task}: it can {', '.join(can)}{instead}. To {task}, "
                    f"use {needs}", param="model", code=f"model_cannot_{task}")


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    usage = result["usage"]
    return {**{k: int(usage[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "prompt_tokens_details": {"cached_tokens": int(usage.get("cached_tokens", 0))}}


def completion(result: dict[str, Any], model: str) -> dict[str, Any]:
    return {"id": f"cmpl-{result['job']}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                                         "finish_reason": result["finish_reason"]}],
            "usage": _usage(result)}


def chat_completion(result: dict[str, Any], model: str) -> dict[str, Any]:
    return {"id": f"chatcmpl-{result['job']}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "logprobs": None, "finish_reason": result["finish_reason"]}],
            "usage": _usage(result)}


def chunk(job: int, model: str, chat: bool, text: str | None = None, *, role: bool = False,
          finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed chunk (chat: ``chat.completion.chunk`` with a delta)."""
    created = int(time.time())
    if not chat:
        return {"id": f"cmpl-{job}", "object": "text_completion", "created": created,
                "model": model, "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                             "finish_reason": finish_reason}]}
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"id": f"chatcmpl-{job}", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]}


def usage_chunk(result: dict[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    prefix = "chatcmpl" if chat else "cmpl"
    return {"id": f"{prefix}-{result['job']}", "object": kind, "created": int(time.time()),
            "model": model, "choices": [], "usage": _usage(result)}


def embeddings(vectors: np.ndarray, tokens: int, model: str, encoding: str) -> dict[str, Any]:
    """The response to /v1/embeddings: ``vectors`` in input order, ``tokens`` the model's
    token count."""
    data = []
    for i, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
        value: Any = (base64.b64encode(vector.astype("<f4").tobytes()).decode()
                      if encoding == "base64" else vector.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _model_objects(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenAI's model object by id: every loaded version as ``NAME:VERSION``, and the
    serving one also as ``NAME``."""
    models = {}
    for row in rows:
        if not row["loaded_on"]:
            continue
        ids = [f"{row['model']}:{row['version']}"] + ([row["model"]] if row["serving"] else [])
        for name in ids:
            models[name] = {"id": name, "object": "model", "created": int(row["created_at"]),
                            "owned_by": "llmos"}
    return models


def model_list(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/models``: every loaded version as ``NAME:VERSION``, and the serving one
    also as ``NAME``."""
    models = _model_objects(rows)
    return {"object": "list", "data": [models[name] for name in sorted(models)]}


def model_object(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """``GET /v1/models/{model}``: the object :func:`model_list` lists under that id;
    ApiError(404) in OpenAI's shape (``model_not_found``) for any other id, saying what
    to run when the registry has the model but it is not loaded."""
    found = _model_objects(rows).get(model)
    if found is not None:
        return found
    name, _, version = model.partition(":")
    known = any(row["model"] == name and version in ("", str(row["version"])) for row in rows)
    why = (f"is not loaded (run: llmos load {model})" if known
           else "does not exist (GET /v1/models lists the loaded ones)")
    raise ApiError(404, f"The model '{model}' {why}", "invalid_request_error",
                   "model_not_found", "model")
