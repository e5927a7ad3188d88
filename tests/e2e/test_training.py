"""Fine-tuning as a kernel job: progress, new versions with lineage, time slicing with
inference, resume after kill -9 of the kernel, and bad data."""

import csv
import os
import random
import signal

import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel.testing import running_kernel, wait_for

POSITIVE = ["a great film", "I loved it", "wonderful acting", "a joy to watch", "brilliant"]
NEGATIVE = ["a terrible film", "I hated it", "awful acting", "a chore to watch", "dreadful"]


def sentiment_csv(path, rows=200, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(rows // 2):
            writer.writerow([f"{rng.choice(POSITIVE)}, number {i}", "pos"])
            writer.writerow([f"{rng.choice(NEGATIVE)}, number {i}", "neg"])
    return path


def test_train_reports_progress_and_makes_a_new_version(minilm_kernel, tmp_path):
    data = sentiment_csv(tmp_path / "sentiment.csv")
    with minilm_kernel.client() as client:
        pending = client.submit("train", {"model": "minilm", "path": str(data), "name": "sent",
                                          "epochs": 2, "batch_size": 16, "max_tokens": 32,
                                          "learning_rate": 1e-4, "quantum": 0.5}, events=True)
        result = pending.result()
        progress = [e.body for e in pending.events if e.event == "progress"]
        job = client.job(result["job"])
        (version,) = [m for m in client.models() if m["model"] == "sent"]
        evaluation = client.evaluate("sent", path=str(data), split="test")
        client.load("sent")
        predictions = client.classify("sent", ["I loved it, a joy", "awful, I hated it"])
        client.unload("sent")
    assert result["model"] == "sent:1" and result["parent"] == "minilm:1"
    assert result["metrics"]["test"]["accuracy"] >= 0.8
    assert job["state"] == "DONE" and job["progress"]["done"] is True
    assert version["parent"] == "minilm:1" and version["recipe"]["op"] == "train"
    assert version["recipe"]["data"] == {"path": str(data)} and "test" in version["metrics"]
    assert evaluation["accuracy"] == pytest.approx(result["metrics"]["test"]["accuracy"])
    assert len(evaluation["confusion"]) == 2 and evaluation["rows"] == 20
    assert [p["label"] for p in predictions] == ["pos", "neg"]
    steps = [p["step"] for p in progress]
    assert len(steps) >= 2 and steps == sorted(steps) and steps[-1] == result["steps"] == 20
    assert all(p["loss"] > 0 and p["total_steps"] == 20 for p in progress)


def test_inference_is_served_while_training_runs(minilm_kernel, tmp_path):
    data = sentiment_csv(tmp_path / "big.csv", rows=2000)
    with minilm_kernel.client() as client:
        training = client.submit("train", {"model": "minilm", "path": str(data), "name": "slow",
                                           "epochs": 1, "batch_size": 16, "max_tokens": 32,
                                           "quantum": 0.5}, events=True)
        job_id = training.job_id()
        wait_for(lambda: client.job(job_id)["progress"].get("step", 0) >= 2,
                 "two training steps", timeout=300)
        served = 0
        for _ in range(5):
            assert client.embed("minilm", ["served during training"]).shape == (1, 384)
            served += 1
        state = client.job(job_id)
        assert state["state"] in ("RUNNING", "QUEUED") and not state["progress"]["done"]
        assert client.renice(job_id, 15)["priority"] == 15
        client.cancel(job_id)
        with pytest.raises(KernelError) as info:
            training.result()
    assert served == 5 and info.value.code is ErrorCode.CANCELLED
    assert state["progress"]["total_steps"] > state["progress"]["step"] >= 2
    assert state["progress"]["loss"] > 0 and state["progress"]["examples_per_s"] > 0


def test_bad_data_gets_clear_errors(minilm_kernel, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\nfine,pos\ngood,pos\n")
    binary = tmp_path / "latin1.csv"
    binary.write_bytes("text,label\ncaf\xe9 cr\xe8me,pos\nbad,neg\n".encode("latin-1"))
    no_header = tmp_path / "noheader.csv"
    no_header.write_text("review,stars\nok,5\n")
    cases = [({"path": str(tmp_path / "missing.csv")}, ErrorCode.NOT_FOUND, "does not exist"),
             ({"data": "imdb"}, ErrorCode.NOT_FOUND, "unknown dataset"),
             ({"path": str(empty)}, ErrorCode.BAD_REQUEST, "no rows"),
             ({"path": str(one_class)}, ErrorCode.BAD_REQUEST, "one class"),
             ({"path": str(binary)}, ErrorCode.BAD_REQUEST, "UTF-8"),
             ({"path": str(no_header)}, ErrorCode.BAD_REQUEST, "'text' and 'label'"),
             ({"data": "reviews", "path": str(empty)}, ErrorCode.BAD_REQUEST, "exactly one")]
    with minilm_kernel.client() as client:
        before = client.models()
        for data, code, fragment in cases:
            with pytest.raises(KernelError) as info:
                client.train("minilm", **data)
            assert info.value.code is code and fragment in info.value.message, info.value
        assert client.ping() == {"pong": True}
        assert client.models() == before  # nothing half-made reached the registry


def test_training_resumes_after_kill_9_of_the_kernel(home, tmp_path):
    data = sentiment_csv(tmp_path / "resume.csv", rows=600)
    options = ("--devices", "torch:cpu")
    with running_kernel(home, *options) as kernel, kernel.client() as client:
        client.import_model("minilm")
        pending = client.submit("train", {"model": "minilm", "path": str(data), "name": "resumed",
                                          "epochs": 1, "batch_size": 16, "max_tokens": 32,
                                          "quantum": 0.3, "checkpoint_every": 0}, events=True)
        job_id = pending.job_id()
        wait_for(lambda: client.job(job_id)["progress"].get("step", 0) >= 3,
                 "three training steps", timeout=300)
        os.kill(kernel.process.pid, signal.SIGKILL)
        kernel.process.wait()
    checkpoint = home / "jobs" / str(job_id) / "checkpoint"
    assert (checkpoint / "state.json").exists()
    with running_kernel(home, *options) as kernel, kernel.client() as client:
        resumed = client.job(job_id)
        assert resumed["state"] in ("QUEUED", "RUNNING") and resumed["syscall"] == "train"
        wait_for(lambda: client.job(job_id)["state"] in ("DONE", "FAILED"),
                 "the resumed job to end", timeout=600)
        final = client.job(job_id)
        models = {m["model"]: m for m in client.models()}
    assert final["state"] == "DONE", final
    assert models["resumed"]["parent"] == "minilm:1" and "test" in models["resumed"]["metrics"]
    assert not (home / "jobs" / str(job_id)).exists()  # checkpoints cleaned after success
    assert not list((home / "models").glob("*/.staging-*"))
