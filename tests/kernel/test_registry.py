import json
import sqlite3

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.registry import Registry


def hf_folder(path, weight=1.0):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    save_file({"w": np.full((2, 2), weight, dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "vocab.txt").write_text("[PAD]\n")
    (path / "notes.md").write_text("not copied")
    return path


def test_import_copies_only_allowed_files_and_is_idempotent(tmp_path):
    registry = Registry(tmp_path / "home")
    version, created = registry.import_folder("m", hf_folder(tmp_path / "src"), {"op": "import"})
    assert created and version.version == 1
    assert sorted(p.name for p in version.path.iterdir()) == [
        "config.json", "model.safetensors", "vocab.txt"]
    again, created = registry.import_folder("m", tmp_path / "src", {"op": "import"})
    assert not created and again.version == 1
    v2, _ = registry.import_folder("m", hf_folder(tmp_path / "src2", 2.0), {"op": "import"})
    assert v2.version == 2
    assert registry.resolve("m").version == 1  # the first import keeps serving
    assert registry.resolve("m", 2).path == v2.path


def test_registry_survives_a_restart(tmp_path):
    Registry(tmp_path / "home").import_folder("m", hf_folder(tmp_path / "src"), {"op": "import"})
    reopened = Registry(tmp_path / "home")
    assert [v.ref for v in reopened.versions()] == ["m:1"]


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt",
                                     "model.pkl"])
def test_pickle_weights_and_missing_folders_are_refused(tmp_path, weights):
    registry = Registry(tmp_path / "home")
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / weights).write_bytes(b"\x80\x04")
    with pytest.raises(KernelError, match=f"found {weights}: pickle-based weights are refused"):
        registry.import_folder("p", src, {})
    with pytest.raises(KernelError) as info:
        registry.import_folder("p", tmp_path / "nowhere", {})
    assert info.value.code is ErrorCode.NOT_FOUND
    assert registry.versions() == []
    assert not list((tmp_path / "home" / "models").glob("*/v*"))


def test_bad_names_and_unknown_models(tmp_path):
    registry = Registry(tmp_path / "home")
    with pytest.raises(KernelError, match="invalid model name"):
        registry.import_folder("../evil", hf_folder(tmp_path / "src"), {})
    with pytest.raises(KernelError) as info:
        registry.resolve("missing")
    assert info.value.code is ErrorCode.NOT_FOUND


def test_leftovers_of_a_crash_are_removed_on_open(tmp_path):
    home = tmp_path / "home"
    registry = Registry(home)
    registry.import_folder("m", hf_folder(tmp_path / "src"), {"op": "import"})
    staging = home / "models" / "m" / ".staging-123"
    unindexed = home / "models" / "m" / "v2"  # renamed into place, index row never committed
    for folder in (staging, unindexed):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    reopened = Registry(home)
    assert not staging.exists() and not unindexed.exists()
    v2, created = reopened.import_folder("m", hf_folder(tmp_path / "src2", 2.0), {"op": "import"})
    assert created and v2.version == 2 and (v2.path / "model.safetensors").stat().st_size > 7


