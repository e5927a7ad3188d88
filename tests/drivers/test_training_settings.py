"""Training defaults chosen from the model and the data, and the warning for a model that
learned only the class prior (pure functions: no kernel, no model)."""

import pytest

from llmos.drivers.training import (
    CHECKS,
    EXAMPLES_BUDGET,
    MAX_AUTO_EPOCHS,
    TrainSpec,
    choose_settings,
    learning_warning,
)

LABELS = ["negative", "positive"]


def spec(**given):
    return TrainSpec(base="b", data={"name": "reviews"}, checkpoint="c", output="o", **given)


def scores(confusion):
    """What evaluate_texts reports for a confusion matrix (only the fields the warning uses)."""
    rows = sum(map(sum, confusion))
    support = [sum(row) for row in confusion]
    recalls = [row[i] / s for i, (row, s) in enumerate(zip(confusion, support, strict=True)) if s]
    return {"confusion": confusion, "rows": rows,
            "accuracy": sum(confusion[i][i] for i in range(len(confusion))) / rows,
            "balanced_accuracy": sum(recalls) / len(recalls),
            "majority_baseline": {"accuracy": max(support) / rows}}


def test_defaults_scale_with_the_model_width_and_the_rows():
    minilm = choose_settings(spec(), [1260, 1740], width=384)
    assert minilm.learning_rate == pytest.approx(1e-4) and minilm.batch_size == 16
    assert minilm.epochs == pytest.approx(EXAMPLES_BUDGET / 3000)
    assert minilm.total_steps == round(minilm.epochs * 188 + 0.5)  # 188 batches of 16 per epoch
    assert minilm.warmup_steps == round(0.1 * minilm.total_steps) and minilm.early_stop
    assert minilm.check_every * CHECKS >= minilm.total_steps
    assert minilm.class_weights == (1.0, 1.0)  # 42/58 is not uneven: plain cross-entropy
    bert = choose_settings(spec(), [5000, 5000], width=768)
    assert bert.learning_rate == pytest.approx(5e-5) and bert.batch_size == 32
    assert bert.epochs == 1.0  # at least one epoch
    tiny = choose_settings(spec(), [60, 140], width=32)
    assert tiny.learning_rate == pytest.approx(2e-4)  # clamped
    assert tiny.epochs == MAX_AUTO_EPOCHS  # at most ten
    low, high = tiny.class_weights  # 30/70: the minority class weighs more, mean 1
    assert low > 1 > high and low / high == pytest.approx(140 / 60, rel=1e-3)
    assert (low + high) / 2 == pytest.approx(1.0, abs=1e-3)


def test_requested_values_are_kept_and_run_every_epoch():
    given = choose_settings(spec(epochs=2.0, batch_size=8, learning_rate=3e-5), [50, 50], 384)
    assert (given.epochs, given.batch_size, given.learning_rate) == (2.0, 8, 3e-5)
    assert given.total_steps == 26 and not given.early_stop


def test_a_model_that_answers_one_class_gets_a_warning():
    warning = learning_warning(scores([[0, 73], [0, 119]]), LABELS, "test")
    assert warning and "'positive' for all 192 test rows" in warning


def test_a_model_no_better_than_the_majority_class_gets_a_warning():
    # 62/38 rows, both classes predicted, accuracy 0.60 under the baseline's 0.62
    warning = learning_warning(scores([[25, 51], [29, 95]]), LABELS, "validation")
    assert warning and "does not beat the majority-class baseline on validation" in warning
    assert "0.600 vs 0.620" in warning


def test_a_model_that_learned_gets_no_warning():
    assert learning_warning(scores([[60, 16], [20, 104]]), LABELS, "test") is None
    # under the majority class's accuracy, but clearly better than chance on both classes
    assert learning_warning(scores([[20, 5], [30, 145]]), LABELS, "test") is None


def test_rows_of_one_class_are_not_judged():
    assert learning_warning(scores([[0, 0], [3, 9]]), LABELS, "all") is None
