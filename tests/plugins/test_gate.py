"""The paired quality gate (llmos.plugins.gate) and the two gates built on it: an update's
(two domains) and a compression's (one). Pure statistics, no model."""

from __future__ import annotations

import random
from statistics import NormalDist

import pytest

from llmos.plugins.compression.session import _gate as compression_gate
from llmos.plugins.compression.session import _Measured
from llmos.plugins.gate import (
    _score,
    combine,
    drop_at_most,
    gain_above_zero,
    paired_change,
    rows_needed,
    score_interval,
)
from llmos.plugins.learning.session import gate
from llmos.plugins.learning.shell import updated

Z = NormalDist().inv_cdf(0.975)


def rows(both: int, wins: int, losses: int, neither: int) -> tuple[list[bool], list[bool]]:
    """(current, candidate) per-row correctness with these cell counts."""
    current = [True] * both + [False] * wins + [True] * losses + [False] * neither
    candidate = [True] * both + [True] * wins + [False] * losses + [False] * neither
    return current, candidate


def draw(rng: random.Random, n: int, p_win: float, p_loss: float,
         p_both: float = 0.6) -> tuple[list[bool], list[bool]]:
    """n rows from a population where the candidate alone is right with probability
    ``p_win`` and the current version alone with ``p_loss`` (true change: p_win - p_loss)."""
    p_neither = 1 - p_both - p_win - p_loss
    assert p_neither >= 0
    cells = rng.choices(("both", "win", "loss", "neither"),
                        weights=(p_both, p_win, p_loss, p_neither), k=n)
    counts = [cells.count(c) for c in ("both", "win", "loss", "neither")]
    return rows(*counts)


# --- the interval ---------------------------------------------------------------------

def test_the_interval_is_tangos_published_example():
    # Bentur et al. (2009) airway data as used by Fagerland, Lydersen and Laake (2014):
    # n = 21, discordant 1 and 7; Tango's 95% interval -0.517 to -0.026
    low, high = score_interval(1, 7, 21)
    assert (round(low, 3), round(high, 3)) == (-0.517, -0.026)


def test_the_interval_inverts_mcnemars_test():
    assert _score(0.0, 25, 2, 60) == pytest.approx((25 - 2) / (25 + 2) ** 0.5)  # McNemar's z
    low, high = score_interval(25, 2, 60)
    assert low < 23 / 60 < high
    assert abs(_score(low, 25, 2, 60)) == pytest.approx(Z, abs=1e-6)
    assert abs(_score(high, 25, 2, 60)) == pytest.approx(Z, abs=1e-6)


def test_no_disagreement_on_few_rows_still_gives_a_wide_interval():
    for n in (10, 60, 1281):
        low, high = score_interval(0, 0, n)
        assert high == pytest.approx(Z * Z / (n + Z * Z)) and low == pytest.approx(-high)
    assert score_interval(0, 0, 0) == (-1.0, 1.0)
    assert score_interval(5, 0, 5)[1] == 1.0 and score_interval(0, 5, 5)[0] == -1.0


