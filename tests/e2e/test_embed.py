"""A real kernel process, real sockets, a real driver host and the real MiniLM weights."""

import asyncio
import json
import shutil

import numpy as np
import pytest

from llmos import AsyncClient, ErrorCode, KernelError
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import build_tiny_classifier


def test_paraphrases_are_closer_than_unrelated_sentences(minilm_kernel):
    with minilm_kernel.client() as client:
        vectors = client.embed("minilm", [
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The central bank raised interest rates.",
        ])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert paraphrase > unrelated + 0.3


def test_batched_and_single_requests_agree(minilm_kernel):
    texts = [f"sentence number {i} about {topic}" for i, topic in
             enumerate(["cats", "stocks", "rain", "football", "music", "code"])]
    with minilm_kernel.client() as client:
        pending = [client.submit("infer", {"model": "minilm", "task": "embed", "inputs": [t]})
                   for t in texts]
        concurrent = np.concatenate([p.result()["embeddings"] for p in pending])
        alone = client.embed("minilm", texts)
    np.testing.assert_allclose(concurrent, alone, atol=1e-5)


def test_async_client_runs_calls_concurrently(minilm_kernel):
    async def main():
        async with AsyncClient(minilm_kernel.address, name="async") as client:
            pong, models, vectors = await asyncio.gather(
                client.ping(), client.models(), client.embed("minilm", ["hello", "world"]))
            with pytest.raises(KernelError) as info:
                await client.embed("no-such-model", ["x"])
            return pong, models, vectors, info.value

    pong, models, vectors, error = asyncio.run(main())
    assert pong == {"pong": True}
    assert any(m["model"] == "minilm" and m["loaded_on"] for m in models)
    assert vectors.shape == (2, 384)
    assert error.code is ErrorCode.NOT_FOUND


def test_classify_on_a_model_with_a_head(minilm_kernel, tmp_path):
    """A tiny BERT classifier built from a config, with MiniLM's tokenizer, imported by path."""
    folder = build_tiny_classifier(tmp_path / "tiny-clf", _minilm_path())
    with minilm_kernel.client() as client:
        client.import_model(path=str(folder), name="tiny-clf")
        client.load("tiny-clf")
        texts = ["great film", "dreadful and boring"]
        result = client.infer("tiny-clf", "classify", texts)
        with pytest.raises(KernelError) as info:
            client.classify("minilm", ["no head here"])
        client.unload("tiny-clf")
        with pytest.raises(KernelError) as unloaded:
            client.classify("tiny-clf", ["gone"])
    probs = result["probs"]
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [p["label"] for p in result["predictions"]] == [
        ["negative", "positive"][int(i)] for i in probs.argmax(axis=1)]
    assert info.value.code is ErrorCode.BAD_REQUEST and "classification head" in info.value.message
    assert unloaded.value.code is ErrorCode.NOT_FOUND


def test_unknown_models_and_sources_get_not_found(minilm_kernel):
    with minilm_kernel.client() as client:
        for call in (lambda: client.load("nope"), lambda: client.import_model("nope"),
                     lambda: client.load("minilm", device="tpu:0"),
                     lambda: client.job(10**9)):
            with pytest.raises(KernelError) as info:
                call()
            assert info.value.code is ErrorCode.NOT_FOUND
        assert client.ping() == {"pong": True}


def test_jobs_record_device_and_resources(minilm_kernel):
    with minilm_kernel.client(name="accounting") as client:
        result = client.infer("minilm", "embed", ["measure me"] * 4)
        job = client.job(result["job"])
        mine = client.jobs(owner="accounting")
    assert job["state"] == "DONE" and job["device"] == "torch:cpu"
    assert job["cpu_seconds"] > 0 and job["peak_memory"] > 50e6 and job["tokens"] > 0
    assert [j["id"] for j in mine] == [result["job"]]
    json.dumps(mine)  # plain data only


def test_models_survive_a_kernel_restart(home):
    from llmos.kernel.testing import running_kernel

    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        client.import_model("minilm")
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        assert [m["version"] for m in client.models()] == [1]
        assert client.import_model("minilm")["created"] is False
    shutil.rmtree(home, ignore_errors=True)
