"""The floor under W3 for any design that passes tasks through a Redis-compatible broker.

Usage::

    python bench/broker_floor.py [-n 400]

Measures, in one run on this machine, sequential submit -> result round trips (p50/p99 us) of:

- ``ppe``: ``ProcessPoolExecutor(max_workers=2)``, the W3 baseline;
- ``floor``: the least a broker design can do. The client pushes a pickled task with one Lua
  script (queue + wake-up), one of 2 worker processes blocked in BLPOP claims it with another
  script, runs it, and pushes the pickled result with a third; a reader thread in the client
  (BLMPOP) completes a ``concurrent.futures.Future``. No executor bookkeeping, no task
  process, no retries, no logs: miniray's W3 path does all this and more.

It prints both and ``floor / ppe``. A design whose results also pass through the broker
cannot beat this floor: the two broker hops cost what PPE's whole round trip does. miniray's
results from a task process on the client's machine skip the second hop (``miniray.values.inbox``),
which is how its W3, bookkeeping and all, comes out about level with this floor. The server is the one miniray's local cluster uses
(``miniray.cluster.server``).
"""

import argparse
import multiprocessing as mp
import pickle
import statistics
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor

from miniray.resp import Connection
from miniray.cluster.server import ServerProcess

PUBLISH = ("redis.call('HSET', KEYS[3], ARGV[1], ARGV[2]) redis.call('RPUSH', KEYS[1], ARGV[1]) "
           "redis.call('RPUSH', KEYS[2], '1') return 1")
CLAIM = ("local e = redis.call('LPOP', KEYS[1]) if not e then return false end "
         "redis.call('HSET', KEYS[3], e, '1') return {e, redis.call('HGET', KEYS[2], e)}")
COMPLETE = ("redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[3], ARGV[1]) "
            "redis.call('RPUSH', KEYS[2], ARGV[2]) return 1")


def noop():
    return None


def _worker(url):
    c = Connection(url)
    claim = c.execute("SCRIPT", "LOAD", CLAIM).decode()
    complete = c.execute("SCRIPT", "LOAD", COMPLETE).decode()
    out = []
    while True:
        pipe = c.pipeline()
        for cmd in out:  # the last result travels with the next wait, as a worker would
            pipe.command(*cmd)
        out = []
        pipe.command("BLPOP", "wake", 1)
        pipe.command("EVALSHA", claim, 3, "q", "tasks", "wip")
        try:
            got = pipe.execute()[-1]
        except Exception:  # the server is gone: the run is over
            return
        if got:
            entry, payload = got
            fn, args = pickle.loads(payload)
            result = pickle.dumps(fn(*args), protocol=5)
            out.append(("EVALSHA", complete, 3, "wip", "res", "tasks", entry,
                        entry + b"|" + result))


def _percentiles(lat):
    lat = sorted(lat)
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def floor(n, warmup):
    server = ServerProcess()
    workers = [mp.Process(target=_worker, args=(server.url,), daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        c, reader = Connection(server.url), Connection(server.url)
        publish = c.execute("SCRIPT", "LOAD", PUBLISH).decode()
        pending = {}
        stop = threading.Event()

        def results():
            while not stop.is_set():
                got = reader.execute("BLMPOP", 0.2, 1, "res", "LEFT", "COUNT", 1024)
                for msg in (got[1] if got else ()):
                    key, _, value = msg.partition(b"|")
                    pending.pop(key).set_result(pickle.loads(value))

        thread = threading.Thread(target=results, daemon=True)
        thread.start()
        lat = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            fut, key = Future(), str(i).encode()
            pending[key] = fut
            c.execute("EVALSHA", publish, 3, "q", "wake", "tasks", key,
                      pickle.dumps((noop, ()), protocol=5))
            fut.result(timeout=10)
            if i >= warmup:
                lat.append((time.perf_counter() - t0) * 1e6)
        stop.set()
        thread.join()
        return _percentiles(lat)
    finally:
        server.close()
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()


def ppe(n, warmup):
    with ProcessPoolExecutor(max_workers=2) as ex:
        lat = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            ex.submit(noop).result()
            if i >= warmup:
                lat.append((time.perf_counter() - t0) * 1e6)
    return _percentiles(lat)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=400, help="round trips per run (default 400)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs of each (default 3)")
    args = p.parse_args(argv)
    got = {"ppe": [], "floor": []}
    for _ in range(args.runs):  # alternate, so load on the host hits both alike
        got["ppe"].append(ppe(args.n, 50))
        got["floor"].append(floor(args.n, 50))
    med = {k: statistics.median(p50 for p50, _ in v) for k, v in got.items()}
    for k, v in got.items():
        print(f"{k:6s} p50 {med[k]:7.0f} us   (runs: "
              + ", ".join(f"p50 {a:.0f} / p99 {b:.0f}" for a, b in v) + ")")
    print(f"floor / ppe = {med['floor'] / med['ppe']:.2f}x  (W3 target for miniray: <= 1.5x)")


if __name__ == "__main__":
    main()
