"""The broker's scripts against a real server, where a whole cluster would hide the point."""

import time
import uuid

import pytest

from miniray.broker import Broker, connect
from miniray.keys import Keys
from miniray.client.limits import Limits


def _idle_slots(server):
    """Two workers registered, each with one slot waiting for work, the CPU-only worker's
    slot the one that went idle last."""
    b = Broker(connect(server.url), "t" + uuid.uuid4().hex[:8])
    infos = {"gpu": {"name": "gpu", "host": "h2", "slots": 1, "cpus": 4, "gpus": [{"index": 0}]},
             "cpu": {"name": "cpu", "host": "h1", "slots": 1, "cpus": 4, "gpus": []}}
    for wid, info in infos.items():
        b.heartbeat(wid, info, 30)
        pipe = b.r.pipeline()
        b.idle(pipe, Keys.waiter(wid, 0))
        pipe.execute()
        time.sleep(0.01)  # the CPU worker's slot went idle last
    return b


def _publish(b, limits, chunk=0):
    job, k = f"job{uuid.uuid4().hex[:6]}.0", b.keys
    pipe = b.r.pipeline()
    pipe.command("SET", k.client("c"), 1, "EX", 30)
    b.create_job(pipe, job, "c", job, 1, {}, limits.requirement_fields(), time.time())
    entry = Keys.queue_entry(chunk, 1, 1)
    pipe.command("HSET", k.tasks(job), Keys.payload_field(chunk, 0), b"x")
    pipe.command("RPUSH", k.queue(job), entry)
    b.publish(pipe, job, 1, 1, 1, 100)
    pipe.execute()


def _woken(b):
    return {wid for wid in ("gpu", "cpu")
            if b.r.execute("LLEN", b.keys.wake(Keys.waiter(wid, 0)))}


def test_a_wake_up_goes_to_a_slot_that_can_run_the_job(server):
    """Work that only some workers can run wakes their slot, not the one that went idle
    last: a woken slot that cannot claim it would leave it waiting for a timeout."""
    b = _idle_slots(server)
    _publish(b, Limits(gpus=1))
    assert _woken(b) == {"gpu"}
    # the CPU worker's slot still waits for work it can run
    assert b.r.execute("ZSCORE", b.keys.idle, Keys.waiter("cpu", 0)) is not None


def test_a_job_for_named_nodes_wakes_a_slot_on_one_of_them(server):
    b = _idle_slots(server)
    _publish(b, Limits(nodes=["gpu"]))
    assert _woken(b) == {"gpu"}


def test_a_job_without_requirements_wakes_the_slot_idle_last(server):
    b = _idle_slots(server)
    _publish(b, Limits())
    assert _woken(b) == {"cpu"}


def _job(b, limits=None):
    job, k = f"job{uuid.uuid4().hex[:6]}.0", b.keys
    pipe = b.r.pipeline()
    pipe.command("SET", k.client("c"), 1, "EX", 30)
    fields = (limits or Limits()).requirement_fields()
    b.create_job(pipe, job, "c", job, 1, {"timeout": None}, fields, time.time())
    pipe.execute()
    return job


def _publish_one(b, job, chunk=0, payload=b"payload"):
    entry = Keys.queue_entry(chunk, 1, 1)
    pipe = b.r.pipeline()
    b.publish_one(pipe, job, 1, entry, payload, 100)
    pipe.execute()
    return entry


def _claim(b, wid):
    return b.claim(wid, 4, wid, "h1", 0, 4, slot=0, register=True)


def _counters(b, job):
    return [int(x) for x in b.r.execute("HMGET", b.keys.job(job), "queued", "running")]


def _kinds(b, job):
    return [dict(zip(e[1][::2], e[1][1::2]))[b"kind"].decode()
            for e in b.r.execute("XRANGE", b.keys.events(job), "-", "+")]


def test_a_lone_chunk_is_handed_to_the_slot_idle_last_whole(server):
    """A submit's chunk goes to the waiting slot in the publish itself: the slot holds it
    (wip, counters, events) at once, and what it pops is its claim's reply."""
    b = _idle_slots(server)
    job = _job(b)
    entry = _publish_one(b, job)
    hand = b.keys.hand(Keys.waiter("cpu", 0))
    assert b.r.execute("LRANGE", hand, 0, -1) == [job.encode(), b'{"timeout": null}',
                                                   entry.encode(), b"payload"]
    assert _woken(b) == set()  # the slot's wait pops the hand-over itself: no claim to wake
    assert b.r.execute("HGET", b.keys.wip("cpu"), f"{job}/0") == f"{entry}@0".encode()
    assert _counters(b, job) == [0, 1]
    assert _kinds(b, job) == ["queued", "started"]
    assert b.r.execute("LLEN", b.keys.queue(job)) == 0
    # a claim made before the wait (a GPU worker's) returns it too, once
    assert _claim(b, "cpu") == [job.encode(), b'{"timeout": null}', entry.encode(), b"payload"]
    assert _claim(b, "cpu") == []
    # the payload stays in tasks:{job} until the outcome (a resend reads it from there)
    assert b.r.execute("HGET", b.keys.tasks(job), "0") == b"payload"


