"""Run a command in a real pseudo-terminal, as a user at a terminal would (tests of what
miniray prints there: the progress bar, `miniray status`, `miniray logs -f` and its Ctrl-C)."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import termios
import time

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(argv, env, timeout=45.0, when=None, send=b"\x03", columns=100):
    """Run ``argv`` with a pty as its controlling terminal (stdin, stdout, stderr); return
    ``(exit status, output)``. When ``when`` (a str) first shows in the output, ``send`` is
    typed into the terminal (default Ctrl-C: the terminal sends SIGINT to the foreground
    process group, as for a user). The run is bounded by ``timeout``: then the command is
    killed and the test fails."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: its own session, the pty its terminal (pty.fork did that)
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    out = b""
    deadline = time.monotonic() + timeout
    sent = when is None
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal (it exited)
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and when in out.decode(errors="replace"):
                os.write(fd, send)
                sent = True
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"{argv} did not end within {timeout}s; its output:\n"
                                 f"{out.decode(errors='replace')}")
        end = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"{argv} closed its terminal but did not exit")
            time.sleep(0.05)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def screen(text):
    """What a terminal shows of ``text``: each line as its last redraw (after the last
    carriage return) left it, colour codes removed."""
    lines = []
    for line in _ANSI.sub("", text).replace("\r\n", "\n").split("\n"):
        lines.append(line.rstrip("\r").rsplit("\r", 1)[-1])
    return "\n".join(lines)
