"""Idle slots cost the server and their worker nothing on a clock (see miniray.worker.task.idlewait
and the worker's collect), and still get work.

A private server, a real worker with several slots; what the server did is read from its own
``INFO commandstats`` (counts, never times).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

import miniray
from miniray.broker import connect
from miniray.keys import Keys
from support import own_server, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

SLOTS = 8


def _calls(r, command: str) -> int:
    info = r.execute("INFO", "commandstats")
    info = info.decode() if isinstance(info, bytes) else info
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def _wakeups(pid: int) -> int:
    """How many times the threads of process ``pid`` went to sleep and were woken."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        n += int(line.split()[1])
        except OSError:
            pass  # a thread that ended
    return n


def _stop(w) -> None:
    """SIGTERM the worker; SIGKILL it if it has not left within 20 s."""
    w.terminate()
    try:
        w.wait(20)
    except subprocess.TimeoutExpired:
        w.kill()
        w.wait()


def test_idle_slots_do_not_wake_on_a_clock_and_still_take_work(tmp_path, monkeypatch):
    ns = "idlewake"
    with own_server(tmp_path, monkeypatch, ns, workers=0) as srv:
        r = connect(srv.url)
        with open(tmp_path / "w.log", "ab") as log:
            w = subprocess.Popen([sys.executable, "-m", "miniray.worker", "--slots",
                                  str(SLOTS), "--name", "idle8"],
                                 env=worker_env(srv.url, ns), stdout=log, stderr=log)
        try:
            idle = lambda: r.execute("ZCARD", Keys(ns).idle) == SLOTS  # noqa: E731
            wait_for(idle, timeout=60, what="every slot registered idle")
            with miniray.Executor(srv.url) as ex:  # every slot has run something
                assert list(ex.map(abs, range(-40, 0))) == list(range(40, 0, -1))
                wait_for(idle, timeout=60, what="every slot idle again")
                # (a slot registers before its pop is sent, and one that woke itself for
                # work left over registers again from its claim: let those pops land)
                time.sleep(1)
                # Waited 1 s at a time, each slot would pop (and claim) about 3 times here,
                # however loaded the machine; now an idle slot's one pop lasts
                # MINIRAY_IDLE_WAIT_SECONDS (30 s) unless work or its worker ends it.
                before, worker_before = _calls(r, "blmpop"), _wakeups(w.pid)
                time.sleep(3)
                woke = _calls(r, "blmpop") - before
                worker_woke = _wakeups(w.pid) - worker_before
                assert woke < SLOTS, f"{woke} wake-ups of {SLOTS} idle slots in 3 s"
                # Their worker's slot threads read a quiet process once per wait budget
                # (0.25 s: ~100 wake-ups here, with the heartbeat's), not every 20 ms (~1,200)
                assert worker_woke < SLOTS * 3 * 15, f"the worker woke {worker_woke} times"
                # ... and work still reaches them at once: the wake-up push ends the wait
                assert ex.submit(abs, -3).result(timeout=30) == 3
                assert sorted(ex.map(abs, range(-2 * SLOTS, 0))) == list(range(1, 2 * SLOTS + 1))
            assert w.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
        finally:
            _stop(w)
            r.close()
    assert w.returncode == 0, (tmp_path / "w.log").read_text()[-3000:]


def test_a_worker_taken_for_dead_while_it_lived_gets_work_again_at_once(tmp_path, monkeypatch):
    """A worker paused past the dead timeout is reaped, which drops its slots' idle
    registrations; its slots still block in their long idle pop. When it heartbeats again,
    its slots are woken to register anew: new work reaches it, not after the idle wait."""
    ns = "reapwake"
    monkeypatch.setenv("MINIRAY_WORKER_DEAD_SECONDS", "4")  # (its stall guard: 2 s > 1 s ticks)
    monkeypatch.setenv("MINIRAY_IDLE_WAIT_SECONDS", "300")  # (without the wake-up: 300 s)
    with own_server(tmp_path, monkeypatch, ns, workers=0) as srv:
        r = connect(srv.url)
        keys = Keys(ns)
        with open(tmp_path / "w.log", "ab") as log:
            w = subprocess.Popen([sys.executable, "-m", "miniray.worker", "--slots", "2",
                                  "--name", "paused"],
                                 env=worker_env(srv.url, ns), stdout=log, stderr=log)
        try:
            wait_for(lambda: r.execute("ZCARD", keys.idle) == 2, 60, "both slots idle")
            with miniray.Executor(srv.url) as ex:
                assert ex.submit(abs, -1).result(timeout=30) == 1
                wait_for(lambda: r.execute("ZCARD", keys.idle) == 2, 60, "both slots idle")
                (wid,) = r.execute("ZRANGE", keys.workers, 0, -1)
                os.kill(w.pid, signal.SIGSTOP)  # (its task processes wait on, in their pops)
                try:
                    # the executor's upkeep reaps it: its idle registrations go
                    wait_for(lambda: r.execute("ZSCORE", keys.workers, wid) is None, 60,
                             "the paused worker to be reaped")
                    assert r.execute("ZCARD", keys.idle) == 0
                finally:
                    os.kill(w.pid, signal.SIGCONT)
                wait_for(lambda: r.execute("ZCARD", keys.idle) == 2, 60,
                         "its slots to register idle again")
                assert ex.submit(abs, -2).result(timeout=60) == 2
        finally:
            _stop(w)
            r.close()

