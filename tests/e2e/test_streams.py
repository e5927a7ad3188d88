"""Streams: a driver host that runs several batches at once (OpenVINO on CPU, ``--streams``)."""

from __future__ import annotations

import threading

import numpy as np

from llmos.kernel.testing import running_kernel

LONG = ("The side effects were mild at first, a headache and some nausea, but after two weeks "
        "the medication started working and my sleep came back. ")


def test_openvino_streams_run_two_batches_at_once_with_the_same_answers(home, minilm_kernel):
    batches = [[f"{LONG * 3} Review {b}-{i}." for i in range(32)] for b in range(2)]
    with running_kernel(home, "--devices", "openvino:cpu,torch:cpu", "--threads", "2",
                        "--streams", "2") as kernel, kernel.client() as admin:
        admin.import_model("minilm")
        admin.load("minilm", driver="openvino")
        hosts = {d["name"]: d for d in admin.devices()}
        assert hosts["openvino:cpu"]["streams"] == 2
        assert hosts["torch:cpu"]["streams"] == 1  # a driver that does not grant streams
        results: dict[int, dict] = {}

        def send(b: int) -> None:
            with kernel.client(f"c{b}") as client:
                results[b] = client.infer("minilm", "embed", batches[b])

        for _ in range(3):  # each request is a full batch of its own: both go out at once
            threads = [threading.Thread(target=send, args=(b,)) for b in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            jobs = [admin.job(results[b]["job"]) for b in range(2)]
            first, second = sorted(jobs, key=lambda job: job["started_at"])
            if second["started_at"] < first["finished_at"]:
                break
        assert {job["device"] for job in jobs} == {"openvino:cpu"}
        assert second["started_at"] < first["finished_at"], "the two batches never overlapped"
    with minilm_kernel.client() as client:  # the PyTorch driver, one batch at a time
        for b in range(2):
            reference = client.embed("minilm", batches[b])
            assert np.abs(results[b]["embeddings"] - reference).max() < 1e-4