def test_serving_history_walks_back_with_rollback(tmp_path):
    registry = Registry(tmp_path / "home")
    for weight in (1.0, 2.0, 3.0):
        registry.import_folder("m", hf_folder(tmp_path / f"src{weight}", weight), {"op": "import"})
    assert registry.previous_serving("m") is None  # only the first import has served
    registry.set_serving("m", 3)
    registry.set_serving("m", 2)
    assert (registry.resolve("m").version, registry.previous_serving("m")) == (2, 3)
    assert registry.pop_serving("m") == 3 and registry.resolve("m").version == 3
    reopened = Registry(tmp_path / "home")  # the history is on disk
    assert reopened.pop_serving("m") == 1 and reopened.resolve("m").version == 1
    with pytest.raises(KernelError) as info:
        reopened.pop_serving("m")
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_an_adapter_folder_is_kept_beside_the_weights(tmp_path):
    source = hf_folder(tmp_path / "src")
    (source / "adapter").mkdir()
    (source / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    save_file({"a": np.ones((2, 2), dtype=np.float32)},
              str(source / "adapter" / "adapter_model.safetensors"))
    (source / "adapter" / "stray.pkl").write_text("never copied")
    version, _ = Registry(tmp_path / "home").import_folder("m", source, {"op": "learn"})
    assert sorted(p.name for p in (version.path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


class _FullOnce:
    """A registry connection whose next commit fails as SQLite does on a full disk."""

    def __init__(self, db):
        self.db, self.failures = db, 1

    def commit(self):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        self.db.commit()

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_an_import_whose_index_write_fails_leaves_nothing(tmp_path):
    home = tmp_path / "home"
    registry = Registry(home)
    registry._db = _FullOnce(registry._db)
    with pytest.raises(KernelError) as info:
        registry.import_folder("m", hf_folder(tmp_path / "src"), {"op": "import"})
    assert info.value.code is ErrorCode.INTERNAL
    assert info.value.message.startswith("the disk is full: could not write") and "m:1" in info.value.message
    assert registry.versions() == [] and not (home / "models" / "m").exists()
    version, created = registry.import_folder("m", tmp_path / "src", {"op": "import"})
    assert created and version.version == 1 and Registry(home).resolve("m").version == 1


def test_a_journal_row_that_cannot_be_written_goes_in_with_the_next_write(tmp_path):
    home = tmp_path / "home"
    registry = Registry(home)
    registry._db = _FullOnce(registry._db)
    with pytest.raises(KernelError) as info:
        registry.journal_put(3, "train", "alice", 10, {"epochs": 1}, "FAILED")
    assert info.value.code is ErrorCode.INTERNAL
    assert "job journal (job 3)" in info.value.message and "registry.db" in info.value.message
    assert registry.journal_get(3) == ("train", "FAILED", {"epochs": 1})  # what it waits to write
    assert registry.journal_last_id() == 3
    registry.journal_put(4, "train", "bob", 10, {}, "QUEUED")
    reopened = Registry(home)
    assert reopened.journal_get(3) == ("train", "FAILED", {"epochs": 1})
    assert [row[0] for row in reopened.journal_unfinished()] == [4]


def test_opening_sweeps_partials_and_keeps_what_a_resume_needs(tmp_path):
    home = tmp_path / "home"
    registry = Registry(home)
    version, _ = registry.import_folder("m", hf_folder(tmp_path / "src"), {"op": "import"})
    for job, state in ((5, "FAILED"), (6, "DONE"), (7, "RUNNING")):
        registry.journal_put(job, "train", "alice", 10, {}, state)
    jobs = home / "jobs"
    planted = {
        "resumable checkpoint": jobs / "5" / "checkpoint" / "state.json",
        "partial checkpoint": jobs / "5" / "checkpoint.tmp" / "model.safetensors",
        "stale checkpoint": jobs / "5" / "checkpoint.old" / "state.json",
        "partial output": jobs / "5" / "output" / "config.json",
        "done job": jobs / "6" / "checkpoint" / "state.json",
        "no checkpoint yet": jobs / "7" / "checkpoint.tmp" / "model.safetensors",
        "unjournalled job": jobs / "8" / "work" / "step.bin",
        "half an export": version.path / "artifacts" / ".onnx-new-x" / "model.onnx",
        "an export": version.path / "artifacts" / "onnx" / "model.onnx",
    }
    for path in planted.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    Registry(home)
    kept = sorted(what for what, path in planted.items() if path.exists())
    assert kept == ["an export", "resumable checkpoint"]
    assert sorted(p.name for p in jobs.iterdir()) == ["5"]
    assert sorted(p.name for p in (jobs / "5").iterdir()) == ["checkpoint"]
