"""Generation as a newcomer meets it: sampling defaults from the model or conservative ones,
a short answer by default in the chat command, and an end line with tokens, rate, time to
first token and finish reason (on stderr, so the answer alone can be piped)."""

import re
import subprocess
import sys

import pytest

from llmos.drivers.generation import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from llmos.shell.handlers import CHAT_MAX_TOKENS

END_LINE = re.compile(r"\[(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s, first token [\d.]+ s, "
                      r"finished: (stop|length)\]")


@pytest.mark.timeout(600)
def test_a_generation_without_sampling_options_gets_the_defaults(chat_kernel):
    with chat_kernel.client() as client:
        plain = client.submit("generate", {"model": "smollm2", "prompt": "Hello",
                                           "max_tokens": 4}).result()
        asked = client.submit("generate", {"model": "smollm2", "prompt": "Hello",
                                           "max_tokens": 4, "temperature": 0.0}).result()
    # SmolLM2's converted folder sets no sampling in its generation config: llmos's defaults
    assert plain["sampling"] == {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P}
    assert asked["sampling"] == {"temperature": 0.0, "top_p": DEFAULT_TOP_P}


@pytest.mark.timeout(600)
def test_cli_chat_prints_the_answer_then_an_end_line(chat_kernel):
    done = subprocess.run(
        [sys.executable, "-m", "llmos.shell", "--address", chat_kernel.address, "chat",
         "smollm2", "--ignore-eos", "Name a colour."],
        capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "tokens/s" not in done.stdout  # the answer only
    match = END_LINE.search(done.stderr)
    assert match, done.stderr
    # --ignore-eos: it runs to the chat command's default length
    assert int(match.group(1)) == CHAT_MAX_TOKENS and match.group(2) == "length"