def test_rows_needed_is_where_an_unchanged_candidate_first_passes():
    needed = rows_needed(2.0)
    assert needed == 189
    for n, decision in ((needed, "passed"), (needed - 1, "undecided")):
        assert drop_at_most(paired_change(*rows(n // 2, 0, 0, n - n // 2)), 2.0).decision == decision
    assert rows_needed(0.0) is None


def test_the_interval_covers_the_true_change_about_95_percent_of_the_time():
    rng = random.Random(0)
    for n, p_win, p_loss in ((60, 0.05, 0.30), (300, 0.03, 0.06), (1281, 0.02, 0.055)):
        covered = 0
        for _ in range(400):
            change = paired_change(*draw(rng, n, p_win, p_loss))
            covered += change.low <= p_win - p_loss <= change.high
        assert 0.92 <= covered / 400 <= 0.985, (n, covered)


def test_paired_rows_must_match():
    with pytest.raises(ValueError, match="differ in number"):
        paired_change([True, False], [True])
    with pytest.raises(ValueError, match="confidence"):
        score_interval(1, 1, 10, confidence=1.0)


# --- the checks -----------------------------------------------------------------------

def test_a_true_drop_just_above_max_drop_is_rejected():
    """A candidate that truly loses 2.25 points (max 2) on the old domain, measured on the
    movie validation split's 1,281 rows, 1,000 times: rejected whenever the measured drop
    is above 2; passed at most 2.5% of the time (the interval's upper end is a 97.5% bound;
    here 9 times)."""
    rng = random.Random(1)
    decisions = []
    for _ in range(1000):
        change = paired_change(*draw(rng, 1281, 0.03, 0.0525))
        check = drop_at_most(change, 2.0)
        if 100 * -change.change > 2.0:
            assert check.decision == "rejected"
        decisions.append(check.decision)
    assert decisions.count("passed") <= 25 and decisions.count("rejected") > 500
    exact = drop_at_most(paired_change(*rows(900, 40, 69, 272)), 2.0, "old-domain accuracy")
    assert exact.decision == "rejected" and exact.report["drop"] == 2.26
    assert exact.reason.startswith("old-domain accuracy fell 2.26 points")


def test_a_candidate_within_max_drop_on_enough_rows_passes():
    rng = random.Random(2)
    passed = sum(drop_at_most(paired_change(*draw(rng, 1281, 0.02, 0.02)), 2.0).decision
                 == "passed" for _ in range(200))
    # true drop 0, 4% of the rows disagree: the bound is the measured drop + about 1.1
    # points, within 2 about 94% of the time
    assert passed >= 176


def test_a_gain_must_be_shown_above_zero():
    assert gain_above_zero(paired_change(*rows(20, 25, 2, 13))).decision == "passed"
    stalled = gain_above_zero(paired_change(*rows(30, 5, 5, 20)), "held-out feedback accuracy")
    assert stalled.decision == "rejected"
    assert stalled.reason.startswith("held-out feedback accuracy did not improve (0.5833 -> 0.5833)")
    small = gain_above_zero(paired_change(*rows(30, 4, 2, 24)))
    assert small.decision == "undecided" and "too few rows to decide" in small.reason


def test_the_worst_check_decides():
    good = drop_at_most(paired_change(*rows(900, 20, 20, 341)), 2.0)
    unsure = gain_above_zero(paired_change(*rows(30, 4, 2, 24)))
    bad = gain_above_zero(paired_change(*rows(30, 2, 4, 24)))
    assert combine([good])[0] == "passed"
    assert combine([good, unsure])[0] == "undecided"
    assert combine([unsure, bad, good]) == ("rejected", f"rejected: {bad.reason}")


# --- the update gate ------------------------------------------------------------------

def test_the_update_gate_passes_a_candidate_that_learns_and_keeps_the_old_domain():
    new_current, new_candidate = rows(20, 25, 2, 13)
    old_current, old_candidate = rows(900, 20, 18, 343)
    result = gate({"new": new_current, "old": old_current},
                  {"new": new_candidate, "old": old_candidate}, 2.0)
    verdict = result["gate"]
    assert verdict["decision"] == "passed" and verdict["passed"]
    assert result["gain"] == pytest.approx(38.33) and result["drop"] == pytest.approx(-0.16)
    assert verdict["new"]["rows"] == 60 and verdict["old"]["rows"] == 1281
    low, high = verdict["old"]["interval"]
    assert low < result["drop"] < high <= 2.0
    assert verdict["new"]["interval"][0] > 0
    assert verdict["reason"].startswith("passed: held-out feedback accuracy +38.33 points")


def test_the_update_gate_rejects_forgetting():
    new_current, new_candidate = rows(10, 8, 0, 2)
    old_current, old_candidate = rows(85, 0, 5, 10)
    forgot = gate({"new": new_current, "old": old_current},
                  {"new": new_candidate, "old": old_candidate}, 2.0)
    assert forgot["gate"]["decision"] == "rejected" and not forgot["gate"]["passed"]
    assert forgot["drop"] == 5.0
    assert "old-domain accuracy fell 5.00 points (0.9000 -> 0.8500)" in forgot["gate"]["reason"]


def test_too_few_rows_is_undecided_and_not_promoted():
    """40 old-domain rows (the tiny test model's validation split): even a candidate that
    changes no old answer and learns every held-out row cannot bound its drop within 2."""
    new_current, new_candidate = rows(0, 24, 0, 0)
    old_current, old_candidate = rows(38, 0, 0, 2)
    result = gate({"new": new_current, "old": old_current},
                  {"new": new_candidate, "old": old_candidate}, 2.0)
    verdict = result["gate"]
    assert verdict["decision"] == "undecided" and verdict["passed"] is False
    assert result["drop"] == 0.0 and verdict["old"]["interval"][1] > 8
    assert "too few rows to decide; even a candidate that changed no answer needs 189 rows" \
        in verdict["reason"]
    shown = updated({"model": "films:2", "parent": "films:1", "passed": False, "promoted": False,
                     "reason": verdict["reason"], "report": {
                         "current": {"new": 0.0, "old": 0.95}, "candidate": {"new": 1.0, "old": 0.95},
                         "examples": {"train": 96, "held_out": 24, "old": 40}, "method": "lora",
                         "replay": 300, "distill": 1.0, "steps": 10, "seconds": 3.0, **result}})
    assert shown.text.startswith("films:2 undecided (not promoted): undecided:")
    assert [table.title for table in shown.tables][:2] == [
        "accuracy: current vs candidate", "paired gate (Tango score interval, paired (McNemar))"]


# --- the compression gate -------------------------------------------------------------

def measured(right: list[bool]) -> _Measured:
    return _Measured(sum(right) / len(right), 1000, 100, latency_ms={"torch": {"1": 10.0}},
                     baseline_ms={"torch": {"1": 20.0}}, right=right)


@pytest.mark.parametrize("cells, limit, decision", [
    ((1000, 10, 12, 259), 1.0, "passed"),  # -0.16 points, bound about +0.7
    ((1000, 10, 30, 241), 1.0, "rejected"),  # 1.56 points
    ((1000, 10, 20, 251), 1.0, "undecided"),  # 0.78 points, bound about +1.6
    ((30, 0, 0, 10), 1.0, "undecided"),  # 40 rows: no bound within 1 point
    ((1000, 10, 30, 241), None, "passed"),  # no gate asked
])
def test_the_compression_gate_is_paired(cells, limit, decision):
    parent, result = rows(*cells)
    entry = compression_gate(measured(parent), measured(result), limit)
    verdict = entry["gate"]
    assert verdict["decision"] == decision and verdict["passed"] == (decision == "passed")
    assert verdict["rows"] == sum(cells) and (verdict["wins"], verdict["losses"]) == cells[1:3]
    low, high = verdict["interval"]
    assert low <= entry["drop"] <= high
    if decision != "passed":
        assert verdict["reason"].endswith("no version made")
    assert entry["ratios"] == {"size": 1.0, "speedup_batch1": 2.0}
