"""miniray in a terminal: the progress bar of scripts (in a real pseudo-terminal and in a pipe),
`miniray status`, `miniray jobs` and `miniray logs` (`-f`, Ctrl-C, `--item`) as a user reads
them."""

import concurrent.futures as cf
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import ptys
import terminal_tasks as tt
from support import ROOT, TESTS, wait_for

import miniray
from miniray.client import observe

pytestmark = pytest.mark.timeout(60)

HOST = socket.gethostname()


def _script_env():
    """A script's environment: no server named, so it starts the embedded local cluster."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE")}
    env.update(PYTHONPATH=os.pathsep.join([TESTS, ROOT]), MINIRAY_LOCAL_WORKERS="2",
               TERM="xterm", PYTHONUNBUFFERED="1")
    return env


def _cli_env(cluster):
    env = dict(os.environ, MINIRAY_REDIS_URL=cluster.url, MINIRAY_NAMESPACE=cluster.namespace,
               PYTHONPATH=os.pathsep.join([TESTS, ROOT]), TERM="xterm")
    return env


CLI = [sys.executable, "-m", "miniray.cli"]


def _last(screen, label):
    """The bar's last state as the terminal shows it (the last line that starts with it)."""
    return [ln for ln in screen.splitlines() if ln.startswith(label + ":")][-1]


# -- the progress bar -------------------------------------------------------------------------

def test_progress_bar_in_a_terminal_counts_and_sums_up_the_errors():
    """A script in a real pseudo-terminal: the bar ends full with its done/failed counts and
    tqdm's rate; the summary groups the failures by type x count x host; errors="skip" left
    the failed items out; a map's bar; the default raises the first failed item."""
    status, out = ptys.run([sys.executable, "-c", tt.PROGRESS_SCRIPT], _script_env())
    screen = ptys.screen(out)
    assert status == 0, screen
    assert "\r" in out  # a terminal: the bar is redrawn in place
    bar = _last(screen, "skipping")
    assert re.search(r"100%\|█+\| 24/24 \[[\d:]+<[\d:]+, +[\d.]+item/s, done=18, failed=6\]",
                     bar), bar
    assert re.search(rf"6 of 24 items failed:\n  ValueError  x6  on {re.escape(HOST)}  "
                     r"first: item 0: item 0 fails\n", screen), screen
    assert "results: 18 [10, 20, 30]" in screen  # (items 0, 4, 8... skipped)
    odd = _last(screen, "odd")
    assert "15/15" in odd and "done=15, failed=0" in odd, odd
    assert "odd count 15" in screen
    raising = _last(screen, "raising")
    # every future had ended: the bar is full though the loop stopped at item 0
    assert "24/24" in raising and "done=18, failed=6" in raising, raising
    assert "raised: item 0 fails" in screen


def test_progress_outside_a_terminal_prints_short_plain_lines():
    """In a pipe (a CI log, `| cat`) the bar is plain lines, no carriage returns, no
    colours, a handful per bar; the summary is the same."""
    p = subprocess.run([sys.executable, "-c", tt.PROGRESS_SCRIPT], env=_script_env(),
                       capture_output=True, text=True, timeout=45)
    assert p.returncode == 0, p.stderr
    err = p.stderr
    assert "\r" not in err and "\x1b" not in err, repr(err)
    lines = err.splitlines()
    assert len(lines) <= 12, err  # three bars (start and end lines each) and the summaries
    assert all(len(ln) <= 100 for ln in lines), err
    bar = [ln for ln in lines if ln.startswith("skipping:")][-1]
    assert re.search(r"100%\|#+\| 24/24 .*done=18, failed=6\]$", bar), bar
    assert f"  ValueError  x6  on {HOST}  first: item 0: item 0 fails" in err
    assert "results: 18" in p.stdout and "raised: item 0 fails" in p.stdout


