"""The compression steps and session in-process on a tiny classifier: what each step does
to the model, that every saved version loads back exactly, the gate, the Pareto front,
recipes from the shell, and a third party's step through the hook."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from llmos import ErrorCode, KernelError, hookimpl
from llmos.contract.syscalls import Arg
from llmos.drivers.pytorch import LOADER_KEY, load_hf
from llmos.drivers.training import evaluate_folder
from llmos.kernel.plugins import collect, get_plugin_manager
from llmos.kernel.recipes import StepSpec
from llmos.kernel.sources import _minilm_path
from llmos.plugins.compression.candidate import Candidate
from llmos.plugins.compression.session import CompressionSession, CompressSpec, pareto_front
from llmos.plugins.compression.shell import compressed, parse_recipe
from llmos.plugins.compression.structure import LOADER

TEXTS = ["a lovely film", "a dull and boring film with long scenes"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 2-layer BERT classifier (4 heads) and a seeded positive/negative dataset."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(config).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(_minilm_path()).save_pretrained(folder / "model")
    rng = random.Random(0)
    with (folder / "data.jsonl").open("w") as fh:
        for _ in range(200):
            label = rng.choice(("positive", "negative"))
            fh.write(json.dumps({"text": f"a {'great' if label == 'positive' else 'dull'} film",
                                 "label": label}) + "\n")
    return folder


def run(tiny: Path, recipes: list[list[dict[str, Any]]], tmp_path: Path,
        max_drop: float | None = None) -> dict[str, Any]:
    """Resolve the recipes as the kernel does and run a session to the end."""
    steps = collect(get_plugin_manager()).compression_steps
    spec = CompressSpec(base=str(tiny / "model"), recipes=[steps.resolve(r) for r in recipes],
                        data={"path": str(tiny / "data.jsonl")}, output=str(tmp_path / "out"),
                        workdir=str(tmp_path / "work"), max_drop=max_drop, eval_limit=40)
    session = CompressionSession(spec, threads=2)
    phases = []
    while not session.done:
        progress = session.run(0.0)  # one phase per call
        phases.append(progress["phase"])
    assert progress["fraction"] == 1.0 and phases[-1] == "done"
    return progress


def logits(path: str | Path) -> np.ndarray:
    model, tokenizer = load_hf(str(path))
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()


def test_magnitude_pruning_is_permanent(tiny, tmp_path):
    progress = run(tiny, [[{"step": "prune", "sparsity": 0.5}]], tmp_path)
    entry = progress["report"]["candidates"][0]
    assert entry["steps"][0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    model, _ = load_hf(progress["outputs"]["0"])  # a plain HF folder: zeros in the weights
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert entry["result"]["drivers"] == ["torch", "onnxruntime", "openvino"]


@pytest.mark.parametrize("method, kept, shrunk", [
    ("heads", 2, {"attention.self.query": (64, 32), "attention.output.dense": (32, 64)}),
    ("neurons", 64, {"intermediate.dense": (64, 64), "output.dense": (64, 64)}),
])
def test_structured_pruning_shrinks_matrices_and_loads_back(tiny, tmp_path, method, kept, shrunk):
    progress = run(tiny, [[{"step": "prune", "method": method, "sparsity": 0.5}]], tmp_path)
    entry = progress["report"]["candidates"][0]
    assert entry["steps"][0][f"kept_{method}"] == [kept, kept]
    assert entry["result"]["parameters"] < progress["report"]["parent"]["parameters"]
    config = json.loads((Path(progress["outputs"]["0"]) / "config.json").read_text())
    assert config[LOADER_KEY] == LOADER  # load_hf imports the plugin's loader by this name
    model, _ = load_hf(progress["outputs"]["0"])
    layer = model.bert.encoder.layer[1]
    for name, (inputs, outputs) in shrunk.items():
        linear = layer.get_submodule(name)
        assert (linear.in_features, linear.out_features) == (inputs, outputs)
    assert logits(progress["outputs"]["0"]).shape == (2, 2)


def test_lowrank_reports_ranks_and_keeps_half_the_parameters(tiny, tmp_path):
    recipe = [{"step": "lowrank", "budget": 0.5, "recover_steps": 2}]
    progress = run(tiny, [recipe], tmp_path)
    step = progress["report"]["candidates"][0]["steps"][0]
    assert len(step["ranks"]) == 12  # 6 Linear layers in each of 2 blocks
    assert step["ranks"]["bert.encoder.layer.0.attention.self.query"] == 16  # 0.5*64*64/128
    assert step["linear_parameters"]["kept"] == pytest.approx(0.5, abs=0.02)
    assert np.isfinite(step["recovery_loss"])
    model, _ = load_hf(progress["outputs"]["0"])
    assert model.bert.encoder.layer[0].attention.self.query.rank == 16
    metrics = evaluate_folder(progress["outputs"]["0"], {"path": str(tiny / "data.jsonl")},
                              "validation", 0)  # the evaluate syscall's code loads it too
    assert metrics["rows"] == 20


def test_a_global_budget_gives_ranks_where_the_energy_is(tiny, tmp_path):
    progress = run(tiny, [[{"step": "lowrank", "budget": 0.4, "allocation": "global"}]], tmp_path)
    step = progress["report"]["candidates"][0]["steps"][0]
    assert step["linear_parameters"]["kept"] == pytest.approx(0.4, abs=0.01)
    assert len(set(step["ranks"].values())) > 2  # not one share per layer


def test_lowrank_with_full_energy_is_exact(tiny, tmp_path):
    """Keeping every singular value reproduces the parent (the factors are the SVD)."""
    progress = run(tiny, [[{"step": "lowrank", "energy": 1.0}]], tmp_path)
    assert progress["report"]["candidates"][0]["steps"][0]["ranks"] == {}  # no layer got smaller
    assert np.allclose(logits(progress["outputs"]["0"]), logits(tiny / "model"), atol=1e-5)


@pytest.mark.parametrize("method, form, files", [
    ("openvino-int8", "openvino", {"openvino_model.xml", "openvino_model.bin"}),
    ("onnxruntime-int8", "onnx", {"model.onnx"}),
    ("torch-int8", "torch", {"model.safetensors"}),
    ("bf16", "torch", {"model.safetensors"}),
])
def test_quantized_versions_carry_what_their_runtime_loads(tiny, tmp_path, method, form, files):
    progress = run(tiny, [[{"step": "quantize", "method": method, "samples": 8}]], tmp_path)
    entry = progress["report"]["candidates"][0]
    assert entry["result"]["form"] == form
    assert files <= {p.name for p in Path(progress["outputs"]["0"]).iterdir()}
    if method in ("openvino-int8", "onnxruntime-int8"):
        assert entry["ratios"]["size"] > 3


def test_a_torch_step_after_runtime_quantization_is_refused(tiny, tmp_path):
    with pytest.raises(KernelError) as info:
        run(tiny, [[{"step": "quantize", "method": "onnxruntime-int8"}, {"step": "prune"}]],
            tmp_path)
    assert info.value.code is ErrorCode.BAD_REQUEST and "put runtime quantization last" in \
        info.value.message


def tilt(candidate: Candidate, params: dict[str, Any], context: Any) -> Candidate:
    """A step that makes the classifier answer ``params["label"]`` whatever the text."""
    bias = torch.full((2,), -10.0)
    bias[candidate.model.config.label2id[params["label"]]] = 10.0
    candidate.model.classifier.bias.data.copy_(bias)
    return candidate


def test_a_failed_gate_keeps_no_output_and_says_why(tiny, tmp_path):
    """The parent always answers positive, on data that is (almost) all positive; the
    result always answers negative: about 100 points lost, more than the 1 allowed."""
    parent = Candidate(*load_hf(str(tiny / "model")))
    tilt(parent, {"label": "positive"}, None).model.save_pretrained(tmp_path / "parent")
    parent.tokenizer.save_pretrained(tmp_path / "parent")
    data = tmp_path / "positive.jsonl"
    data.write_text("".join(json.dumps({"text": f"film {i}", "label": "positive" if i else
                                        "negative"}) + "\n" for i in range(100)))
    step = {"step": "tilt", "qualname": f"{__name__}:tilt", "params": {"label": "negative"}}
    spec = CompressSpec(base=str(tmp_path / "parent"), recipes=[[step]], data={"path": str(data)},
                        output=str(tmp_path / "out"), workdir=str(tmp_path / "work"), max_drop=1.0)
    session = CompressionSession(spec, threads=2)
    while not session.done:
        progress = session.run(60.0)
    entry = progress["report"]["candidates"][0]
    assert entry["drop"] == 100.0 and not entry["gate"]["passed"]
    assert entry["gate"]["reason"] == ("accuracy dropped 100.00 points (1.0000 -> 0.0000), more "
                                       "than the max drop 1: no version made")
    assert progress["outputs"] == {} and progress["report"]["front"] == []
    assert not (tmp_path / "out" / "0").exists()


def test_pareto_front_keeps_only_undominated_passing_candidates():
    def entry(size: int, ms: float, accuracy: float, passed: bool = True) -> dict[str, Any]:
        return {"result": {"bytes": size, "accuracy": accuracy,
                           "latency_ms": {"openvino": {"1": ms, "32": ms * 10}}},
                "gate": {"passed": passed}}

    candidates = [entry(10, 5.0, 0.80), entry(20, 6.0, 0.79), entry(20, 4.0, 0.81),
                  entry(5, 9.0, 0.70), entry(1, 1.0, 0.99, passed=False)]
    assert pareto_front(candidates) == [0, 2, 3]


def test_recipes_typed_in_the_shell():
    assert parse_recipe("prune:sparsity=0.5,quantize:method=openvino-int8:samples=64") == [
        {"step": "prune", "sparsity": 0.5},
        {"step": "quantize", "method": "openvino-int8", "samples": 64}]
    with pytest.raises(KernelError) as info:
        parse_recipe("prune:sparsity")
    assert "'sparsity' in recipe step 'prune' is not KEY=VALUE" in info.value.message


def test_the_report_table_lists_parent_and_result_and_draws_a_plot(tiny, tmp_path):
    progress = run(tiny, [[{"step": "lowrank", "budget": 0.5}]], tmp_path)
    result = {"model": "tiny:2", "parent": "tiny:1", "servable": True,
              "report": {"parent": progress["report"]["parent"],
                         **progress["report"]["candidates"][0]}}
    output = compressed(result, tmp_path / "plot.png")
    quality, speed = output.tables
    assert [row[0] for row in quality.rows] == [row[0] for row in speed.rows] == ["tiny:1", "tiny:2"]
    assert quality.rows[0][-1] == "parent" and speed.rows[0][1] == "torch"
    assert "per-layer ranks" in output.text and (tmp_path / "plot.png").stat().st_size > 1000


def scale_biases(candidate: Candidate, params: dict[str, Any], context: Any) -> Candidate:
    """A third party's step (named by qualname in the test plugin below)."""
    candidate.require_torch("scale-biases")
    for module in candidate.model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.data *= params["scale"]
    candidate.notes.append({"scaled": params["scale"]})
    return candidate


def test_a_third_party_adds_a_step_through_the_hook(tiny, tmp_path):
    class Plugin:
        @hookimpl
        def llmos_register_compression_steps(self, steps):
            steps.add(StepSpec("scale-biases", f"{__name__}:scale_biases",
                               (Arg("scale", "float", default=0.5, minimum=0.0, maximum=1.0),)))

    pm = get_plugin_manager()
    pm.register(Plugin(), name="scale-biases")
    steps = collect(pm).compression_steps
    recipe = steps.resolve([{"step": "scale-biases", "scale": 0.0}, {"step": "prune"}])
    assert [s["step"] for s in recipe] == ["scale-biases", "prune"]
    spec = CompressSpec(base=str(tiny / "model"), recipes=[recipe],
                        data={"path": str(tiny / "data.jsonl")}, output=str(tmp_path / "out"),
                        workdir=str(tmp_path / "work"), eval_limit=20)
    session = CompressionSession(spec, threads=2)
    while not session.done:
        progress = session.run(60.0)
    assert progress["report"]["candidates"][0]["steps"][0]["scaled"] == 0.0
    model, _ = load_hf(progress["outputs"]["0"])
    assert float(model.bert.encoder.layer[0].output.dense.bias.detach().abs().sum()) == 0.0
