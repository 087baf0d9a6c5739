"""Jobs that outlive their client: a kept job (``Executor(keep=True)``, ``%%miniray map --bg``)
runs on when its kernel or process dies, its results stay on the cluster, and any process or
kernel attaches to it (``miniray.attach``, ``%miniray attach``). Real server, real workers,
real kernels (jupyter_client) killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import wait as wait_futures

import pytest

import miniray
from miniray.broker import connect
from miniray.client.jobs import list_jobs
from miniray.keys import Keys
from support import wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

# the owner: a kept job of N slow items (x * x), sealed; it prints the job id, then waits for
# a line on stdin and dies without any shutdown (os._exit), as a killed process would
_OWNER = textwrap.dedent("""
    import os, sys, time
    import miniray
    n, delay = int(sys.argv[1]), float(sys.argv[2])
    ex = miniray.Executor(keep=True, job_name="kept-owner")
    def slow(x):
        time.sleep(delay)
        return x * x
    futures = ex.map_futures(slow, range(n))
    ex.seal()
    print(ex.job_id, flush=True)
    if sys.stdin.readline().strip() == "exit":
        sys.exit(0)  # a clean exit, as a kernel restart is: atexit handlers run
    os._exit(0)
""")


def _owner(cluster, n, delay, **env):
    p = subprocess.Popen([sys.executable, "-c", _OWNER, str(n), str(delay)],
                         env=worker_env(cluster.url, cluster.namespace, env),
                         stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    job = p.stdout.readline().strip()
    assert job, "the owner printed no job id"
    return p, job


def _die(p, how="die"):
    p.stdin.write(how + "\n")
    p.stdin.flush()
    assert p.wait(10) == 0


def _jobs(cluster) -> dict:
    r = connect(cluster.url)
    try:
        return {j["job"]: j for j in list_jobs(r, Keys(cluster.namespace))}
    finally:
        r.close()


def _cli(cluster, *args):
    env = worker_env(cluster.url, cluster.namespace)
    out = subprocess.run([sys.executable, "-m", "miniray.cli", *args], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _row(text: str, job: str) -> list:
    lines = [ln.split() for ln in text.splitlines() if ln.strip().startswith(job)]
    assert lines, text
    return lines[0]


def test_attach_while_the_owner_lives_and_after_it_died_gets_every_result(two_workers):
    cluster = two_workers
    # a short client grace: a plain job of a dead owner would be given up 2 s after it died
    owner, job = _owner(cluster, 12, 0.6, MINIRAY_CLIENT_GRACE_SECONDS="2")
    live = miniray.attach(job)  # its owner is alive
    wait_for(lambda: sum(f.done() for f in live.futures) >= 2, 20, "two results")
    _die(owner)  # mid-job, no shutdown
    assert not live.done()
    assert live.result(timeout=30) == [x * x for x in range(12)]
    # a second attacher, after the owner died, reads the same stored results (nobody took
    # them from anybody)
    late = miniray.attach(job)
    assert late.result(timeout=10) == [x * x for x in range(12)]
    assert late.results() == [x * x for x in range(12)]
    assert late.progress()["done"] == 12
    # the job ended by itself, its owner dead: done in `miniray status` and `miniray jobs`
    wait_for(lambda: not _jobs(cluster)[job]["owner_alive"], 10, "the owner seen gone")
    j = _jobs(cluster)[job]
    assert j["state"] == "done" and j["kept"], j
    assert _row(_cli(cluster, "status"), job)[2:5] == ["done", "0", "0"]
    row = _row(_cli(cluster, "jobs"), job)
    assert row[2:4] == ["done", "12/0/12"] and row[-2:] == ["gone", "yes"], row
    for h in (live, late):
        h.close()


def test_a_kept_job_outlives_a_clean_exit_of_its_owner(two_workers):
    """A kernel restart exits the kernel cleanly (atexit runs): a kept job runs on."""
    cluster = two_workers
    owner, job = _owner(cluster, 8, 0.5)
    h = miniray.attach(job)
    wait_for(lambda: any(f.done() for f in h.futures), 20, "a result")
    _die(owner, "exit")
    assert h.result(timeout=30) == [x * x for x in range(8)]
    assert _jobs(cluster)[job]["state"] == "done"
    h.close()


def test_an_attached_handles_futures_settle_when_the_job_is_cancelled(two_workers):
    cluster = two_workers
    owner, job = _owner(cluster, 20, 3.0)
    h = miniray.attach(job)
    assert len(h.futures) == 20
    _die(owner)
    wait_for(lambda: h.progress()["running"] > 0, 20, "items running")
    t0 = time.monotonic()
    h.cancel()  # the owner is dead: the cluster cancels it all the same
    done, not_done = wait_futures(h.futures, timeout=10)
    assert not not_done and time.monotonic() - t0 < 10
    assert all(f.cancelled() for f in h.futures)
    assert h.done() and h.results() == [None] * 20
    with pytest.raises(miniray.errors.CancelledError):
        h.result(timeout=1)
    assert _jobs(cluster)[job]["state"] == "cancelled"
    # the workers go on with other work: the interrupted tasks are gone
    with cluster.executor() as ex:
        assert list(ex.map(abs, [-1, -2])) == [1, 2]
    h.close()


def test_attach_says_at_once_what_is_wrong_with_the_job_id(cluster):
    t0 = time.monotonic()
    with pytest.raises(miniray.JobNotFoundError, match="no job 'feedfacecafe.0'.*jobs"):
        miniray.attach("feedfacecafe.0")
    assert time.monotonic() - t0 < 3
    cluster.start_worker()
    with cluster.executor() as ex:  # not kept: its results went to it alone
        ex.submit(abs, -3).result(timeout=30)
    with pytest.raises(miniray.JobNotKeptError, match="keep=True"):
        miniray.attach(ex.job_id)
    # a plain executor stored nothing per job for attachers
    r = connect(cluster.url)
    k = Keys(cluster.namespace)
    assert not r.execute("EXISTS", k.out(ex.job_id), k.index(ex.job_id))
    r.close()


def test_a_bg_map_outlives_its_killed_kernel_and_another_kernel_attaches(two_workers):
    pytest.importorskip("ipykernel")
    pytest.importorskip("jupyter_client")
    from kernels import Kernel

    cluster = two_workers
    workers = sorted((w["id"], w.get("pid")) for w in cluster.workers())
    first = Kernel()
    try:
        first.run(f"%load_ext miniray\n%miniray connect {cluster.url}")
        out = first.run("%%miniray map x in range(12) -o run --bg\nimport time\n"
                        "time.sleep(1.5)\nx * x")
        job = first.run("print(run.job)")["stream"].strip()
        # every map shows its job id: the widget's and the text fallback's
        shown = str(out["data"])
        assert f"job {job}" in shown or f"job <code>{job}</code>" in shown, shown
        wait_for(lambda: _jobs(cluster)[job]["done"] >= 2, 30, "two items done")
        os.kill(first.km.provisioner.process.pid, signal.SIGKILL)
    finally:
        first.kc.stop_channels()
        first.km.cleanup_resources()
    assert _jobs(cluster)[job]["done"] < 12  # killed mid-map
    wait_for(lambda: not _jobs(cluster)[job]["owner_alive"], 15, "the owner seen gone")
    second = Kernel()
    try:
        second.run(f"%load_ext miniray\n%miniray connect {cluster.url}")
        listed = second.run("%miniray jobs")["stream"]
        row = _row(listed, job)
        assert row[-2:] == ["gone", "yes"], listed
        second.run(f"%miniray attach {job} -o out")
        got = second.run("print(out)")["stream"].strip()
        assert got == str([x * x for x in range(12)])
        assert _jobs(cluster)[job]["state"] == "done"
    finally:
        second.close()
    # the workers never stopped: the same processes served it all
    assert all(p.poll() is None for p in cluster.procs)
    assert sorted((w["id"], w.get("pid")) for w in cluster.workers()) == workers


def test_an_interrupt_detaches_from_the_job_which_runs_on(two_workers):
    pytest.importorskip("ipykernel")
    pytest.importorskip("jupyter_client")
    from kernels import Kernel

    cluster = two_workers
    owner, job = _owner(cluster, 20, 2.0)
    _die(owner)
    k = Kernel()
    try:
        k.run(f"%load_ext miniray\n%miniray connect {cluster.url}")
        cell = k.send(f"%miniray attach {job} -o part")
        sent = []

        def interrupt_once_shown(out):  # the live view is up: the cell is waiting
            if out["data"] and not sent:
                sent.append(time.monotonic())
                time.sleep(1.0)
                k.km.interrupt_kernel()

        out = k.collect(cell, timeout=60, on_output=interrupt_once_shown)
        ename, tb = out["error"]
        assert ename == "KeyboardInterrupt", tb
        assert f"detached from job {job}" in tb and f"%miniray cancel {job}" in tb, tb
        assert "Traceback" not in tb and "magics.py" not in tb, tb
        assert time.monotonic() - sent[0] < 15
        got = k.run("print(len(part), all(v in (None, i * i) for i, v in enumerate(part)))")
        assert got["stream"].split() == ["20", "True"]
        assert _jobs(cluster)[job]["state"] == "open"  # it runs on
        k.run(f"%miniray cancel {job}")
        wait_for(lambda: _jobs(cluster)[job]["state"] == "cancelled", 10, "cancelled")
    finally:
        k.close()


def test_every_map_view_names_its_job():
    from jupyter_ext.display import head_html
    from jupyter_ext.logs import LogBuffer
    from jupyter_ext.progress import MapProgress
    from jupyter_ext.snapshot import snapshot_bundle

    m = MapProgress(4, "demo", job="0123456789ab.0")
    assert m.summary().endswith("[job 0123456789ab.0]")
    assert "job <code>0123456789ab.0</code>" in head_html(m.snapshot())
    bundle = snapshot_bundle(m, LogBuffer())
    assert "0123456789ab.0" in bundle["text/html"] and "0123456789ab.0" in bundle["text/plain"]


def test_a_kept_jobs_owner_and_attachers_read_the_same_stored_results(cluster):
    """Big results (a message in parts), errors and plain values reach the owner through the
    pointer it gets, and an attacher reads the very same stored copy, in task order."""
    from tasks import raise_value_error

    cluster.start_worker()
    with cluster.executor(keep=True) as ex:
        big = ex.submit(bytes, 3_000_000)  # over a message part: stored in parts
        items = ex.map_futures(raise_value_error, range(5), chunksize=2)
        ex.seal()
        assert big.result(timeout=30) == bytes(3_000_000)
        with pytest.raises(ValueError, match="bad item 3"):
            items[3].result(timeout=30)
        assert [items[i].result(timeout=30) for i in (0, 1, 2, 4)] == [0, 1, 2, 4]
        h = miniray.attach(ex.job_id)
        assert h.wait(30)
        assert h.results() == [bytes(3_000_000), 0, 1, 2, None, 4]
        err = h.errors[4]
        assert isinstance(err, ValueError) and "task 4" in " ".join(err.__notes__)
        with pytest.raises(ValueError, match="bad item 3"):
            h.result()
        with pytest.raises(RuntimeError, match="sealed"):
            ex.submit(abs, 1)
    h.close()


def test_an_attacher_places_the_cached_items_of_a_kept_map(cluster, tmp_path):
    """A kept map that found some items in the item cache runs only the others; an attacher
    still gets every item in its place (the cached ones from the cache)."""
    from test_cache import counted, runs

    cluster.start_worker(name="w0")
    log = tmp_path / "runs"
    with cluster.executor() as ex:
        list(ex.map(counted(log), [1, 3, 5], cache=True))  # items 1, 3, 5 are cached now
    with cluster.executor(keep=True) as ex:
        futures = ex.map_futures(counted(log), range(7), cache=True, chunksize=2)
        ex.seal()
        assert [f.cached for f in futures] == [False, True, False, True, False, True, False]
        h = miniray.attach(ex.job_id)
        try:
            assert h.result(timeout=30) == [x * 10 for x in range(7)]
            assert [f.cached for f in h.futures] == [f.cached for f in futures]
        finally:
            h.close()
    assert sorted(runs(log)) == [0, 1, 2, 3, 4, 5, 6]  # 1, 3, 5 ran once, in the first map


def test_a_kept_jobs_uncollected_results_keep_a_persistent_cluster_from_its_idle_stop(cluster):
    """Results of a kept job whose owner died wait on the cluster for someone to attach: the
    idle stop of a persistent cluster counts them as work until an attacher collected them."""
    from miniray.cluster.service import busy_reasons

    cluster.start_worker(name="w0")
    owner, job = _owner(cluster, 3, 0.05)
    _die(owner)
    wait_for(lambda: _jobs(cluster)[job]["state"] == "done", 20, "the job to end by itself")
    r = connect(cluster.url)
    keys = Keys(cluster.namespace)
    try:
        assert busy_reasons(r, keys) == [f"kept job {job} has results nobody has collected"]
        h = miniray.attach(job)
        assert h.result(timeout=20) == [0, 1, 4]
        wait_for(lambda: busy_reasons(r, keys) == [], 10, "the results to count as collected")
        h.close()
        assert miniray.attach(job).result(timeout=10) == [0, 1, 4]  # (still there to read)
    finally:
        r.close()


def test_miniray_attach_stays_the_function_whatever_is_looked_up_first():
    """``miniray.attach`` is a function of the module that holds ``JobHandle``: looking up
    ``miniray.JobHandle`` first must not turn ``miniray.attach`` into that module."""
    code = ("import miniray; miniray.JobHandle; import inspect; "
            "print(inspect.isfunction(miniray.attach))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
