"""``llmos`` help on every subcommand (``X --help``, ``X -h``, ``help X``), ``--version``,
suggestions for typos, and where the help text comes from: in-process, no kernel."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from llmos import __version__
from llmos.contract.syscalls import SYSCALLS
from llmos.shell import app, cli
from llmos.shell.app import load_commands

ROOT = Path(__file__).resolve().parents[2]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action is not None else {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) for every subcommand, nested ones included."""
    for name, sub in _subparsers(parser).items():
        yield (*path, name), sub
        yield from _walk(sub, (*path, name))


PARSER = cli.build_parser()
PATHS = {words: sub for words, sub in _walk(PARSER)}
REGISTRY = load_commands()


def _expected_options(words: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """The options a subcommand's help must mention: a delegated command's are its shell
    command's parameters (from the shell's table, not from the parser built from it)."""
    if words[0] in cli.DELEGATED:
        return [p.flag for p in REGISTRY.get(words[0]).options]
    return [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_every_delegated_command_and_syscall_subcommand_is_walked():
    names = {words[0] for words in PATHS}
    assert set(cli.DELEGATED) <= names
    assert {path.split()[0] for path in cli.SYSCALL_OF} <= names
    assert {"kernel", "models", "keys", "help", "shell"} <= names


@pytest.mark.parametrize("form", ["--help", "-h", "help"])
@pytest.mark.parametrize("words", sorted(PATHS), ids=[" ".join(w) for w in sorted(PATHS)])
def test_every_subcommand_has_help_three_ways(capsys, words, form):
    argv = ["help", *words] if form == "help" else [*words, form]
    status, out, err = _run(capsys, argv)
    assert status == 0 and err == "", err
    assert out.startswith(f"usage: llmos {' '.join(words)}"), out[:200]
    missing = [o for o in _expected_options(words, PATHS[words]) if o not in out]
    assert not missing, f"`llmos {' '.join(argv)}` does not mention {missing}"


def test_the_top_level_help_lists_every_command_and_says_how_to_learn_more(capsys):
    status, out, _ = _run(capsys, ["--help"])
    assert status == 0
    for name in _subparsers(PARSER):
        assert re.search(rf"^\s+{re.escape(name)}\s", out, flags=re.MULTILINE), name
    assert "llmos help COMMAND" in out and "llmos COMMAND --help" in out
    assert "llmos train help" not in out
    assert _run(capsys, [])[1] == out == _run(capsys, ["help"])[1]


def test_version(capsys):
    assert _run(capsys, ["--version"]) == (0, f"llmos {__version__}\n", "")


@pytest.mark.parametrize("argv, suggestion", [
    (["modles"], "did you mean models?"),
    (["kernel", "strat"], "did you mean start"),
    (["help", "trian"], "did you mean train"),
    (["load", "minilm", "--devcie", "torch:cpu"], "did you mean --device"),
    (["jobs", "--owmer"], "did you mean --owner?"),
    (["load", "minilm", "--precision", "f16"], "did you mean bf16?"),
])
def test_a_typo_is_one_error_line_with_a_suggestion(capsys, argv, suggestion):
    status, out, err = _run(capsys, argv)
    assert status == cli.ExitStatus.ERROR and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error BAD_REQUEST: llmos") and suggestion in err


def test_a_delegated_commands_help_runs_nothing_and_a_bare_double_dash_passes_it_on(
        capsys, monkeypatch):
    ran: list[str] = []
    monkeypatch.setattr(app, "run_shell", lambda args: ran.append(args.shell_command) or 0)
    status, out, _ = _run(capsys, ["chat", "smollm2", "-h"])
    assert status == 0 and out.startswith("usage: llmos chat MODEL[:VERSION]") and ran == []
    assert _run(capsys, ["chat", "smollm2", "--", "-h"])[0] == 0
    assert ran == ["chat smollm2 -- -h"]


def test_help_lines_come_from_the_syscall_and_shell_command_tables():
    for path, syscall in cli.SYSCALL_OF.items():
        parser = PATHS[tuple(path.split())]
        assert parser.description == SYSCALLS[syscall].doc, path
    for name in cli.DELEGATED:
        assert PATHS[(name,)].description.startswith(REGISTRY.get(name).help), name
    lines = cli.build_parser().format_help()
    assert not re.search(r"^\s+(\w+)\s+\1 a ", lines, flags=re.MULTILINE)  # "job a job"


@pytest.mark.parametrize("doc, line", [
    ("Liveness check; answered on the IO thread.", "Liveness check"),
    ("One job's status.", "One job's status"),
    ("Ask a model (e.g. smollm2) and stream its answer. Then more.",
     "Ask a model (e.g. smollm2) and stream its answer"),
    ("Load a model version: onto one device, one driver's, or (default) every driver, timing "
     "each so batches go where they run fastest.", "Load a model version"),
])
def test_a_summary_is_the_first_clause(doc, line):
    assert cli.summary(doc) == line


def test_the_exit_status_table_in_the_docs_is_the_enum():
    text = (ROOT / "docs" / "shell.md").read_text()
    section = text[text.index("**Exit status**"):]
    rows = re.findall(r"^\| (\d+) \|", section, flags=re.MULTILINE)
    assert [int(r) for r in rows] == [int(s) for s in cli.ExitStatus]
