"""Monitoring on the real bundled data: the drift score tells the movie-review stream from
the drug-review stream; alerts; feedback accuracy."""

from __future__ import annotations

import pytest

from llmos.kernel import datasets
from llmos.kernel.monitor import (
    DRIFT_ALERT,
    LENGTH_EDGES,
    ModelMonitor,
    histogram,
    psi,
    words,
)


@pytest.fixture(scope="module")
def streams():
    reviews, drugs = datasets.load("reviews"), datasets.load("drugs")
    train, _ = reviews.split("train")
    movies, _ = reviews.split("test")
    drug_texts = drugs.split("train")[0] + drugs.split("test")[0]
    return histogram([words(t) for t in train], LENGTH_EDGES), movies[:400], drug_texts[:400]


def test_psi_separates_movie_reviews_from_drug_reviews(streams):
    reference, movies, drugs = streams
    movie_score = psi(reference, histogram([words(t) for t in movies], LENGTH_EDGES))
    drug_score = psi(reference, histogram([words(t) for t in drugs], LENGTH_EDGES))
    assert movie_score < 0.1 < DRIFT_ALERT < drug_score


def test_psi_basics():
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([10, 0, 0], [0, 0, 10]) > 5
    assert psi([], []) == 0.0


def test_the_monitor_alerts_on_the_drug_stream_only(streams):
    reference, movies, drugs = streams
    monitor = ModelMonitor("reviews:2", reference)
    for text in movies[:200]:
        monitor.record([text], 0.01, [("fresh", 0.9)])
    assert monitor.drift()["input_length"] < 0.1 and not monitor.alerts
    for text in drugs[:300]:
        monitor.record([text], 0.01, [("fresh", 0.9)])
    assert monitor.drift()["input_length"] > DRIFT_ALERT
    assert [a["kind"] for a in monitor.alerts] == ["drift:input_length"]
    snapshot = monitor.snapshot()
    assert snapshot["requests"] == 500 and snapshot["latency_ms"]["p50"] == 10.0


def test_feedback_judges_recent_predictions():
    monitor = ModelMonitor("m:1")
    monitor.record(["good film", "bad film", "meh"], 0.02,
                   [("fresh", 0.8), ("fresh", 0.6), ("rotten", 0.7)])
    monitor.record_feedback([("good film", "fresh"), ("bad film", "rotten"),
                             ("never classified", "fresh")])
    feedback = monitor.snapshot()["feedback"]
    assert feedback == {"examples": 3, "judged": 2, "accuracy": 0.5}
    assert monitor.drift() == {"input_length": None, "confidence": None}  # no reference


def test_rolling_counts_match_a_fresh_histogram_after_evictions():
    from llmos.kernel.monitor import WINDOW, RollingHistogram

    rolling = RollingHistogram(LENGTH_EDGES)
    values = [(i * 7) % 150 for i in range(WINDOW + 345)]
    for value in values:
        rolling.add(value)
    assert rolling.counts == histogram(values[-WINDOW:], LENGTH_EDGES)
    assert len(rolling) == WINDOW