def test_ctrl_c_ends_a_maps_bar_and_cancels_the_map():
    """Ctrl-C typed at the terminal while a map with a bar runs: the bar stops with a line
    saying so, the map's job is cancelled, the script goes on and exits cleanly."""
    status, out = ptys.run([sys.executable, "-c", tt.INTERRUPT_SCRIPT], _script_env(),
                           when="done=4")
    screen = ptys.screen(out)
    assert status == 0, screen
    assert re.search(r"interrupted \(Ctrl-C\) after \d+ of 200 items ended \(\d+ done, "
                     r"0 failed\)", screen), screen
    bar = _last(screen, "slow")
    m = re.search(r"\| (\d+)/200 .*, failed=0, cancelled=\d+\]", bar)
    assert m and int(m.group(1)) < 200, bar  # (what was cancelled did not fill it)
    assert "caught Ctrl-C; the job is cancelled" in screen, screen
    assert "Traceback" not in screen


def test_progress_errors_return_and_bad_arguments(cluster):
    """errors="return" yields each failed item's exception in its place; bad arguments say
    what to give; a bar written to a file that is not a terminal is plain lines."""
    cluster.start_worker(name="pw")
    with cluster.executor(job_name="ret") as ex:
        futures = [ex.submit(tt.fail_some, x, 3) for x in range(7)]
        out = io.StringIO()
        got = list(miniray.progress(futures, desc="ret", errors="return", file=out))
        with pytest.raises(miniray.ConfigurationError, match="'raise'.*'skip'.*'return'"):
            miniray.progress(futures, errors="ignore")
        with pytest.raises(miniray.ConfigurationError, match="seconds"):
            miniray.progress(futures, timeout=-1)
    assert [type(v).__name__ if isinstance(v, Exception) else v for v in got] == \
        ["ValueError", 10, 20, "ValueError", 40, 50, "ValueError"]
    text = out.getvalue()
    assert "\r" not in text and "7/7" in text.splitlines()[-3], text
    assert text.splitlines()[-2:] == [
        "3 of 7 items failed:", "  ValueError  x3  on " + HOST + "  first: item 0: item 0 fails"]


def test_progress_timeout_bounds_the_loop(cluster):
    cluster.start_worker(name="tw")
    with cluster.executor(job_name="slowpoke") as ex:
        f = ex.submit(tt.fail_some, 1, 4, 5.0)
        t0 = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            list(miniray.progress([f], timeout=0.5, file=io.StringIO()))
        assert time.monotonic() - t0 < 5
        ex.cancel()


def test_format_errors_groups_by_type_and_host():
    errors = [("ValueError", "gpu1", 17, "bad header\nmore"), ("ValueError", "gpu1", 3, "x"),
              ("ValueError", "gpu2", 5, "y"), ("TaskTimeoutError", "gpu2", 40, "ran over")]
    from miniray.client.progressbar import format_errors

    assert format_errors(errors, 100) == (
        "4 of 100 items failed:\n"
        "  ValueError        x2  on gpu1  first: item 3: x\n"
        "  TaskTimeoutError  x1  on gpu2  first: item 40: ran over\n"
        "  ValueError        x1  on gpu2  first: item 5: y")


# -- miniray status, jobs, logs ----------------------------------------------------------------

def test_durations_read_as_people_write_them():
    assert [observe.format_duration(s) for s in (None, 4.25, 75.3, 133, 4000, 200000)] == \
        ["-", "4.2s", "1m 15s", "2m 13s", "1h 06m", "2d 07h"]


def test_status_and_jobs_in_a_terminal(cluster):
    """`miniray status` and `miniray jobs` in a pseudo-terminal: states in words, a failed
    job with its counts, start times and durations, no raw dicts or epoch seconds."""
    cluster.start_worker(name="sw")
    with cluster.executor(job_name="half bad") as ex:
        cf.wait([ex.submit(tt.fail_some, x, 2) for x in range(4)], timeout=30)
    with cluster.executor(job_name="fine") as ex:
        assert list(ex.map(tt.fail_some, [1, 3])) == [10, 30]
    env = _cli_env(cluster)
    status, out = ptys.run(CLI + ["status"], env)
    screen = ptys.screen(out)
    assert status == 0, screen
    jobs = {r[1]: r for r in (re.split(r"\s{2,}", ln.strip()) for ln in screen.splitlines()
                              if ln.startswith("  ") and "'" in ln)}
    assert jobs["'half bad'"][2:8] == ["failed", "0", "0", "2", "2", "0"], screen
    assert jobs["'fine'"][2] == "done", screen
    assert re.fullmatch(r"\d\d:\d\d:\d\d", jobs["'fine'"][8]), screen
    assert re.fullmatch(r"\d+\.\ds", jobs["'fine'"][9]), screen
    # no dicts, no epoch floats (a job id such as bc0566427501.0 is neither)
    assert not re.search(r"\{|(?<![\w.])\d{10}\.\d", screen), screen
    status, out = ptys.run(CLI + ["jobs"], env)
    screen = ptys.screen(out)
    assert status == 0, screen
    row = next(ln for ln in screen.splitlines() if "'half bad'" in ln)
    assert re.split(r"\s{2,}", row.strip())[2:4] == ["failed 2 of 4", "2/2/4"], screen


