"""Monitoring of served models: traffic, latency, errors, feedback accuracy and drift.

One :class:`ModelMonitor` per model version, fed by the scheduling loop as ``infer`` jobs
end and ``learn`` feedback arrives; pure Python, cheap per request. Drift is measured by
the **population stability index** (PSI) of two distributions over fixed bins, recent
traffic against the version's training data:

* input length in words (reference: the texts of the training split of the dataset the
  version was trained on, named in its recipe);
* confidence of the top class for ``classify`` (reference: the confidence histogram of
  the version's test-split predictions, recorded in its metrics at training time).

PSI below 0.1 is usually read as no shift, 0.1-0.25 as moderate, above 0.25 as a shift
that needs action; crossing :data:`DRIFT_ALERT` raises an alert (logged and listed by
``stats``). Accuracy from feedback counts each ``learn`` example whose text this version
classified recently: was its prediction the label the client sent? A ``history`` of
accuracy and drift takes a point at most every :data:`HISTORY_EVERY` seconds while traffic
or feedback arrives (``monitor --plot`` draws it).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Bin edges (lower bounds) for input length in words, and for top-class confidence.
LENGTH_EDGES = (0, 6, 9, 12, 16, 20, 25, 32, 45, 70, 120)
CONFIDENCE_EDGES = (0.0, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: Recent observations each distribution keeps.
WINDOW = 1000
#: Fewest observations before a drift score is reported.
MIN_OBSERVATIONS = 50
#: PSI at which an alert is raised.
DRIFT_ALERT = 0.25
#: Recent predictions remembered (by text digest) to judge feedback against.
REMEMBERED_PREDICTIONS = 10_000
#: The history (for ``monitor --plot``) takes a point at most this often, and keeps this many.
HISTORY_EVERY = 1.0
HISTORY_POINTS = 1000


def words(text: str) -> int:
    return len(text.split())


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin; bin i holds values in [edges[i], edges[i + 1])."""
    counts = [0] * len(edges)
    for value in values:
        counts[_bin(value, edges)] += 1
    return counts


def psi(reference: Sequence[int], observed: Sequence[int], floor: float = 1e-4) -> float:
    """Population stability index of ``observed`` against ``reference`` (bin counts)."""
    total_ref, total_obs = sum(reference), sum(observed)
    if not total_ref or not total_obs:
        return 0.0
    score = 0.0
    for ref, obs in zip(reference, observed, strict=True):
        p, q = max(ref / total_ref, floor), max(obs / total_obs, floor)
        score += (q - p) * math.log(q / p)
    return score


def _bin(value: float, edges: Sequence[float]) -> int:
    return max(0, bisect.bisect_right(edges, value) - 1)


