"""The interactive loop: a prompt_toolkit PromptSession with history across sessions
(``$LLMOS_HOME/shell_history``), suggestions from history, completion from the kernel and
syntax highlighting. Ctrl-C at the prompt clears the line; Ctrl-D, ``quit`` or ``exit``
leave."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory
from prompt_toolkit.lexers import Lexer
from prompt_toolkit.styles import Style

from . import render, views
from .app import PROMPT, Shell
from .commands import CommandRegistry
from .completer import KernelCompleter
from .syntax import fragments

STYLE = Style.from_dict({
    "command": "bold ansigreen", "unknown": "ansired", "option": "ansicyan",
    "string": "ansiyellow", "number": "ansimagenta", "operator": "bold ansiblue",
    "comment": "italic ansibrightblack",
})


class ShellLexer(Lexer):
    """Highlights each line with :func:`llmos.shell.syntax.fragments`."""

    def __init__(self, registry: CommandRegistry) -> None:
        self.registry = registry

    def lex_document(self, document: Document) -> Callable[[int], list[tuple[str, str]]]:
        lines = document.lines
        return lambda number: fragments(lines[number], self.registry) if number < len(lines) else []


def repl(shell: Shell, address: str, home: Path) -> int:
    """Prompt and run commands until Ctrl-D or ``quit``; always returns 0."""
    home.mkdir(parents=True, exist_ok=True)
    completer = KernelCompleter(address, shell.registry)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(home / "shell_history")), auto_suggest=AutoSuggestFromHistory(),
        completer=completer, lexer=ShellLexer(shell.registry), style=STYLE)
    render.show(views.message(f"llmos shell on {address}; help lists the commands, "
                              "Ctrl-D leaves"))
    try:
        while True:
            shell.report_background()
            try:
                line = session.prompt(PROMPT)
            except KeyboardInterrupt:
                continue
            shell.run_line(line)
            completer.invalidate()
    except EOFError:
        return 0
    finally:
        completer.close()
