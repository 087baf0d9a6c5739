"""What a task leaves behind: processes it started (killed unless kept) and output it printed
(cut into lines in time proportional to its bytes, each line capped)."""

import functools
import uuid

import psutil
import pytest

import miniray
import tasks
from support import wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def solo(cluster):
    cluster.start_worker(name="solo")  # one slot: one task process runs every task
    return cluster


def _sleepers(marker):
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"]
        if cmdline and cmdline[0] == marker:
            found.append(p)
    return found


def _kill(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _live_children(pid):
    try:
        return [c for c in psutil.Process(pid).children()
                if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def _zombies(pid):
    try:
        return [c for c in psutil.Process(pid).children()
                if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


# -- leftover processes ------------------------------------------------------------------------
@pytest.mark.parametrize("daemon", [False, True], ids=["child", "double-fork-setsid"])
def test_processes_a_task_leaves_running_are_killed(solo, daemon):
    marker = f"miniray-sleeper-{uuid.uuid4().hex[:10]}"
    try:
        with solo.executor() as ex:
            pids = list(ex.map(tasks.fork_sleeper, range(256), [marker] * 256,
                               [daemon] * 256))
            assert len(set(pids)) == 1, "the task process serves on, the same one throughout"
            wait_for(lambda: not _sleepers(marker), timeout=60,
                     what=f"the 256 sleepers ({marker}) to be killed")
            wait_for(lambda: not _zombies(pids[0]), timeout=30, what="the dead to be reaped")
            assert ex.submit(tasks.where).result(timeout=60)["pid"] == pids[0]
    finally:
        _kill(_sleepers(marker))


def test_keep_children_keeps_them_past_the_task(solo):
    marker = f"miniray-kept-{uuid.uuid4().hex[:10]}"
    other = f"miniray-unkept-{uuid.uuid4().hex[:10]}"
    try:
        with solo.executor(limits=miniray.Limits(keep_children=True)) as ex:
            pid = ex.submit(tasks.fork_sleeper, 0, marker, True).result(timeout=60)
            assert ex.submit(tasks.fork_sleeper, 1, marker).result(timeout=60) == pid
        kept = _sleepers(marker)
        assert len(kept) == 2, kept
        # the daemon's parent exited: it was re-parented to the task process, not to init
        assert {p.ppid() for p in kept} == {pid}
        # a job that keeps nothing, run by the same process, kills its own, not those kept
        with solo.executor() as ex:
            assert ex.submit(tasks.fork_sleeper, 2, other, True).result(timeout=60) == pid
        wait_for(lambda: not _sleepers(other), timeout=60, what="the unkept sleeper to die")
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in kept)
    finally:
        _kill(_sleepers(marker) + _sleepers(other))


def test_what_the_initializer_starts_serves_the_jobs_tasks(solo):
    """A helper process started by the initializer is the job's, not a task's leftover."""
    marker = f"miniray-helper-{uuid.uuid4().hex[:10]}"
    leftover = f"miniray-leftover-{uuid.uuid4().hex[:10]}"
    try:
        with solo.executor(initializer=functools.partial(tasks.start_helper_process,
                                                         marker)) as ex:
            pids = set(ex.map(tasks.fork_sleeper, range(20), [leftover] * 20))
            wait_for(lambda: not _sleepers(leftover), timeout=60,
                     what="the tasks' own sleepers to be killed")
            helpers = _sleepers(marker)
            assert len(helpers) == 1 and {p.ppid() for p in helpers} == pids, helpers
            assert helpers[0].status() != psutil.STATUS_ZOMBIE
    finally:
        _kill(_sleepers(marker) + _sleepers(leftover))


def test_kept_children_end_with_the_task_process(solo):
    marker = f"miniray-kept-{uuid.uuid4().hex[:10]}"
    try:
        with solo.executor(limits=miniray.Limits(keep_children=True)) as ex:
            pid = ex.submit(tasks.fork_sleeper, 0, marker, True).result(timeout=60)
        assert len(_sleepers(marker)) == 1
        solo.stop()  # the worker stops its task processes; each kills what it kept
        wait_for(lambda: not psutil.pid_exists(pid) or _gone(pid), timeout=30,
                 what="the task process to end")
        wait_for(lambda: not _sleepers(marker), timeout=30, what="the kept sleeper to die")
    finally:
        _kill(_sleepers(marker))


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_keep_children_must_be_a_bool():
    with pytest.raises(miniray.ConfigurationError, match="keep_children"):
        miniray.Limits(keep_children="yes")


# -- task output -------------------------------------------------------------------------------
def _stdout(ex, task):
    return [x.text for x in ex.logs() if x.task == task and x.stream == "stdout"]


@pytest.mark.parametrize("flush", [False, True], ids=["write", "write-flush"])
def test_a_progress_bar_logs_its_last_state_not_every_update(solo, flush):
    with solo.executor() as ex:
        f = ex.submit(tasks.progress_bar, 40_000, flush=flush)
        last = f.result(timeout=180)
        lines = _stdout(ex, f.task_id)
    assert last == "100%|####################| 40000/40000"
    assert lines and lines[-1] == last, lines[-3:]
    # streamed as it went, at most once a second: nowhere near one line per update
    assert len(lines) < 1000, len(lines)
    assert all("\r" not in t for t in lines)


def test_a_long_line_is_capped_with_a_marker(solo):
    with solo.executor() as ex:
        f = ex.submit(tasks.long_lines, 1, 1 << 20)
        assert f.result(timeout=60) == 1
        lines = _stdout(ex, f.task_id)
    assert lines[-1] == "long done"
    head, sep, marker = lines[0].partition(" ... [miniray: ")
    assert sep and head.startswith("long0 xxx") and len(head.encode()) == 65536
    assert marker == f"{(1 << 20) - 65536} more bytes cut from this line]"


def test_the_log_stream_is_bounded_in_bytes(cluster):
    cluster.start_worker(name="solo", extra_env={"MINIRAY_LOG_LINE_MAX_BYTES": "4096"})
    with cluster.executor() as ex:
        assert ex.submit(tasks.long_lines, 200, 100_000).result(timeout=120) == 200
        texts = [x.text for x in ex.logs()]
    assert len(texts) == 201 and texts[-1] == "long done"
    assert all(len(t.encode()) <= 4096 + 60 for t in texts)
    assert sum(len(t.encode()) for t in texts) <= 201 * (4096 + 60)  # not the 20 MB printed
