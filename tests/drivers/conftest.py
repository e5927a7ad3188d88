"""Model folders for the driver tests, copied to temporary folders: exports write inside them."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import build_tiny_classifier

#: The files of a Hugging Face folder the drivers read (never the package's other files).
MODEL_FILES = ("config.json", "*.safetensors", "tokenizer*", "vocab.txt", "special_tokens_map.json")


def copy_model(source: Path, target: Path) -> Path:
    """Copy the model files of ``source`` into a new folder ``target``; returns ``target``."""
    target.mkdir(parents=True)
    for pattern in MODEL_FILES:
        for file in source.glob(pattern):
            shutil.copy2(file, target / file.name)
    return target


@pytest.fixture
def copy_model_files() -> Callable[[Path, Path], Path]:
    """:func:`copy_model`, for tests (a conftest is not importable by name)."""
    return copy_model


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the bundled all-MiniLM-L6-v2 folder."""
    return copy_model(_minilm_path(), tmp_path_factory.mktemp("minilm") / "model")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT classifier (hidden 32, 1 layer, seed 0) with MiniLM's tokenizer."""
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny-clf") / "model", _minilm_path())
