"""``monitor MODEL --plot FILE``: a model version's accuracy and drift over time, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.data import DRIFT_ALERT


def draw(snapshot: dict[str, Any], path: Path) -> int:
    """Two panels over time (seconds since the first point): the rolling accuracy of the
    judged feedback, and the drift scores with the alert threshold. Returns the number of
    points; BAD_REQUEST when the version has seen no traffic yet."""
    points = snapshot["history"]
    if not points:
        raise KernelError(ErrorCode.BAD_REQUEST, f"monitor: {snapshot['model']} has no history "
                          "yet (it records while it classifies and receives feedback)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = points[0]["time"]
    seconds = [p["time"] - start for p in points]
    figure, (accuracy_axis, drift_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    judged = [(t, p["accuracy"]) for t, p in zip(seconds, points, strict=True)
              if p["accuracy"] is not None]
    if judged:
        accuracy_axis.plot(*zip(*judged, strict=True), marker=".", label="feedback accuracy")
    accuracy_axis.set(ylabel="rolling accuracy", ylim=(0, 1.02),
                      title=f"{snapshot['model']}: accuracy and drift")
    for key, label in (("drift_input_length", "input length PSI"),
                       ("drift_confidence", "confidence PSI")):
        scored = [(t, p[key]) for t, p in zip(seconds, points, strict=True) if p[key] is not None]
        if scored:
            drift_axis.plot(*zip(*scored, strict=True), marker=".", label=label)
    drift_axis.axhline(DRIFT_ALERT, color="red", linestyle="--", label="alert threshold")
    drift_axis.set(xlabel="seconds", ylabel="PSI vs training data")
    for axis in (accuracy_axis, drift_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return len(points)
