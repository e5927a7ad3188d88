"""Completion as pure functions of the text before the cursor: no terminal, no kernel."""

import pytest

from llmos.shell.app import load_commands
from llmos.shell.completer import CompletionContext, quote, suggest


@pytest.fixture(scope="module")
def context():
    return CompletionContext(load_commands(), models={"minilm": [1, 2], "reviews": [1]},
                             jobs=[12, 3], devices=["torch:cpu", "openvino:cpu"],
                             drivers=["torch", "openvino", "onnxruntime"],
                             datasets=["reviews", "drugs"])


@pytest.mark.parametrize("text, expected", [
    ("e", ["embed", "evaluate", "exit", "export"]),
    ("ki", ["kill"]),
    ("ls", ["lsmod"]),
    ("embed m", ["minilm"]),
    ("embed ", ["minilm", "reviews"]),
    ("classify reviews:", ["reviews:1"]),
    ("load minilm:", ["minilm:1", "minilm:2"]),
    ("kill ", ["3", "12"]),
    ("nice 1", ["12"]),
    ("wait ", ["3", "12"]),
    ("load minilm --d", ["--device", "--driver"]),
    ("load minilm --device ", ["openvino:cpu", "torch:cpu"]),
    ("load minilm --device=t", ["--device=torch:cpu"]),
    ("load minilm --driver o", ["onnxruntime", "openvino"]),
    ("load minilm --precision ", ["bf16", "f32", "int8"]),
    ("export minilm ", ["onnx", "openvino"]),
    ("train minilm ", ["drugs", "reviews"]),
    ("train minilm reviews --batch", ["--batch-size"]),
    ("evaluate reviews:1 drugs --split v", ["validation"]),
    ("help ", None),  # every command name, checked below
    ("help ps", ["ps"]),
    ("ps --all --", ["--owner"]),
    ("models; ps --all; k", ["kill"]),
    ("embed minilm x & emb", ["embed"]),
])
def test_suggestions(context, text, expected):
    names = context.registry.all_names()
    assert suggest(text, context) == (expected if expected is not None else names)


@pytest.mark.parametrize("text", [
    "embed minilm ",             # free text
    "embed minilm 'great fi",    # inside an unterminated quote
    "frobnicate ",               # unknown command
    "models ",                   # no parameters
    "nice 12 ",                  # NICE is a number
    "kill 99",                   # no such job
])
def test_no_suggestions(context, text):
    assert suggest(text, context) == []


def test_the_first_word_offers_every_command_and_alias(context):
    offered = suggest("", context)
    assert {"help", "ps", "jobs", "kill", "cancel", "nice", "renice", "top", "wait", "fg"} <= set(offered)
    assert offered == sorted(offered)


def test_paths_complete_files_and_folders(context, tmp_path):
    (tmp_path / "texts.txt").write_text("x")
    (tmp_path / "texts-2.txt").write_text("x")
    (tmp_path / "textbooks").mkdir()
    (tmp_path / ".texts-hidden").write_text("x")
    assert suggest(f"embed minilm --file {tmp_path}/text", context) == [
        f"{tmp_path}/textbooks/", f"{tmp_path}/texts-2.txt", f"{tmp_path}/texts.txt"]
    assert suggest(f"import --path {tmp_path}/.t", context) == [f"{tmp_path}/.texts-hidden"]
    assert suggest(f"embed minilm --file {tmp_path}/missing/x", context) == []


def test_offered_words_are_quoted_only_when_they_must_be():
    assert quote("minilm:1") == "minilm:1"
    assert quote("/tmp/a-b_c.txt") == "/tmp/a-b_c.txt"
    assert quote("my texts.txt") == "'my texts.txt'"
    assert quote("a&b") == "'a&b'"
