"""The command registry: filled through the hook, parsing, generated help, the docs."""

import re
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

from llmos import ErrorCode, KernelError, hookimpl
from llmos.kernel.plugins import check_hooks
from llmos.shell import handlers, views
from llmos.shell.app import load_commands, plugin_manager
from llmos.shell.commands import Command, CommandRegistry, JobRequest, Output, Param

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry():
    return load_commands()


class FakeContext:
    """Enough of a ShellContext for handlers that only read the registry."""

    def __init__(self, registry):
        self.registry = registry
        self.interactive = False


def test_the_shell_has_its_own_commands_beside_the_syscalls(registry):
    """(Each syscall's command: tests/test_syscall_agreement.py.)"""
    assert {"help", "top", "wait", "quit", "plugins", "monitor", "serve"} <= set(registry.names())


def test_aliases_find_their_commands(registry):
    for alias, name in {"jobs": "ps", "cancel": "kill", "renice": "nice", "fg": "wait",
                        "lsmod": "plugins", "exit": "quit", "?": "help"}.items():
        assert registry.get(alias).name == name
    with pytest.raises(KernelError) as info:
        registry.get("frobnicate")
    assert info.value.code is ErrorCode.NOT_FOUND and "help" in info.value.message


def test_names_and_aliases_are_unique():
    commands = CommandRegistry()
    commands.add(Command("one", "first", lambda c, a: Output(), aliases=("1",)))
    for clash in (Command("one", "again", lambda c, a: Output()),
                  Command("two", "alias taken", lambda c, a: Output(), aliases=("1",))):
        with pytest.raises(ValueError):
            commands.add(clash)
    assert commands.names() == ["one"] and commands.all_names() == ["1", "one"]


def test_a_plugin_adds_a_command_through_the_hook():
    class Plugin:
        @hookimpl
        def llmos_register_shell_commands(self, commands):
            commands.add(Command("similar", "Cosine similarity of two texts.",
                                 lambda context, args: Output(data=args),
                                 (Param("model", "model", required=True), Param("a", required=True),
                                  Param("b", required=True))))

    pm = plugin_manager()
    pm.register(Plugin(), name="similar")
    commands = CommandRegistry()
    pm.hook.llmos_register_shell_commands(commands=commands)
    assert "similar" in commands and "embed" in commands
    listed = handlers.help_(FakeContext(commands), {"command": None})
    assert "similar" in [row[0] for row in listed.tables[0].rows]
    shown = handlers.help_(FakeContext(commands), {"command": "similar"})
    assert shown.text.startswith("usage: similar MODEL A B\nCosine similarity")
    assert commands.get("similar").run(None, ["m", "x", "y"]).data == {"model": "m", "a": "x", "b": "y"}


def test_help_is_generated_from_the_registry(registry):
    listed = handlers.help_(FakeContext(registry), {"command": None})
    assert [row[0] for row in listed.tables[0].rows] == registry.names()
    assert [d["usage"] for d in listed.data] == [c.usage for c in registry]
    one = handlers.help_(FakeContext(registry), {"command": "cancel"})
    assert one.text == ("usage: kill ID\nCancel a job (any client's); its submitter gets "
                        "CANCELLED.\naliases: cancel")


def test_parsing_follows_the_parameters(registry):
    load = registry.get("load")
    assert load.parse(["minilm:2", "--device", "torch:cpu", "--priority=-5"]) == {
        "model": "minilm:2", "device": "torch:cpu", "driver": None, "precision": None,
        "calibrate": None, "max_seqs": None, "prefix_cache_mb": None, "replicas": None,
        "stages": None, "priority": -5,
        "timeout": None}
    assert registry.get("nice").parse(["12", "-5"]) == {"id": 12, "priority": -5}
    assert registry.get("ps").parse(["--all"]) == {"all": True, "owner": None}
    assert registry.get("embed").parse(["m", "a", "b", "--timeout", "2.5"])["texts"] == ["a", "b"]
    assert registry.get("embed").parse(["m", "--", "--not-an-option", "--"])["texts"] == [
        "--not-an-option", "--"]
    assert registry.get("train").parse(["m", "reviews", "--batch-size", "8"])["batch_size"] == 8


