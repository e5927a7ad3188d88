"""Training with the defaults only (no epochs, batch size or learning rate): data with signal
never ends as a one-class predictor, data without signal (shuffled labels) ends with a
warning in the job result and in what the CLI and the shell print; ``evaluate`` of a file
scores every row of it unless a split is named."""

import csv
import random

import pytest

from llmos.drivers.training import EXAMPLES_BUDGET
from llmos.shell import views

POSITIVE = ["a great film", "I loved it", "wonderful acting", "a joy to watch", "brilliant"]
NEGATIVE = ["a terrible film", "I hated it", "awful acting", "a chore to watch", "dreadful"]


def uneven_csv(path, rows, shuffled, seed=0):
    """``rows`` short reviews, 70% ``pos``; with ``shuffled`` the label is drawn apart from
    the text (70/30 all the same), so there is nothing to learn but the prior."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows):
            positive = rng.random() < 0.7
            if shuffled:
                text = rng.choice(POSITIVE + NEGATIVE)
            else:
                text = rng.choice(POSITIVE if positive else NEGATIVE)
            writer.writerow([f"{text}, number {i}", "pos" if positive else "neg"])
    return path


def train_with_defaults(client, data, name):
    return client.submit("train", {"model": "minilm", "path": str(data), "name": name,
                                   "max_tokens": 32, "quantum": 2.0}).result()


@pytest.mark.timeout(900)
def test_data_with_signal_never_ends_as_a_one_class_predictor(minilm_kernel, tmp_path):
    data = uneven_csv(tmp_path / "uneven.csv", rows=240, shuffled=False)
    with minilm_kernel.client(timeout=900) as client:
        result = train_with_defaults(client, data, "uneven")
        whole = client.submit("evaluate", {"model": "uneven", "path": str(data)}).result()
        test = client.evaluate("uneven", path=str(data), split="test")
        (version,) = [m for m in client.models() if m["model"] == "uneven"]
    training, scores = result["training"], result["metrics"]["test"]
    assert result["warning"] is None and scores["predicted_classes"] == 2
    assert scores["macro_f1"] >= 0.9 and scores["accuracy"] > scores["majority_baseline"]["accuracy"]
    # chosen from the data and the model: MiniLM is 384 wide, 192 training rows, 70/30
    assert training["learning_rate"] == pytest.approx(1e-4) and training["batch_size"] == 16
    assert training["epochs"] == min(10, EXAMPLES_BUDGET / 192)
    low, high = training["class_weights"]  # neg is the minority: it weighs more
    assert low > 1 > high
    assert training["best_step"] <= result["steps"] <= training["total_steps"]
    assert version["recipe"]["learning_rate"] == pytest.approx(1e-4)
    assert version["recipe"]["epochs"] == training["epochs"]
    # evaluate of a file: every row unless a split is named
    assert whole["split"] == "all" and whole["rows"] == 240 and whole["warning"] is None
    assert test["split"] == "test" and test["rows"] == scores["rows"] == 24
    assert test["accuracy"] == pytest.approx(scores["accuracy"])


@pytest.mark.timeout(900)
def test_data_without_signal_gets_the_warning(minilm_kernel, tmp_path):
    data = uneven_csv(tmp_path / "shuffled.csv", rows=400, shuffled=True)
    with minilm_kernel.client(timeout=900) as client:
        result = train_with_defaults(client, data, "noise")
        evaluation = client.evaluate("noise", path=str(data), split="test")
    assert result["warning"] and "test" in result["warning"]
    assert evaluation["warning"] == result["warning"]
    shown = views.trained(result).text.splitlines()
    assert shown[-1] == f"{views.WARNING}{result['warning']}"
    assert "majority class" in shown[-2]  # test scores sit beside the baseline
    assert views.evaluated(evaluation).text.splitlines()[-1].startswith(views.WARNING)
