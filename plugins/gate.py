"""Quality gates that decide with a confidence bound: the candidate against the current
version on the same rows.

Both gates (an update's: :mod:`llmos.plugins.learning.session`; a compression's:
:mod:`llmos.plugins.compression.session`) score the current version and the candidate on the
same rows and compare them row by row. Only the rows where exactly one of the two is right
tell them apart: ``wins`` (only the candidate is right) and ``losses`` (only the current
version is). The change in accuracy is ``(wins - losses) / rows``.

The interval is **Tango's score interval** for a difference of paired proportions (Tango,
Statistics in Medicine 17:891-908, 1998; compared with the other paired intervals by
Fagerland, Lydersen and Laake, Statistics in Medicine 33:2850-2875, 2014): every difference
that the score test of that difference does not reject at the chosen confidence. At a
difference of zero that test is McNemar's. It is two-sided (``confidence`` 0.95: each end
is a 97.5% one-sided bound, the convention of non-inferiority trials), it needs no
resampling (the same rows always give the same interval), and it stays wide when there are
few rows even if none disagree. Conditional intervals (exact McNemar on
the discordant rows) and the bootstrap both shrink to a point then.

A check has one of three outcomes:

- ``passed``: the whole interval is on the good side (the old domain's drop at most
  ``max_drop`` points; the new domain's gain above zero).
- ``rejected``: the measured change itself fails the criterion.
- ``undecided``: the measured change meets the criterion but the interval reaches past it.
  There are too few rows to decide, and the candidate is not promoted.

A gate passes only when every check passes. It is rejected when any check is rejected, and
undecided otherwise. Pure Python, so that the kernel's tests and tools can use it without
torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal

Decision = Literal["passed", "rejected", "undecided"]
#: The default confidence of every interval (two-sided).
CONFIDENCE = 0.95
#: The interval's name, as reports give it.
METHOD = "Tango score interval, paired (McNemar)"
_BISECTIONS = 100


@dataclass(frozen=True, slots=True)
class PairedChange:
    """How the candidate's accuracy differs from the current version's on the same rows."""

    rows: int
    #: Rows both versions get right.
    both: int
    #: Rows only the candidate gets right.
    wins: int
    #: Rows only the current version gets right.
    losses: int
    confidence: float
    #: Interval of the change in accuracy (candidate - current), as fractions.
    low: float
    high: float

    @property
    def change(self) -> float:
        """The measured change in accuracy (candidate - current), a fraction."""
        return (self.wins - self.losses) / self.rows if self.rows else 0.0

    @property
    def current(self) -> float:
        return (self.both + self.losses) / self.rows if self.rows else 0.0

    @property
    def candidate(self) -> float:
        return (self.both + self.wins) / self.rows if self.rows else 0.0


def paired_change(current: Sequence[bool], candidate: Sequence[bool],
                  confidence: float = CONFIDENCE) -> PairedChange:
    """Compare per-row correctness (``current[i]``: the current version got row ``i``
    right) on the same rows."""
    if len(current) != len(candidate):
        raise ValueError(f"paired rows differ in number: {len(current)} vs {len(candidate)}")
    both = sum(1 for a, b in zip(current, candidate, strict=True) if a and b)
    wins = sum(1 for a, b in zip(current, candidate, strict=True) if b and not a)
    losses = sum(1 for a, b in zip(current, candidate, strict=True) if a and not b)
    low, high = score_interval(wins, losses, len(current), confidence)
    return PairedChange(len(current), both, wins, losses, confidence, low, high)


def _score(delta: float, wins: int, losses: int, rows: int) -> float:
    """Tango's score statistic for the difference ``delta`` (a fraction)."""
    a = 2 * rows
    b = -wins - losses + (2 * rows - wins + losses) * delta
    c = -losses * delta * (1 - delta)
    # the restricted maximum-likelihood estimate of P(only the current version is right)
    p_losses = (math.sqrt(max(0.0, b * b - 4 * a * c)) - b) / (2 * a)
    variance = rows * (2 * p_losses + delta * (1 - delta))
    numerator = wins - losses - rows * delta
    if variance <= 0:
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def score_interval(wins: int, losses: int, rows: int,
                   confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Tango's two-sided ``confidence`` interval for ``(wins - losses) / rows``, as
    fractions in [-1, 1]. With no rows, (-1, 1)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if rows <= 0:
        return -1.0, 1.0
    if wins < 0 or losses < 0 or wins + losses > rows:
        raise ValueError(f"{wins} wins and {losses} losses do not fit {rows} rows")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    estimate = (wins - losses) / rows

    def cross(inner: float, outer: float) -> float:
        """The point between ``inner`` (|score| <= z) and ``outer`` where |score| reaches z."""
        if abs(_score(outer, wins, losses, rows)) <= z:
            return outer
        for _ in range(_BISECTIONS):
            middle = (inner + outer) / 2
            if abs(_score(middle, wins, losses, rows)) <= z:
                inner = middle
            else:
                outer = middle
        return inner

    return cross(estimate, -1.0), cross(estimate, 1.0)


def rows_needed(max_drop: float, confidence: float = CONFIDENCE) -> int | None:
    """The fewest rows on which a candidate that changes no answer (no wins, no losses)
    bounds its drop within ``max_drop`` points; None when none do (``max_drop`` 0)."""
    share = max_drop / 100
    if share <= 0:
        return None
    if share >= 1:
        return 1
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    # with no wins and no losses the interval is +-z^2 / (rows + z^2)
    return max(1, math.ceil(z * z * (1 - share) / share))


@dataclass(frozen=True, slots=True)
class Check:
    """One criterion's outcome, its reason, and the numbers behind it (for reports)."""

    decision: Decision
    reason: str
    report: dict[str, Any]


def _points(fraction: float) -> float:
    return round(100 * fraction, 2)


def _evidence(change: PairedChange, low: float, high: float, of: str) -> str:
    """``95% interval of the drop [+0.10, +2.50] on 1,281 rows (12 won, 40 lost)``."""
    return (f"{change.confidence:.0%} interval of the {of} [{100 * low:+.2f}, {100 * high:+.2f}] "
            f"on {change.rows:,} rows ({change.wins} won, {change.losses} lost)")


def drop_at_most(change: PairedChange, max_drop: float, what: str = "accuracy") -> Check:
    """The candidate's accuracy falls by at most ``max_drop`` points: passed when the
    interval's largest drop is within it. ``what`` names the measure in the reason."""
    drop, drop_low, drop_high = -change.change, -change.high, -change.low
    scores = f"({change.current:.4f} -> {change.candidate:.4f})"
    evidence = _evidence(change, drop_low, drop_high, "drop")
    report = {"rows": change.rows, "wins": change.wins, "losses": change.losses,
              "current": round(change.current, 4), "candidate": round(change.candidate, 4),
              "drop": _points(drop), "interval": [_points(drop_low), _points(drop_high)],
              "confidence": change.confidence, "max_drop": max_drop}
    if change.rows == 0:
        return Check("undecided", f"no rows to measure {what} on", report)
    if 100 * drop_high <= max_drop:
        return Check("passed", f"{what} {-100 * drop:+.2f} points {scores}; {evidence}: within "
                               f"the max drop {max_drop:g}", report)
    if 100 * drop > max_drop:
        return Check("rejected", f"{what} fell {100 * drop:.2f} points {scores}, more than the "
                                 f"max drop {max_drop:g}; {evidence}", report)
    needed = rows_needed(max_drop, change.confidence)
    hint = "" if needed is None or change.rows >= needed else (
        f"; even a candidate that changed no answer needs {needed:,} rows")
    return Check("undecided", f"{what} {-100 * drop:+.2f} points {scores}, within the max drop "
                              f"{max_drop:g}, but the {evidence} reaches past it: too few rows "
                              f"to decide{hint}", report)


def gain_above_zero(change: PairedChange, what: str = "accuracy") -> Check:
    """The candidate's accuracy rises: passed when the whole interval is above zero."""
    scores = f"({change.current:.4f} -> {change.candidate:.4f})"
    evidence = _evidence(change, change.low, change.high, "gain")
    report = {"rows": change.rows, "wins": change.wins, "losses": change.losses,
              "current": round(change.current, 4), "candidate": round(change.candidate, 4),
              "gain": _points(change.change), "interval": [_points(change.low), _points(change.high)],
              "confidence": change.confidence}
    if change.rows == 0:
        return Check("undecided", f"no rows to measure {what} on", report)
    if change.low > 0:
        return Check("passed", f"{what} {100 * change.change:+.2f} points {scores}; {evidence}: "
                               "above 0", report)
    if change.change <= 0:
        return Check("rejected", f"{what} did not improve {scores}; {evidence}", report)
    return Check("undecided", f"{what} {100 * change.change:+.2f} points {scores}, but the "
                              f"{evidence} reaches 0: too few rows to decide", report)


def combine(checks: Sequence[Check]) -> tuple[Decision, str]:
    """The gate's decision (rejected if any check is; else undecided if any is; else passed)
    and its reason: the deciding checks' reasons, or every reason when it passes."""
    for decision in ("rejected", "undecided"):
        deciding = [check.reason for check in checks if check.decision == decision]
        if deciding:
            return decision, f"{decision}: " + "; ".join(deciding)
    return "passed", "passed: " + "; ".join(check.reason for check in checks)
