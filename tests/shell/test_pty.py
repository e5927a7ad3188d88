"""The real shell in a pseudo-terminal, against a real kernel: completion, job control,
Ctrl-C, top, history. Output is matched loosely (the terminal stream carries escape
codes); the kernel is asked directly for job states."""

import fcntl
import os
import struct
import subprocess
import sys
import termios
import time

import pexpect
import pexpect.fdpexpect
import pytest

PROMPT = "llmos>"
WAIT = 120  # generous: the machine may be loaded


@pytest.fixture
def terminal(shell_kernel, home):
    """A shell in a 50x200 pseudo-terminal; LLMOS_HOME (history) is a fresh folder."""
    child = spawn(shell_kernel, home)
    yield child
    if child.process.poll() is None:
        child.sendline("quit")
        child.expect(pexpect.EOF, timeout=WAIT)
    assert child.process.wait(WAIT) == 0


class Terminal(pexpect.fdpexpect.fdspawn):
    """pexpect on the master side of a pty whose slave is the shell's controlling terminal.

    The shell is started with subprocess (vfork/exec), not pexpect's fork: once torch or
    OpenVINO have started their thread pools in the test process (tests/drivers), a plain
    fork() child can die in the frameworks' fork handlers before it ever execs.
    """

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave, stdout=slave,
                                        stderr=slave, env=env, close_fds=True)
        os.close(slave)
        super().__init__(master, encoding="utf-8", timeout=WAIT)

    def sendeof(self) -> None:
        self.send("\x04")

    def sendintr(self) -> None:
        self.send("\x03")

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> str:
        try:
            return super().read_nonblocking(size, timeout)
        except OSError:  # EIO on the master once the shell has exited and closed the pty
            self.flag_eof = True
            raise pexpect.EOF("the shell exited") from None


