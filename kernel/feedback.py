"""The feedback buffer: labelled examples that clients send with ``learn``, kept durably.

One SQLite file, ``$LLMOS_HOME/feedback.db``, separate from the registry (it grows with
traffic; the registry does not). WAL journal with ``synchronous=FULL``: a batch of
examples is on disk, in one transaction, before ``learn`` answers, so an acknowledged
example survives a crash of the kernel or of the machine. A batch is stored whole or not
at all: a batch that cannot be written (a full disk) is rolled back and ``learn`` fails
with KernelError(INTERNAL) naming the file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .registry import writing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    text TEXT NOT NULL,
    label TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_model ON feedback (model, id);
"""


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example, as stored."""

    id: int
    model: str
    version: int
    text: str
    label: str
    owner: str
    created_at: float


class FeedbackStore:
    """Durable, append-only feedback per model name; safe to use from several threads."""

    def __init__(self, home: Path) -> None:
        self._lock = threading.Lock()
        self.path = Path(home) / "feedback.db"
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, model: str, version: int, owner: str, pairs: list[tuple[str, str]]) -> list[int]:
        """Store ``(text, label)`` pairs in one transaction; their ids, once on disk.
        KernelError(INTERNAL) naming the file, and nothing stored, if it cannot be written."""
        now = time.time()
        what = f"{len(pairs)} feedback example(s) for {model}"
        with self._lock, writing(what, self.path), self._db:
            ids = [self._db.execute(
                "INSERT INTO feedback (model, version, text, label, owner, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (model, version, text, label, owner, now)).lastrowid
                for text, label in pairs]
        return [int(i) for i in ids if i is not None]

    def count(self, model: str) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM feedback WHERE model = ?",
                                    (model,)).fetchone()
        return int(n)

    def examples(self, model: str, after: int = 0, limit: int = 10_000) -> list[Example]:
        """The model's examples with ids above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM feedback WHERE model = ? AND id > ? ORDER BY id LIMIT ?",
                (model, after, limit)).fetchall()
        return [Example(*row) for row in rows]