def test_logs_show_time_worker_and_item_and_filter_one_item(cluster):
    cluster.start_worker(name="lw")
    with cluster.executor(job_name="talk") as ex:
        assert list(ex.map(tt.tick, [2, 3], [0, 0], ["a", "b"])) == [2, 3]
        job = ex.job_id
    env = _cli_env(cluster)
    status, out = ptys.run(CLI + ["logs"], env)  # the newest job
    screen = ptys.screen(out)
    assert status == 0, screen
    lines = screen.splitlines()
    assert re.match(rf"job {re.escape(job)} 'talk': done, started \d\d:\d\d:\d\d, "
                    r"ran \d+\.\ds$", lines[0]), screen
    body = [ln for ln in lines if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", ln)]
    assert [ln.split(" ", 1)[1] for ln in body] == [
        "lw[0] stdout: a 0", "lw[0] stdout: a 1",
        "lw[1] stdout: b 0", "lw[1] stdout: b 1", "lw[1] stdout: b 2"], screen
    status, out = ptys.run(CLI + ["logs", "talk", "--item", "1"], env)
    screen = ptys.screen(out)
    assert status == 0 and "; only item 1" in screen, screen
    assert [ln.split(" ", 1)[1] for ln in screen.splitlines()
            if re.match(r"\d\d:\d\d:\d\d\.\d{3} ", ln)] == [
        "lw[1] stdout: b 0", "lw[1] stdout: b 1", "lw[1] stdout: b 2"], screen
    status, out = ptys.run(CLI + ["logs", "talk", "--item", "7"], env)
    assert status == 0 and "(no log lines of item 7" in out, out


def test_logs_follow_ends_on_ctrl_c_with_status_0(cluster):
    """`miniray logs -f` of a running job prints lines as they come; Ctrl-C typed at the
    terminal ends it with status 0 and no traceback; the job runs on."""
    cluster.start_worker(name="fw")
    ex = cluster.executor(job_name="ticker")
    try:
        f = ex.submit(tt.tick, 600, 0.05)
        status, out = ptys.run(CLI + ["logs", "-f", "ticker"], _cli_env(cluster),
                               when="tick 5")
        screen = ptys.screen(out)
        assert status == 0, screen
        assert "Traceback" not in screen and "KeyboardInterrupt" not in screen, screen
        assert re.search(r"\d\d:\d\d:\d\d\.\d{3} fw\[0\] stdout: tick 5", screen), screen
        assert not f.done()  # the job was only watched
    finally:
        ex.cancel()
        ex.shutdown()


def test_logs_follow_ends_by_itself_when_the_job_ends(cluster):
    cluster.start_worker(name="ew")
    ex = cluster.executor(job_name="short")
    f = ex.submit(tt.tick, 20, 0.05)
    wait_for(lambda: ex.progress()["running"] == 1, what="the task to run")
    result = {}
    t = threading.Thread(target=lambda: result.update(
        zip(("status", "out"), ptys.run(CLI + ["logs", "-f", "short"], _cli_env(cluster)))))
    t.start()
    assert f.result(timeout=30) == 20
    ex.shutdown()  # the job ends: -f reads its last lines and returns
    t.join(30)
    assert not t.is_alive()
    screen = ptys.screen(result["out"])
    assert result["status"] == 0, screen
    assert "ew[0] stdout: tick 19" in screen and "(job ended: done)" in screen, screen