def spawn(kernel, home):
    env = {**os.environ, "LLMOS_HOME": str(home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = Terminal([sys.executable, "-m", "llmos.shell", "shell", "--address", kernel.address],
                     env)
    child.expect(PROMPT)
    return child


def wait_for_state(kernel, job_id, state):
    with kernel.client() as client:
        deadline = time.monotonic() + WAIT
        while client.job(job_id)["state"] != state:
            assert time.monotonic() < deadline, f"job {job_id} never reached {state}"
            time.sleep(0.05)


def state_of(kernel, job_id):
    with kernel.client() as client:
        return client.job(job_id)["state"]


def test_tab_completes_a_loaded_model_name(terminal):
    terminal.send("embed m")
    terminal.expect("minilm")  # offered in the menu while typing
    terminal.send("\t")
    terminal.send(" 'hello world'\r")  # runs only if TAB put "minilm" on the line
    terminal.expect(r"\[0\] dim 384")
    terminal.expect(PROMPT)


def ps_then_kill(terminal, kernel, command: str, syscall: str, states: str) -> int:
    """Run ``command &``, see its job in ``ps`` (in one of ``states``), kill it; its id."""
    terminal.sendline(f"{command} &")
    terminal.expect(rf"\[(\d+)\] {command.split()[0]} minilm")
    job_id = int(terminal.match.group(1))
    terminal.expect(PROMPT)
    wait_for_state(kernel, job_id, "RUNNING")
    terminal.sendline("ps")
    terminal.expect(rf"│ {job_id} +│[^\n]*│ {syscall} +│ minilm +│ ({states}) ")
    terminal.expect(PROMPT)
    terminal.sendline(f"kill {job_id}")
    terminal.expect(f"job {job_id} cancelled")
    assert state_of(kernel, job_id) == "CANCELLED"
    return job_id


def test_ps_shows_a_running_job_and_kill_ends_it(terminal, shell_kernel, long_texts):
    job_id = ps_then_kill(terminal, shell_kernel, f"embed minilm --file {long_texts}",
                          "infer", "RUNNING")
    terminal.sendline("ping")
    terminal.expect("pong")
    seen = terminal.before
    terminal.expect(PROMPT)
    # The background job's end is reported before a prompt: this one or the next.
    assert f"[{job_id}] CANCELLED: embed minilm" in seen + terminal.before


def test_ctrl_c_cancels_the_foreground_job_and_the_prompt_returns(terminal, shell_kernel,
                                                                   long_texts):
    terminal.sendline(f"embed minilm --file {long_texts}")
    terminal.expect(r"job (\d+) (QUEUED|RUNNING)")  # the progress line
    job_id = int(terminal.match.group(1))
    wait_for_state(shell_kernel, job_id, "RUNNING")
    terminal.sendintr()
    terminal.expect(f"error CANCELLED: job {job_id} cancelled")
    terminal.expect(PROMPT)
    assert state_of(shell_kernel, job_id) == "CANCELLED"
    terminal.sendline("ping")  # the shell lives on
    terminal.expect("pong")
    terminal.expect(PROMPT)


def test_a_background_job_comes_back_with_fg(terminal):
    terminal.sendline("embed minilm 'in the background' &")
    terminal.expect(r"\[(\d+)\] embed minilm")
    terminal.expect(PROMPT)
    terminal.sendline("fg")
    terminal.expect(r"\[0\] dim 384")
    terminal.expect(PROMPT)
    terminal.sendline("wait")
    terminal.expect("no background job")
    terminal.expect(PROMPT)


def test_a_bad_command_leaves_the_shell_running(terminal):
    terminal.sendline("load")
    terminal.expect("error BAD_REQUEST: load: missing MODEL")
    terminal.sendline("embed minilm 'unterminated")
    terminal.expect("error BAD_REQUEST: unterminated quote")
    terminal.sendline("kill 999999")
    terminal.expect("error NOT_FOUND")
    terminal.sendline("ping")
    terminal.expect("pong")
    terminal.expect(PROMPT)


def test_top_refreshes_until_q(terminal):
    terminal.sendline("top")
    terminal.expect("loaded models")
    terminal.expect("minilm:1")
    terminal.send("q")
    terminal.expect(PROMPT)
    terminal.sendline("ping")
    terminal.expect("pong")
    terminal.expect(PROMPT)


def test_history_survives_the_session(shell_kernel, home):
    first = spawn(shell_kernel, home)
    first.sendline("ping")
    first.expect("pong")
    first.expect(PROMPT)
    first.sendeof()  # Ctrl-D leaves (and is not history)
    first.expect(pexpect.EOF)
    assert "ping" in (home / "shell_history").read_text()
    second = spawn(shell_kernel, home)
    second.send("\x1b[A")  # up arrow: the last command of the previous session
    second.send("\r")
    second.expect("pong")
    second.expect(PROMPT)
    second.sendeof()
    second.expect(pexpect.EOF)


def test_ps_shows_a_running_training_job_and_kill_ends_it(terminal, shell_kernel):
    ps_then_kill(terminal, shell_kernel,
                 "train minilm reviews --name pty-train --limit 2000 --quantum 0.5",
                 "train", "RUNNING|QUEUED")
    terminal.expect(PROMPT)


def test_ctrl_c_stops_a_chat_answer_and_the_conversation_goes_on(chat_kernel, home):
    child = spawn(chat_kernel, home)
    child.sendline("chat smollm2 --ignore-eos --max-tokens 1000")
    child.expect("you>")
    child.sendline("Count from one to one thousand in words.")
    with chat_kernel.client() as client:
        deadline = time.monotonic() + WAIT
        while not any(j["syscall"] == "generate" and j["state"] == "RUNNING"
                      for j in client.jobs(finished=False)):
            assert time.monotonic() < deadline, "the chat's generation never ran"
            time.sleep(0.05)
        (job,) = [j for j in client.jobs(finished=False) if j["syscall"] == "generate"]
    child.sendintr()
    child.expect(r"\[stopped: the answer was cancelled\]")
    child.expect("you>")  # still in the conversation
    assert state_of(chat_kernel, job["id"]) == "CANCELLED"
    child.sendline("")  # an empty line leaves it
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF, timeout=WAIT)
    assert child.process.wait(WAIT) == 0