def test_a_lone_chunk_with_nobody_waiting_is_queued_for_the_next_claim(server):
    b = Broker(connect(server.url), "t" + uuid.uuid4().hex[:8])
    b.heartbeat("w", {"name": "w", "host": "h1", "slots": 1, "cpus": 4, "gpus": []}, 30)
    job = _job(b)
    entry = _publish_one(b, job)
    assert _counters(b, job) == [1, 0]
    assert b.r.execute("LRANGE", b.keys.queue(job), 0, -1) == [entry.encode()]
    assert _claim(b, "w") == [job.encode(), b'{"timeout": null}', entry.encode(), b"payload"]
    assert _counters(b, job) == [0, 1]


def test_a_lone_chunk_with_requirements_is_queued_and_wakes_a_slot_that_fits(server):
    """No hand-over where the claim must check what is free now (here: a GPU)."""
    b = _idle_slots(server)
    job = _job(b, Limits(gpus=1))
    _publish_one(b, job)
    assert _woken(b) == {"gpu"}
    assert b.r.execute("EXISTS", b.keys.hand(Keys.waiter("gpu", 0))) == 0
    assert _counters(b, job) == [1, 0]


def test_a_chunk_handed_to_a_worker_that_leaves_goes_back_to_the_queue(server):
    """A worker that leaves (SIGTERM) or is reaped before its slot claimed what it was
    handed: the chunk is requeued once, and the stale hand-over is gone with the slot."""
    for leave in ("release", "reap"):
        b = _idle_slots(server)
        job = _job(b)
        entry = _publish_one(b, job)
        if leave == "release":
            assert b.release("cpu") == 1
        else:
            b.r.execute("ZADD", b.keys.workers, 0, "cpu")  # its heartbeat stopped long ago
            assert b.reap(5, 3, 100, 60) == 1
        assert b.r.execute("EXISTS", b.keys.hand(Keys.waiter("cpu", 0))) == 0
        assert b.r.execute("LRANGE", b.keys.queue(job), 0, -1) == [entry.encode()]
        assert _counters(b, job) == [1, 0]


def test_outcomes_of_a_job_that_is_gone_leave_no_key_behind(server):
    """A task that finishes after its job expired (its executor died long ago): its outcome
    goes nowhere, and no key of the job comes back without a TTL."""
    b = _idle_slots(server)
    job = _job(b)
    entry = _publish_one(b, job)
    k = b.keys
    b.r.execute("DEL", k.job(job), k.events(job))  # what the TTLs do when the executor is gone
    pipe = b.r.pipeline()
    b.complete(pipe, "cpu", job, [(entry, 1, 0, True)], 60, 100, [b"R..."], idle="cpu/0")
    pipe.execute()
    assert b.r.execute("EXISTS", k.job(job), k.events(job), k.results("c"), k.tasks(job)) == 0
    assert b.r.execute("HLEN", k.wip("cpu")) == 0
    assert b.r.execute("ZSCORE", k.idle, "cpu/0") is not None  # the slot waits again


def test_a_round_trip_cut_by_ctrl_c_leaves_the_connection_in_step(server):
    """Ctrl-C (KeyboardInterrupt) can land while a command waits for its reply; the next
    command on that connection must get its own reply, not the interrupted one's (the
    interrupted map's cancel read a stale integer reply and failed with a TypeError)."""
    import os
    import signal
    import threading

    r = connect(server.url)
    try:  # a real SIGINT, as Ctrl-C sends it: it wakes the wait for the reply
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            r.execute("BLPOP", "no-such-list-here", 3)  # its reply (nil) comes after 3 s
        timer.join()
        r.execute("SET", "in-step", "yes")
        assert r.execute("GET", "in-step") == b"yes"
        assert r.execute("PING") in (b"PONG", "PONG")
    finally:
        r.execute("DEL", "in-step")
        r.close()
