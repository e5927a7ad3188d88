"""All output goes through here: an :class:`~llmos.shell.commands.Output` as rich tables and
text for people or as JSON for programs, one-line errors, and the shell's progress line.
Commands and views return data; only this module prints."""

from __future__ import annotations

import io
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from .commands import Output, Table
from .views import WARNING

#: Piped output gets 120 columns (rich would assume 80 and squeeze the tables).
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True)


def show(output: Output, json_output: bool = False, target: Console | None = None) -> None:
    """Print ``output``: its ``data`` as JSON (nothing when it is None), else text and tables."""
    if json_output:
        if output.data is not None:
            as_json(output.data)
        return
    out = target or console
    for line in output.text.splitlines() if output.text else ():  # warnings stand out
        style = "bold yellow" if line.startswith(WARNING) else None
        out.print(line, markup=False, highlight=False, soft_wrap=True, style=style)
    for table in output.tables:
        out.print(_rich_table(table))


def _rich_table(table: Table) -> RichTable:
    out = RichTable(title=table.title, title_justify="left", header_style="bold")
    for i, column in enumerate(table.columns):
        last = i == len(table.columns) - 1
        out.add_column(column, overflow="fold" if last else "ellipsis", no_wrap=not last)
    for row in table.rows:
        out.add_row(*("-" if v is None else str(v) for v in row))
    return out


def to_ansi(output: Output, width: int) -> str:
    """``output`` rendered for a terminal ``width`` columns wide, as text with ANSI colours."""
    buffer = io.StringIO()
    show(output, target=Console(file=buffer, width=width, force_terminal=True,
                                color_system="standard"))
    return buffer.getvalue()


def as_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_jsonable)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def error(code: str, message: str) -> None:
    """One line on stderr: the error code and the kernel's message, never wrapped."""
    errors.print(f"error {code}: {message}", style="red", markup=False, highlight=False,
                 soft_wrap=True)


def stream(text: str) -> None:
    """Write generated text as it arrives (no markup, no wrapping, flushed at once)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def note(text: str) -> None:
    """A dim line on stderr: what a result says about itself (e.g. a generation's end line),
    kept out of stdout so the answer itself can be piped."""
    errors.print(text, style="dim", markup=False, highlight=False, soft_wrap=True)


def progress(text: str) -> None:
    """Replace the progress line on stderr (terminals only)."""
    if errors.is_terminal:
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()


def end_progress() -> None:
    if errors.is_terminal:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()
