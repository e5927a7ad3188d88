"""Output for people (rich tables) or programs (JSON); commands return data, not text."""

from __future__ import annotations

import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

#: Piped output gets 120 columns (rich would assume 80 and squeeze the tables).
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True)


def human_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def age(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    seconds = max(0.0, datetime.datetime.now().timestamp() - timestamp)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    out = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        last = i == len(columns) - 1
        out.add_column(column, overflow="fold" if last else "ellipsis", no_wrap=not last)
    for row in rows:
        out.add_row(*("-" if v is None else str(v) for v in row))
    console.print(out)


def as_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=_jsonable)
    sys.stdout.write("\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def jobs_table(jobs: list[dict[str, Any]]) -> None:
    table("jobs", ["ID", "OWNER", "SYSCALL", "MODEL", "STATE", "NI", "DEVICE", "CPU s", "MEM",
                   "AGE", "ERROR"],
          [(j["id"], j["owner"], j["syscall"], j["model"], j["state"], j["priority"], j["device"],
            f"{j['cpu_seconds']:.2f}", human_bytes(j["peak_memory"]), age(j["created_at"]),
            j["error"] or "") for j in jobs])


def error(code: str, message: str) -> None:
    """One line on stderr: the error code and the kernel's message, never wrapped."""
    errors.print(f"error {code}: {message}", style="red", markup=False, highlight=False,
                 soft_wrap=True)
