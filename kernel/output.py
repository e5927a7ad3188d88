"""Standard output and error that never fail their writer.

The kernel and its driver hosts write their logs to files under ``LLMOS_HOME/logs``. On a
full disk a write there raises ``OSError`` in whatever printed: a progress bar while a model
loads, a warning from a library. Logging swallows its own failures; plain writes do not. A
process calls :func:`keep_output_from_failing` once at start: from then on a write that the
disk refuses is dropped (and counted), and the work that printed goes on.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class UnfailingStream:
    """A text stream that forwards to ``stream`` and drops what cannot be written."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        #: Writes and flushes dropped because the file refused them.
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self.dropped += 1
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self.dropped += 1

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...
        return getattr(self._stream, name)


def keep_output_from_failing() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (once) so a full disk cannot fail a print."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, UnfailingStream):
            setattr(sys, name, UnfailingStream(stream))