@dataclass
class RollingHistogram:
    """The last :data:`WINDOW` values and their bin counts, kept up to date in O(1) per
    value (the scheduling loop feeds it; a drift check reads only the counts)."""

    edges: tuple[float, ...]
    values: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.edges)

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            self.counts[_bin(self.values[0], self.edges)] -= 1
        self.values.append(value)
        self.counts[_bin(value, self.edges)] += 1

    def __len__(self) -> int:
        return len(self.values)

    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class ModelMonitor:
    """What one model version has seen; :meth:`snapshot` is what ``stats MODEL`` returns."""

    handle: str
    length_reference: list[int] | None = None
    confidence_reference: list[int] | None = None
    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    texts: int = 0
    errors: int = 0
    lengths: RollingHistogram = field(default_factory=lambda: RollingHistogram(LENGTH_EDGES))
    confidences: RollingHistogram = field(
        default_factory=lambda: RollingHistogram(CONFIDENCE_EDGES))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    finished_at: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    predictions: OrderedDict[bytes, str] = field(default_factory=OrderedDict)
    judged: deque[bool] = field(default_factory=lambda: deque(maxlen=WINDOW))
    feedback: int = 0
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    #: Points over time: time, texts seen, rolling feedback accuracy, drift scores.
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY_POINTS))
    #: Alerts raised so far (the ``alerts`` deque keeps only the last 100).
    raised: int = 0
    _alerting: set[str] = field(default_factory=set)
    _sampled_at: float = 0.0

    def record(self, texts: list[str], seconds: float, predictions: list[tuple[str, float]]) -> None:
        """One finished infer job: its texts, its latency and (classify) label/confidence."""
        self.requests += 1
        self.texts += len(texts)
        self.latencies.append(seconds)
        self.finished_at.append(time.monotonic())
        for text in texts:
            self.lengths.add(words(text))
        for text, (label, confidence) in zip(texts, predictions, strict=False):
            self.confidences.add(confidence)
            key = _digest(text)
            self.predictions[key] = label
            self.predictions.move_to_end(key)
        while len(self.predictions) > REMEMBERED_PREDICTIONS:
            self.predictions.popitem(last=False)
        self._check_drift()
        self._sample()

    def record_error(self) -> None:
        self.errors += 1

    def record_feedback(self, pairs: list[tuple[str, str]]) -> None:
        """Labelled examples: those this version predicted recently count for accuracy."""
        self.feedback += len(pairs)
        for text, label in pairs:
            predicted = self.predictions.get(_digest(text))
            if predicted is not None:
                self.judged.append(predicted == label)
        self._sample()

    def accuracy(self) -> float | None:
        """Rolling accuracy of the judged feedback (None: nothing judged yet)."""
        return sum(self.judged) / len(self.judged) if self.judged else None

    def _sample(self) -> None:
        now = time.time()
        if now - self._sampled_at >= HISTORY_EVERY:
            self._sampled_at = now
            self.history.append({"time": now, "texts": self.texts, "accuracy": self.accuracy(),
                                 **{f"drift_{k}": v for k, v in self.drift().items()}})

    def drift(self) -> dict[str, float | None]:
        """PSI of input length and of confidence against the references (None: too little
        traffic, or no reference)."""
        scores: dict[str, float | None] = {"input_length": None, "confidence": None}
        if self.length_reference and len(self.lengths) >= MIN_OBSERVATIONS:
            scores["input_length"] = psi(self.length_reference, self.lengths.counts)
        if self.confidence_reference and len(self.confidences) >= MIN_OBSERVATIONS:
            scores["confidence"] = psi(self.confidence_reference, self.confidences.counts)
        return scores

    def _check_drift(self) -> None:
        for name, score in self.drift().items():
            if score is None:
                continue
            if score >= DRIFT_ALERT and name not in self._alerting:
                self._alerting.add(name)
                alert = {"time": time.time(), "model": self.handle, "kind": f"drift:{name}",
                         "psi": round(score, 4), "threshold": DRIFT_ALERT}
                self.alerts.append(alert)
                self.raised += 1
                log.warning("drift alert on %s: %s PSI %.3f >= %.2f", self.handle, name, score,
                            DRIFT_ALERT)
            elif score < DRIFT_ALERT / 2:
                self._alerting.discard(name)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = [t for t in self.finished_at if now - t <= 60.0]
        return {
            "model": self.handle, "requests": self.requests, "texts": self.texts,
            "errors": self.errors, "requests_per_s_last_minute": len(recent) / 60.0,
            "latency_ms": {f"p{int(q * 100)}": None if (v := _percentile(self.latencies, q)) is None
                           else round(1000 * v, 2) for q in (0.5, 0.95, 0.99)},
            "input_words": {"mean": self.lengths.mean(), "histogram": list(self.lengths.counts),
                            "reference": self.length_reference, "edges": list(LENGTH_EDGES)},
            "confidence": {"mean": self.confidences.mean(),
                           "histogram": list(self.confidences.counts),
                           "reference": self.confidence_reference,
                           "edges": list(CONFIDENCE_EDGES)},
            "feedback": {"examples": self.feedback, "judged": len(self.judged),
                         "accuracy": self.accuracy()},
            "drift": self.drift(), "alerts": list(self.alerts), "history": list(self.history),
        }
