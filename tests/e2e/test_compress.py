"""compress and promote on a real kernel: bad recipes write nothing, a recipe makes a gated
version with lineage and a report, and promote swaps versions under load without a failure."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import (
    KernelProcess,
    build_tiny_classifier,
    classify_load,
    running_kernel,
)
from tests.conftest import short_home


def write_reviews(path: Path, rows: int = 300) -> Path:
    """A small seeded positive/negative dataset (labels match the tiny classifier's)."""
    rng = random.Random(0)
    words = {"positive": ("great", "lovely", "superb"), "negative": ("awful", "dull", "boring")}
    with path.open("w") as fh:
        for _ in range(rows):
            label = rng.choice(("positive", "negative"))
            fh.write(json.dumps({"text": f"a {rng.choice(words[label])} film, {rng.randint(1, 9)} "
                                         "scenes", "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelProcess, Path]]:
    """A kernel (torch and OpenVINO) with two versions of a tiny classifier, ``tiny:1`` serving."""
    folder = tmp_path_factory.mktemp("compress")
    data = write_reviews(folder / "reviews.jsonl")
    home = short_home()
    with running_kernel(home, "--devices", "torch:cpu,openvino:cpu") as kernel:
        with kernel.client() as client:
            for seed in (0, 1):
                model = build_tiny_classifier(folder / f"tiny{seed}", _minilm_path(), seed=seed)
                client.import_model(path=str(model), name="tiny")
        yield kernel, data
    shutil.rmtree(home, ignore_errors=True)


def versions(kernel: KernelProcess) -> list[str]:
    with kernel.client() as client:
        return [f"{m['model']}:{m['version']}" for m in client.models()]


@pytest.mark.parametrize("recipe, options, code, fragment", [
    ([{"step": "distill"}], {}, ErrorCode.NOT_FOUND,
     "unknown compression step 'distill' (known: lowrank, prune, quantize)"),
    ([{"step": "prune", "sparsity": 1.5}], {}, ErrorCode.BAD_REQUEST,
     "recipe step 1 (prune): argument 'sparsity' must be <= 0.99"),
    ([{"step": "prune"}, {"step": "lowrank", "rank": 0}], {}, ErrorCode.BAD_REQUEST,
     "recipe step 2 (lowrank): argument 'rank' must be >= 1"),
    ([{"step": "quantize", "method": "int3"}], {}, ErrorCode.BAD_REQUEST,
     "argument 'method' must be one of"),
    ([{"step": "quantize"}], {"data": None}, ErrorCode.BAD_REQUEST,
     "tiny:1 has no evaluation data for the quality gate"),
    ([], {}, ErrorCode.BAD_REQUEST, "argument 'recipe' must be >= 1"),
    (None, {}, ErrorCode.BAD_REQUEST, "compress: give a recipe or search (not both)"),
])
def test_bad_recipes_are_refused_and_write_nothing(kernel, recipe, options, code, fragment):
    process, data = kernel
    before = versions(process)
    arguments = {"path": str(data), "version": 1, **options}
    if "data" in options:
        arguments.pop("path")
    with process.client() as client, pytest.raises(KernelError) as info:
        client.compress("tiny", recipe, **arguments)
    assert info.value.code is code and fragment in info.value.message
    assert versions(process) == before
    assert sorted(p.name for p in (process.home / "models" / "tiny").iterdir()) == ["v1", "v2"]


def test_a_recipe_makes_a_gated_version_with_lineage_and_a_report(kernel):
    process, data = kernel
    recipe = [{"step": "prune", "sparsity": 0.5}, {"step": "quantize", "method": "openvino-int8"}]
    with process.client() as client:
        pending = client.submit("compress", {"model": "tiny", "version": 1, "recipe": recipe,
                                             "path": str(data), "max_drop": 100.0,
                                             "name": "tiny-int8", "quantum": 0.05}, events=True)
        result = pending.result(timeout=300)
        progress = [e.body for e in pending.events if e.event == "progress"]
        assert result["model"] == "tiny-int8:1" and result["parent"] == "tiny:1"
        report = result["report"]
        assert report["gate"]["passed"] and result["servable"]
        assert [s["step"] for s in report["steps"]] == ["prune", "quantize"]
        assert report["steps"][0]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert report["result"]["form"] == "openvino" and report["result"]["drivers"] == ["openvino"]
        for measured in (report["parent"], report["result"]):
            assert {"accuracy", "parameters", "bytes", "latency_ms"} <= set(measured)
            assert all(set(ms) == {"1", "32"} for ms in measured["latency_ms"].values())
        assert report["ratios"]["size"] > 3
        gate = report["gate"]  # paired with the parent on the 30 validation rows
        assert gate["decision"] == "passed" and gate["rows"] == 30
        assert gate["interval"][0] <= report["drop"] <= gate["interval"][1] <= 100.0
        row = next(m for m in client.models() if m["model"] == "tiny-int8")
        assert row["parent"] == "tiny:1" and row["recipe"]["op"] == "compress"
        assert row["metrics"]["compression"]["drop"] == report["drop"]
        loaded = client.load("tiny-int8")  # only where it runs: the OpenVINO host
        assert loaded["devices"] == ["openvino:cpu"]
        assert len(client.classify("tiny-int8", ["a lovely film"])) == 1
        assert progress and progress[-1]["done"] and progress[-1]["fraction"] == 1.0
        assert {"phase", "fraction"} <= set(progress[0])


def test_too_few_rows_to_bound_the_drop_make_no_version(kernel):
    """30 validation rows cannot bound a drop within 2 points (even a result that changes no
    answer needs 189 rows at 95%): the gate is undecided and no version is made."""
    process, data = kernel
    before = versions(process)
    with process.client() as client:
        result = client.compress("tiny", [{"step": "prune", "sparsity": 0.01}], version=1,
                                 path=str(data), max_drop=2.0, name="tiny-few")
    gate = result["report"]["gate"]
    assert result["model"] is None and not result["servable"]
    assert gate["decision"] == "undecided" and not gate["passed"] and gate["rows"] == 30
    assert gate["interval"][1] > 2.0 and gate["reason"].endswith("no version made")
    assert "too few rows to decide" in gate["reason"]
    assert versions(process) == before


def test_promote_under_load_fails_no_request(kernel):
    process, _ = kernel
    with process.client() as client:
        client.load("tiny", version=1, driver="torch")
    with classify_load(process, "tiny", "a dull film") as load:
        load.wait_for(20)
        with process.client() as client:
            promoted = client.promote("tiny", 2)
        load.marked.set()
        load.wait_for(len(load.served) + 40)
    assert promoted["model"] == "tiny:2" and promoted["previous"] == "tiny:1"
    assert not load.errors
    assert load.versions(after_mark=True) == {"tiny:2"}
    assert load.versions(after_mark=False) >= {"tiny:1"}
    with process.client() as client:
        rows = {f"{m['model']}:{m['version']}": m for m in client.models()}
        assert rows["tiny:2"]["serving"] and not rows["tiny:1"]["serving"]
        def loaded_on(handle: str) -> list[str]:
            return next(m["loaded_on"] for m in client.models()
                        if f"{m['model']}:{m['version']}" == handle)

        for _ in range(100):  # the old version is unloaded once its jobs are done
            if not loaded_on("tiny:1"):
                break
            threading.Event().wait(0.05)
        assert loaded_on("tiny:1") == [] and loaded_on("tiny:2") == ["torch:cpu"]
        client.load("tiny", version=1, driver="torch")  # both loaded: the switch is immediate
        back = client.promote("tiny", 1)
        assert back["model"] == "tiny:1" and back["previous"] == "tiny:2"
        assert back["devices"] == ["torch:cpu"]
        assert client.infer("tiny", "classify", ["a dull film"])["model"] == "tiny:1"
        for _ in range(100):
            if not loaded_on("tiny:2"):
                break
            threading.Event().wait(0.05)
        assert loaded_on("tiny:2") == []


def llmos(kernel: KernelProcess, *words: str) -> subprocess.CompletedProcess[str]:
    """The ``llmos`` command against the test kernel."""
    return subprocess.run([sys.executable, "-m", "llmos.shell", "--address", kernel.address,
                           *words], capture_output=True, text=True, timeout=300)


def test_llmos_compress_prints_the_report_and_a_plot(kernel, tmp_path):
    process, data = kernel
    plot = tmp_path / "report.png"
    done = llmos(process, "compress", "tiny:1", "--path", str(data), "--recipe",
                 "quantize:method=onnxruntime-int8", "--max-drop", "100", "--name", "tiny-cli",
                 "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    assert "accuracy (validation) and size" in done.stdout and "parent" in done.stdout
    assert "tiny-cli:1: quantize(method=onnxruntime-int8)" in done.stdout
    assert "onnxruntime" in done.stdout
    assert plot.stat().st_size > 1000
    refused = llmos(process, "compress", "tiny:1", "--path", str(data), "--recipe",
                    "prune:sparsity=1.5")
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("error BAD_REQUEST: recipe step 1 (prune): argument "
                                      "'sparsity' must be <= 0.99")


def test_search_keeps_the_pareto_front_as_versions(kernel):
    process, data = kernel
    with process.client() as client:
        result = client.compress("tiny", None, version=1, search=True, path=str(data),
                                 max_drop=100.0, name="tiny-search", eval_limit=20)
        candidates = result["report"]["candidates"]
        assert len(candidates) == len(result["models"]) >= 5
        kept = [model for model in result["models"] if model]
        assert kept and len(kept) == len(result["front"])
        assert [result["models"][i] for i in result["front"]] == kept
        names = {f"{m['model']}:{m['version']}" for m in client.models()}
        assert set(kept) <= names
        assert not any(n.startswith("tiny-search:") and n not in kept for n in names)


def test_a_recipe_failing_in_the_host_writes_nothing(kernel):
    process, data = kernel
    before = versions(process)
    recipe = [{"step": "quantize", "method": "onnxruntime-int8"}, {"step": "prune"}]
    with process.client() as client, pytest.raises(KernelError) as info:
        client.compress("tiny", recipe, version=1, path=str(data), name="tiny-bad")
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "put runtime quantization last in the recipe" in info.value.message
    assert versions(process) == before
    assert not (process.home / "models" / "tiny-bad").exists()
    jobs = process.home / "jobs"
    assert not (jobs.exists() and any(jobs.iterdir()))
