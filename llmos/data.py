"""What client-side tools read beside the wire: the bundled labelled datasets and the
CSV/JSONL row format the kernel accepts (:mod:`llmos.kernel.datasets`), and the drift
score at which a model's monitoring raises an alert (:mod:`llmos.kernel.monitor`)."""

from llmos.kernel.datasets import load as load_dataset
from llmos.kernel.datasets import parse_rows
from llmos.kernel.monitor import DRIFT_ALERT

__all__ = ["DRIFT_ALERT", "load_dataset", "parse_rows"]
