"""The broker's scripts against a real server, where a whole cluster would hide the point."""

import time
import uuid

from miniray.broker import Broker, connect
from miniray.keys import Keys
from miniray.limits import Limits


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
