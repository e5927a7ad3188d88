"""What was loaded comes back after a kernel restart (the placements are recorded in the
registry); an unloaded model does not; --no-restore starts empty."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import build_tiny_classifier, running_kernel, wait_for
from tests.conftest import short_home


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    path = short_home()
    with running_kernel(path, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        for name in ("kept", "dropped"):
            model = build_tiny_classifier(tmp_path / name, _minilm_path())
            client.import_model(path=str(model), name=name)
            client.load(name)
        client.unload("dropped")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def loaded(client) -> dict[str, list[str]]:
    return {m["model"]: m["loaded_on"] for m in client.models()}


@pytest.mark.timeout(600)
def test_loaded_models_are_loaded_again_after_a_restart(home):
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        wait_for(lambda: loaded(client)["kept"] == ["torch:cpu"], "kept:1 reloaded", timeout=300)
        assert loaded(client)["dropped"] == []
        assert client.infer("kept", "classify", ["a fine film"])["model"] == "kept:1"
        client.unload("kept")
    with running_kernel(home, "--devices", "torch:cpu") as kernel, kernel.client() as client:
        assert loaded(client) == {"kept": [], "dropped": []}  # unloaded before the stop


@pytest.mark.timeout(600)
def test_no_restore_starts_with_nothing_loaded(home):
    with running_kernel(home, "--devices", "torch:cpu", "--no-restore") as kernel, \
            kernel.client() as client:
        client.ping()
        assert loaded(client) == {"kept": [], "dropped": []}