@pytest.mark.parametrize("command, words, fragment", [
    ("load", [], "load: missing MODEL[:VERSION]; usage: load MODEL[:VERSION] [--device DEVICE]"),
    ("load", ["m", "--devise", "x"],
     "load: unknown option --devise; did you mean --device or --driver?; usage: load"),
    ("load", ["m", "--device"], "load: --device needs a value"),
    ("load", ["m", "--precision", "f16"], "load: precision must be one of f32, bf16, int8, got 'f16'"),
    ("kill", ["twelve"], "kill: ID must be an integer, got 'twelve'"),
    ("kill", ["1", "2"], "kill: unexpected argument '2'"),
    ("embed", ["m", "--timeout", "soon"], "embed: SECONDS must be a number, got 'soon'"),
])
def test_bad_arguments_are_bad_requests_with_the_usage(registry, command, words, fragment):
    with pytest.raises(KernelError) as info:
        registry.get(command).parse(words)
    assert info.value.code is ErrorCode.BAD_REQUEST and fragment in info.value.message


def test_job_commands_return_requests_for_the_shell_to_submit(registry, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("first\n\n  second  \n")
    request = registry.get("embed").run(None, ["minilm:2", "zero", "--file", str(texts)])
    assert isinstance(request, JobRequest) and request.syscall == "infer"
    assert request.args == {"model": "minilm", "version": 2, "priority": None, "timeout": None,
                            "task": "embed", "inputs": ["zero", "first", "second"]}
    imported = registry.get("import").run(None, ["--path", "~/models/x"])
    assert imported.args["path"] == str(Path("~/models/x").expanduser().resolve())
    trained = registry.get("train").run(None, ["minilm", "reviews", "--limit", "10"])
    assert trained.args["data"] == "reviews" and trained.args["limit"] == 10


@pytest.mark.parametrize("words, fragment", [
    (["embed", "minilm"], "embed: give TEXT... or --file PATH"),
    (["embed", "minilm", "--file", "/no/such/file"], "embed: cannot read /no/such/file"),
    (["embed", "minilm:0", "x"], "bad model version in 'minilm:0'"),
    (["import"], "import: give a SOURCE or --path"),
    (["train", "minilm", "reviews", "--path", "x.csv"], "train: give a DATASET or --path (not both)"),
])
def test_handlers_reject_what_parsing_cannot(registry, words, fragment):
    with pytest.raises(KernelError) as info:
        registry.get(words[0]).run(None, words[1:])
    assert info.value.code is ErrorCode.BAD_REQUEST and fragment in info.value.message


def test_docs_list_every_command_with_its_usage(registry):
    text = (ROOT / "docs" / "shell.md").read_text()
    documented = set(re.findall(r"^### `(\S+)`$", text, flags=re.MULTILINE))
    assert documented == set(registry.names()), "docs/shell.md and the registry differ"
    for command in registry:
        assert f"`{command.usage}`" in text, f"docs/shell.md lacks the usage of {command.name}"
        for alias in command.aliases:
            assert f"alias `{alias}`" in text, f"docs/shell.md lacks the alias {alias}"


def test_shell_hook_implementations_are_checked_against_the_shells_spec():
    class Misspelled:
        @hookimpl
        def llmos_register_shell_command(self, commands):
            pass

    class WrongParameters:
        @hookimpl
        def llmos_register_shell_commands(self, registry):
            pass

    pm = plugin_manager()
    with pytest.raises(pluggy.PluginValidationError):
        pm.register(WrongParameters(), name="wrong")
    pm.register(Misspelled(), name="misspelled")
    with pytest.raises(pluggy.PluginValidationError):
        check_hooks(pm)


def test_registering_commands_imports_no_terminal_library():
    """The kernel imports every built-in plugin, and some register shell commands: that
    must not drag prompt_toolkit, rich or the handlers in."""
    code = ("import sys; from llmos.kernel.plugins import get_plugin_manager, collect; "
            "collect(get_plugin_manager()); "
            "print(sorted(m for m in ('prompt_toolkit', 'rich', 'llmos.shell.handlers', "
            "'llmos.shell.render') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("progress, shown", [
    ({"step": 3, "total_steps": 94, "loss": 0.5125, "epoch": 0.03}, " step 3/94 loss 0.512 "),
    ({"phase": "saving", "done": False, "fraction": 0.5}, " saving (50%) "),
    ({"phase": "measuring the current version", "done": False, "step": 0, "total_steps": 0,
      "loss": None}, " measuring the current version "),
    ({"phase": "training: step 4/90", "step": 4, "total_steps": 90, "loss": 0.25},
     " training: step 4/90 loss 0.250 "),
])
def test_progress_lines_of_train_compress_and_update_jobs(progress, shown):
    summary = {"id": 7, "state": "RUNNING", "device": "torch:cpu", "started_at": 100.0,
               "progress": progress}
    line = views.progress(summary, 102.5)
    assert line == f"job 7 RUNNING on torch:cpu{shown}2.5 s (Ctrl-C cancels)"
