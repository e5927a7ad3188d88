"""learn: labelled feedback checked against the model's labels and stored durably."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel import datasets
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import build_tiny_classifier, running_kernel

GOOD = [{"text": "A wonderful, moving film.", "label": "positive"},
        {"text": "Dull and far too long.", "label": "negative"}]


def buffered(home, model: str) -> int:
    with sqlite3.connect(home / "feedback.db") as db:
        return db.execute("SELECT COUNT(*) FROM feedback WHERE model = ?", (model,)).fetchone()[0]


@pytest.fixture
def tiny(home, tmp_path):
    return build_tiny_classifier(tmp_path / "tiny", _minilm_path())


def test_acknowledged_feedback_survives_kill_9(home, tiny):
    with running_kernel(home, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model(path=str(tiny), name="tiny")
            first = client.learn("tiny", GOOD)
            second = client.learn("tiny", GOOD[:1])
            os.kill(kernel.process.pid, signal.SIGKILL)
            kernel.process.wait()
    assert (first["accepted"], second["accepted"], second["buffered"]) == (2, 1, 3)
    assert second["first_id"] == first["last_id"] + 1
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        after = client.learn("tiny", GOOD[1:])
    assert after["buffered"] == 4 and after["first_id"] == second["last_id"] + 1
    assert buffered(home, "tiny") == 4


@pytest.mark.parametrize("examples, words", [
    ([{"text": "fine", "label": "neutral"}], "unknown label"),
    ([{"text": "   ", "label": "positive"}], "non-empty"),
    ([{"text": 3, "label": "positive"}], "non-empty string"),
    ([{"text": "fine"}], "unknown label"),
    ([{"text": "fine", "label": "positive", "score": 1}], "unknown key"),
    ([*GOOD, {"text": "x" * 100_001, "label": "positive"}], "characters"),
    ([*GOOD, {"text": "ok", "label": "Positive"}], "unknown label"),
])
def test_bad_feedback_is_refused_whole(home, tiny, examples, words):
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        client.import_model(path=str(tiny), name="tiny")
        client.learn("tiny", GOOD[:1])
        with pytest.raises(KernelError) as info:
            client.learn("tiny", examples)
        assert info.value.code is ErrorCode.BAD_REQUEST and words in info.value.message
        assert client.learn("tiny", GOOD[1:])["buffered"] == 2  # nothing of the bad batch
    assert buffered(home, "tiny") == 2


def test_feedback_for_the_wrong_model_or_no_examples(home, tiny):
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        client.import_model("minilm")
        for model, examples, code in (("no-such-model", GOOD, ErrorCode.NOT_FOUND),
                                      ("minilm", GOOD, ErrorCode.BAD_REQUEST),
                                      ("minilm", [], ErrorCode.BAD_REQUEST)):
            with pytest.raises(KernelError) as info:
                client.learn(model, examples)
            assert info.value.code is code
    assert buffered(home, "minilm") == 0


def test_llmos_learn_reads_a_file_or_stdin(home, tiny, tmp_path):
    feedback = tmp_path / "feedback.csv"
    feedback.write_text("text,label\nGreat acting.,positive\nBoring plot.,negative\n")
    with running_kernel(home, "--devices", "torch:cpu") as kernel:
        with kernel.client() as client:
            client.import_model(path=str(tiny), name="tiny")
        command = [sys.executable, "-m", "llmos.shell", "--address", kernel.address, "learn", "tiny"]
        from_file = subprocess.run([*command, "--feedback", str(feedback)], capture_output=True,
                                   text=True, timeout=120)
        from_stdin = subprocess.run([*command, "--feedback", "-"], capture_output=True, text=True,
                                    timeout=120, input='{"text": "Loved it.", "label": "positive"}\n')
        bad = subprocess.run([*command, "--text", "Meh."], capture_output=True, text=True,
                             timeout=120)
    assert from_file.returncode == 0, from_file.stderr
    assert "2 examples stored" in from_file.stdout
    assert from_stdin.returncode == 0 and "3 in its feedback buffer" in from_stdin.stdout
    assert bad.returncode == 2 and "BAD_REQUEST" in bad.stderr


def test_stats_of_a_model_show_traffic_feedback_and_drift(home, tiny, tmp_path):
    reviews, drugs = datasets.load("reviews"), datasets.load("drugs")
    movies = reviews.split("test")[0][:120]
    drug_texts = drugs.split("train")[0][:200]
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        client.import_model(path=str(tiny), name="tiny")
        trained = client.train("tiny", data="reviews", name="watched", limit=64, epochs=1.0,
                               batch_size=16, max_tokens=32)
        assert trained["model"] == "watched:1"
        client.load("watched")
        predictions = []
        for start in range(0, len(movies), 40):
            predictions += client.classify("watched", movies[start:start + 40])
        calm = client.stats("watched")
        client.learn("watched", [{"text": t, "label": "positive"} for t in movies[:10]])
        for start in range(0, len(drug_texts), 40):
            client.classify("watched", drug_texts[start:start + 40])
        drifted = client.stats("watched")
        plot = subprocess.run([sys.executable, "-m", "llmos.shell", "--address", kernel.address,
                               "monitor", "watched", "--plot", str(tmp_path / "m.png")],
                              capture_output=True, text=True, timeout=120)
        with pytest.raises(KernelError) as info:
            client.stats("no-such-model")
        assert info.value.code is ErrorCode.NOT_FOUND
    assert calm["texts"] == 120 and calm["requests"] == 3 and calm["errors"] == 0
    assert calm["drift"]["input_length"] < 0.1 and calm["alerts"] == []
    assert calm["drift"]["confidence"] is not None
    assert drifted["drift"]["input_length"] > 0.25
    assert any(a["kind"] == "drift:input_length" for a in drifted["alerts"])
    expected = sum(p["label"] == "positive" for p in predictions[:10]) / 10
    assert drifted["feedback"] == {"examples": 10, "judged": 10, "accuracy": expected}
    assert drifted["buffered_feedback"] == 10
    assert drifted["history"][-1]["texts"] <= 320 and drifted["history"][0]["texts"] >= 40
    assert plot.returncode == 0, plot.stderr
    assert "points of accuracy and drift written to" in plot.stdout
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
