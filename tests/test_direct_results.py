"""Results straight from a task process to its client on the same machine
(``miniray.values.inbox``): they arrive when the way past the server is closed too, and what the
client reads right after a result (progress, events, logs) counts that task even when the task's
report is late."""

import os

import tasks
from support import SlowLink, wait_for


def test_results_come_through_redis_when_the_inbox_cannot_be_reached(cluster):
    cluster.start_worker(name="solo")
    with cluster.executor() as ex:
        ex._inbox.remove()  # as a worker in another mount namespace sees it: no such socket
        assert ex.submit(tasks.square, 7).result(timeout=30) == 49
        assert list(ex.map(tasks.square, range(60), chunksize=7)) == [i * i for i in range(60)]
        assert isinstance(ex.submit(tasks.raise_custom).exception(timeout=30), tasks.CustomError)


def test_direct_results_can_be_turned_off(cluster, monkeypatch):
    monkeypatch.setenv("MINIRAY_DIRECT_RESULTS", "0")
    cluster.start_worker(name="solo")
    with cluster.executor() as ex:
        assert ex._inbox is None
        assert [f.result(timeout=30) for f in [ex.submit(tasks.square, i) for i in range(20)]] \
            == [i * i for i in range(20)]


def test_what_a_client_reads_after_a_result_counts_it_though_the_report_is_late(cluster):
    """The worker's link to the server holds its reports back 0.3 s; its results reach the
    client at once. progress(), events() and logs() right after result() still count them."""
    link = SlowLink(cluster.url, delay=0.3)
    try:
        cluster.start_worker(name="far", extra_env={"MINIRAY_REDIS_URL": link.url})
        with cluster.executor(job_name="late") as ex:
            for n in (1, 2):
                assert ex.submit(tasks.chatty, 1, f"run{n}").result(timeout=30) == 1
                p = ex.progress()
                assert (p["done"], p["running"]) == (n, 0), p
                assert f"run{n} 0" in [line.text for line in ex.logs()]
                assert [e.kind for e in ex.events()].count("finished") == n
            f = ex.submit(tasks.raise_custom)
            assert isinstance(f.exception(timeout=30), tasks.CustomError)
            assert ex.progress()["failed"] == 1
    finally:
        link.close()


def test_the_inbox_is_removed_with_its_executor(cluster):
    cluster.start_worker(name="solo")
    ex = cluster.executor()
    where = os.path.dirname(ex._inbox.path)
    assert ex.submit(tasks.square, 3).result(timeout=30) == 9
    assert os.path.isdir(where)
    ex.shutdown(wait=True)
    wait_for(lambda: not os.path.exists(where), timeout=10, what="the inbox to go")
