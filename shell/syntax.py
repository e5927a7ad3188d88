"""The shell's command-line syntax, as pure functions shared by the runner, completer and lexer.

Words are split like a POSIX shell, simplified: whitespace separates words; ``'...'`` quotes
literally; ``"..."`` quotes with ``\\"`` and ``\\\\`` escapes; a backslash outside quotes
escapes the next character; quoted and bare parts next to each other form one word. Outside
quotes ``;`` and a newline end a command, ``&`` ends it and runs it in the background, and
``#`` at the start of a word starts a comment. The tokenizer never fails: an unterminated
quote ends its word at the end of the text (the completer needs that); :func:`split_commands`
is the strict reader that rejects it.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from llmos.contract.protocol import ErrorCode, KernelError

OPERATORS = frozenset(";&\n")


@dataclass(frozen=True, slots=True)
class Token:
    """A word (``op`` empty) or an operator (``op`` is ``";"`` or ``"&"``).

    ``text`` is the word with quotes and escapes removed; ``start``/``end`` span its source.
    """

    text: str
    start: int
    end: int
    quoted: bool = False
    op: str = ""
    unterminated: bool = False


def tokenize(line: str) -> list[Token]:
    """All tokens of ``line`` (comments dropped); never raises."""
    tokens: list[Token] = []
    i, n = 0, len(line)
    while i < n:
        char = line[i]
        if char in OPERATORS:
            tokens.append(Token(char, i, i + 1, op=";" if char == "\n" else char))
            i += 1
        elif char.isspace():
            i += 1
        elif char == "#":
            end = line.find("\n", i)
            i = n if end < 0 else end
        else:
            token = _word(line, i)
            tokens.append(token)
            i = token.end
    return tokens


def _word(line: str, start: int) -> Token:
    """The word that starts at ``start``."""
    out: list[str] = []
    i, n = start, len(line)
    quoted = False
    while i < n and not line[i].isspace() and line[i] not in OPERATORS:
        char = line[i]
        if char in "'\"":
            quoted = True
            close, escapes = char, char == '"'
            i += 1
            while i < n and line[i] != close:
                if escapes and line[i] == "\\" and i + 1 < n and line[i + 1] in '"\\':
                    i += 1
                out.append(line[i])
                i += 1
            if i >= n:
                return Token("".join(out), start, n, quoted=True, unterminated=True)
            i += 1
        elif char == "\\" and i + 1 < n:
            out.append(line[i + 1])
            i += 2
        else:
            out.append(char)
            i += 1
    return Token("".join(out), start, i, quoted=quoted)


@dataclass(frozen=True, slots=True)
class CommandLine:
    """One command: its words, and whether it ends with ``&``."""

    words: list[str]
    background: bool = False


def split_commands(line: str) -> list[CommandLine]:
    """The commands in ``line``; KernelError(BAD_REQUEST) for an unterminated quote or a
    stray operator (``& ps``, ``ps ; ; models``)."""
    commands: list[CommandLine] = []
    words: list[str] = []
    for token in tokenize(line):
        if token.unterminated:
            raise KernelError(ErrorCode.BAD_REQUEST, f"unterminated quote at column {token.start + 1}")
        if not token.op:
            words.append(token.text)
        elif words:
            commands.append(CommandLine(words, background=token.op == "&"))
            words = []
        elif token.op == "&" or token.text == ";":
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"unexpected {token.text!r} at column {token.start + 1}")
    if words:
        commands.append(CommandLine(words))
    return commands


def current_word(text_before_cursor: str) -> tuple[list[str], str, int]:
    """What the cursor is completing: the earlier words of its command, the partial word
    (unquoted), and how many source characters that partial word spans (to replace)."""
    tokens = tokenize(text_before_cursor)
    for index in range(len(tokens) - 1, -1, -1):
        if tokens[index].op:
            tokens = tokens[index + 1:]
            break
    last = tokens[-1] if tokens else None
    if last is None or (last.end < len(text_before_cursor) and not last.unterminated):
        return [t.text for t in tokens], "", 0
    return [t.text for t in tokens[:-1]], last.text, last.end - last.start


def fragments(line: str, commands: Container[str]) -> list[tuple[str, str]]:
    """``line`` as (style class, text) pieces for highlighting: known and unknown command
    names, options, quoted strings, numbers, operators and comments."""
    out: list[tuple[str, str]] = []
    position, first = 0, True
    for token in tokenize(line):
        gap = line[position:token.start]
        if gap:
            out.append(("class:comment" if gap.strip() else "", gap))
        if token.op:
            style, first = "class:operator", True
        elif first:
            style, first = ("class:command" if token.text in commands else "class:unknown"), False
        elif token.text.startswith("--"):
            style = "class:option"
        elif token.quoted:
            style = "class:string"
        elif token.text.lstrip("+-").replace(".", "", 1).isdigit():
            style = "class:number"
        else:
            style = ""
        out.append((style, line[token.start:token.end]))
        position = token.end
    rest = line[position:]
    if rest:
        out.append(("class:comment" if rest.strip() else "", rest))
    return out
