"""update and rollback on a real kernel: a classifier trained on one domain learns another
from feedback, the candidate is gated on both, promoted or kept as rejected, and rollback
swaps back under load without a failed request.

The domains are small synthetic ones (so a tiny model learns them in seconds): film reviews
and medicine reviews with different vocabularies. bench/learning.py runs the same path on
the real movie and drug reviews with MiniLM.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmos import ErrorCode, KernelError
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import (
    KernelProcess,
    build_tiny_classifier,
    classify_load,
    running_kernel,
)
from tests.conftest import short_home

WORDS = {
    "films": {"positive": ("great", "lovely", "superb"), "negative": ("awful", "dull", "boring")},
    "medicine": {"positive": ("effective", "soothing", "helpful"),
                 "negative": ("useless", "harmful", "nauseating")},
}
TEMPLATES = {"films": "a {} film, {} scenes", "medicine": "this medicine was {} after {} days"}


def examples(domain: str, rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        label = rng.choice(("positive", "negative"))
        out.append({"text": TEMPLATES[domain].format(rng.choice(WORDS[domain][label]),
                                                     rng.randint(1, 9)), "label": label})
    return out


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    """A kernel with ``films:1``: a tiny classifier trained on 320 rows of the film domain,
    loaded. The file has 4,000 rows, so that the gate measures the old domain on a
    validation split of 400 (the paired bound needs 189 rows to pass even a candidate that
    changes no film answer; see tests/plugins/test_gate.py)."""
    folder = tmp_path_factory.mktemp("update")
    data = folder / "films.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples("films", 4000, 0)))
    home = short_home()
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        client.import_model(path=str(build_tiny_classifier(folder / "tiny", _minilm_path())),
                            name="tiny")
        trained = client.train("tiny", path=str(data), name="films", epochs=4.0, batch_size=16,
                               learning_rate=3e-3, max_tokens=16, limit=320)
        assert trained["metrics"]["test"]["accuracy"] >= 0.95  # it knows films
        client.load("films")
        yield kernel
    shutil.rmtree(home, ignore_errors=True)


def serving(client, model: str) -> str:
    return next(f"{m['model']}:{m['version']}" for m in client.models()
                if m["model"] == model and m["serving"])


def wait_until_serving(client, handle: str) -> None:
    for _ in range(600):
        if serving(client, handle.split(":")[0]) == handle:
            return
        time.sleep(0.05)
    raise AssertionError(f"{handle} never started serving")


def test_an_update_learns_the_new_domain_is_gated_and_promoted(kernel):
    with kernel.client() as client:
        client.learn("films", examples("medicine", 120, 1))
        # the medicine words are new to the tiny model's random embeddings: the adapter
        # covers the word embeddings too (on the Linear layers alone the held-out score
        # hung on the film model's last few steps: 0.58-0.75)
        result = client.update("films", method="lora", params={
            "learning_rate": 5e-3, "epochs": 16.0, "rank": 8,
            "targets": ["word_embeddings", "query", "key", "value", "dense"]})
        report = result["report"]
        assert result["passed"] and result["promoted"], result["reason"]
        assert report["gate"]["decision"] == "passed"
        assert report["candidate"]["new"] > report["current"]["new"]
        # paired on the same rows: the whole interval of the drop within 2 points, and of the
        # held-out gain above 0
        old, new = report["gate"]["old"], report["gate"]["new"]
        assert old["interval"][0] <= report["drop"] <= old["interval"][1] <= 2.0
        assert 0 < new["interval"][0] <= report["gain"] <= new["interval"][1]
        assert (old["rows"], new["rows"]) == (400, 24)
        assert report["examples"] == {"train": 96, "held_out": 24, "old": 400}
        for side in ("current", "candidate"):  # scores beside the majority class, same rows
            scores = report["scores"][side]["old"]
            assert scores["accuracy"] == report[side]["old"] and scores["rows"] == 400
            assert {"macro_f1", "balanced_accuracy"} <= set(scores)
            assert set(scores["majority_baseline"]) == {"accuracy", "macro_f1", "balanced_accuracy"}
        wait_until_serving(client, result["model"])
        new = client.classify("films", ["this medicine was helpful after 3 days"])[0]
        version = next(m for m in client.models() if f"{m['model']}:{m['version']}"
                       == result["model"])
    assert new["label"] == "positive"
    assert version["parent"] == "films:1" and version["recipe"]["op"] == "learn"
    assert version["recipe"]["feedback"]["examples"] == 120
    # the adapter is kept in PEFT's own format and equals the merged weights
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(version["path"])
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 8
    merged = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
    with_adapter = PeftModel.from_pretrained(base, folder / "adapter").eval()
    batch = AutoTokenizer.from_pretrained(folder)(["a superb film, 2 scenes"], return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(merged(**batch).logits, with_adapter(**batch).logits, atol=1e-4)


def test_a_candidate_that_forgets_is_rejected_and_nothing_changes(kernel):
    with kernel.client() as client:
        before = serving(client, "films")
        client.learn("films", [{**row, "label": "negative"} for row in examples("medicine", 30, 2)])
        result = client.update("films", method="finetune", replay=0, distill=0.0,
                               params={"learning_rate": 0.05, "epochs": 2.0}, limit=30)
        assert not result["passed"] and not result["promoted"]
        assert result["report"]["gate"]["decision"] == "rejected"
        assert "old-domain accuracy fell" in result["reason"]
        assert result["report"]["drop"] > 2.0
        assert serving(client, "films") == before
        rejected = next(m for m in client.models()
                        if f"{m['model']}:{m['version']}" == result["model"])
    assert rejected["metrics"]["learning"]["gate"]["passed"] is False
    assert not rejected["serving"]


def test_rollback_under_load_fails_no_request(kernel):
    with kernel.client() as client:
        current = serving(client, "films")
        assert current != "films:1"  # the promoted update
    with classify_load(kernel, "films", "a lovely film, 4 scenes") as load:
        load.wait_for(20)
        with kernel.client() as client:
            result = client.rollback("films")
            assert result["model"] == "films:1" and result["previous"] == current
            assert serving(client, "films") == "films:1"
        load.marked.set()
        load.wait_for(len(load.served) + 20)
    assert load.errors == []
    assert load.versions(after_mark=False) >= {current}
    assert load.versions(after_mark=True) == {"films:1"}
    with kernel.client() as client, pytest.raises(KernelError) as info:
        client.rollback("films")
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "nothing to roll back to" in info.value.message


@pytest.mark.parametrize("model, options, code, fragment", [
    ("films", {"method": "dreaming"}, ErrorCode.NOT_FOUND,
     "unknown update method 'dreaming' (known: finetune, lora, online)"),
    ("films", {"params": {"rank": 0}}, ErrorCode.BAD_REQUEST,
     "update method lora: argument 'rank' must be >= 1"),
    ("films", {"params": {"depth": 3}}, ErrorCode.BAD_REQUEST, "unknown parameter(s) 'depth'"),
    ("films", {"max_drop": -1.0}, ErrorCode.BAD_REQUEST, "'max_drop' must be >= 0"),
    ("tiny", {}, ErrorCode.BAD_REQUEST, "update: tiny:1 has no evaluation data"),
    ("nobody", {}, ErrorCode.NOT_FOUND, "model 'nobody' is not in the registry"),
])
def test_bad_updates_are_refused_and_write_nothing(kernel, model, options, code, fragment):
    with kernel.client() as client:
        before = [f"{m['model']}:{m['version']}" for m in client.models()]
        with pytest.raises(KernelError) as info:
            client.update(model, **options)
        after = [f"{m['model']}:{m['version']}" for m in client.models()]
    assert info.value.code is code and fragment in info.value.message, info.value.message
    assert after == before


def test_updates_start_on_their_own_and_too_little_feedback_is_refused(home, tmp_path):
    tiny = build_tiny_classifier(tmp_path / "tiny", _minilm_path())
    data = tmp_path / "films.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in examples("films", 64, 0)))
    with running_kernel(home, "--devices", "torch:cpu", "--update-after", "12") as kernel, \
            kernel.client() as client:
        client.import_model(path=str(tiny), name="tiny")
        client.train("tiny", path=str(data), name="films", epochs=1.0, batch_size=16,
                     max_tokens=16)
        client.load("films")
        client.learn("films", examples("medicine", 5, 3))
        with pytest.raises(KernelError) as info:
            client.update("films")
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert "films has 5 usable feedback examples; it needs at least 10" in info.value.message
        # --update-after 12: the twelfth example starts an update on its own
        client.learn("films", examples("medicine", 7, 4))
        first = wait_for_update(client, 1)
        while any(j["state"] not in ("DONE", "FAILED", "CANCELLED") for j in client.jobs()):
            time.sleep(0.05)  # a passing update's promotion is its own job
        # 10 more examples (fewer than 12), then a drift alert: inputs far longer than the
        # training texts start the next update
        client.learn("films", examples("medicine", 10, 5))
        long_texts = [" ".join(["a superb film"] * 15) + f" {i}" for i in range(60)]
        client.classify("films", long_texts[:30])
        assert not [j for j in client.jobs() if j["syscall"] == "update"][1:]
        client.classify("films", long_texts[30:])
        second = wait_for_update(client, 2)
        made = {m["version"]: m for m in client.models() if m["model"] == "films"}
    assert first["state"] == second["state"] == "DONE"
    assert first["owner"] == second["owner"] == client.name
    assert made[2]["recipe"]["feedback"]["examples"] == 12
    assert made[3]["recipe"]["feedback"]["examples"] == 22
    # 64 film rows leave 6 for the old domain and 12 examples hold out 2: too few rows for
    # the paired bound, so neither candidate is promoted, whatever it learned
    for number in (2, 3):
        gate = made[number]["metrics"]["learning"]["gate"]
        assert gate["old"]["rows"] == 6 and gate["decision"] != "passed", gate
        assert not made[number]["serving"]
    assert made[1]["serving"]


def wait_for_update(client, count: int) -> dict:
    """The ``count``-th update job, once it has ended."""
    for _ in range(1200):
        jobs = sorted((j for j in client.jobs() if j["syscall"] == "update"),
                      key=lambda j: j["id"])
        if len(jobs) >= count and jobs[count - 1]["state"] in ("DONE", "FAILED"):
            return jobs[count - 1]
        time.sleep(0.1)
    raise AssertionError(f"update {count} did not end")


def test_llmos_update_and_rollback_from_the_command_line(kernel):
    with kernel.client() as client:
        client.learn("films", examples("medicine", 20, 5))
    command = [sys.executable, "-m", "llmos.shell", "--address", kernel.address]
    update = subprocess.run(
        [*command, "update", "films", "--method",
         "online", "--params", "layers=1,learning_rate=0.01,epochs=2", "--no-promote",
         "--limit", "20"], capture_output=True, text=True, timeout=300)
    assert update.returncode == 0, update.stderr
    assert "HELD-OUT FEEDBACK" in update.stdout
    with kernel.client() as client:  # the command reports the decision the registry records
        candidate = max((m for m in client.models() if m["model"] == "films"),
                        key=lambda m: m["version"])
    decision = candidate["metrics"]["learning"]["gate"]["decision"]
    assert {"passed": "passed (not promoted)", "rejected": "rejected",
            "undecided": "undecided (not promoted)"}[decision] in update.stdout
    assert "paired gate" in update.stdout and "MAJORITY" in update.stdout
    bad = subprocess.run([*command, "rollback", "films:2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "give MODEL" in bad.stderr
