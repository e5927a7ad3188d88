"""The command-line syntax shared by the runner, the completer and the highlighter."""

import pytest

from llmos import ErrorCode, KernelError
from llmos.shell.syntax import CommandLine, current_word, fragments, split_commands, tokenize


def words(line):
    return [t.text for t in tokenize(line) if not t.op]


def test_words_split_like_a_shell():
    assert words("embed minilm 'great film' \"say \\\"hi\\\"\" it\\'s") == [
        "embed", "minilm", "great film", 'say "hi"', "it's"]
    assert words("a'b'\"c\"d") == ["abcd"]
    assert words("ps  # a comment") == ["ps"]
    assert words("kill -5 a#b") == ["kill", "-5", "a#b"]


def test_operators_end_commands_and_background_them():
    assert split_commands("models; ps --all\nembed minilm 'a; b' &") == [
        CommandLine(["models"]), CommandLine(["ps", "--all"]),
        CommandLine(["embed", "minilm", "a; b"], background=True)]
    assert split_commands("embed minilm x&") == [CommandLine(["embed", "minilm", "x"], True)]
    assert split_commands("  # only a comment") == []
    assert split_commands("ps\n\nmodels\n") == [CommandLine(["ps"]), CommandLine(["models"])]


@pytest.mark.parametrize("line, fragment", [
    ("embed minilm 'unfinished", "unterminated quote at column 14"),
    ("& ps", "unexpected '&' at column 1"),
    ("ps ; ; models", "unexpected ';' at column 6"),
])
def test_malformed_lines_are_bad_requests(line, fragment):
    with pytest.raises(KernelError) as info:
        split_commands(line)
    assert info.value.code is ErrorCode.BAD_REQUEST and fragment in info.value.message


def test_current_word_is_what_the_cursor_completes():
    assert current_word("") == ([], "", 0)
    assert current_word("emb") == ([], "emb", 3)
    assert current_word("embed ") == (["embed"], "", 0)
    assert current_word("embed min") == (["embed"], "min", 3)
    assert current_word("embed minilm 'great fi") == (["embed", "minilm"], "great fi", 9)
    assert current_word("ps; kil") == ([], "kil", 3)
    assert current_word("embed minilm x & ") == ([], "", 0)


def test_fragments_cover_the_line_and_name_what_they_are():
    line = "embed minilm --priority -5 'a b' & nope # why"
    pieces = fragments(line, {"embed"})
    assert "".join(text for _, text in pieces) == line
    styled = {text: style for style, text in pieces if text.strip()}
    assert styled["embed"] == "class:command" and styled["nope"] == "class:unknown"
    assert styled["--priority"] == "class:option" and styled["-5"] == "class:number"
    assert styled["'a b'"] == "class:string" and styled["&"] == "class:operator"
    assert styled[" # why"] == "class:comment"
