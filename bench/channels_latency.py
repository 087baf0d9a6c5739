"""Round-trip latency of miniray channels next to a multiprocessing Pipe, measured in one run.

    python bench/channels_latency.py [--n 20000] [--size 64]

Prints p50/p99 in microseconds for each transport and its ratio to the Pipe baseline.
"""

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from miniray.channels import RemoteWorker, Worker  # noqa: E402


def echo(h):
    """Work function for both the forked Worker and the WorkerServer."""
    while True:
        h.send(h.recv())


def _pipe_echo(conn):
    while True:
        conn.send(conn.recv())


def measure(send, recv, message, n, warmup=500):
    for _ in range(warmup):
        send(message)
        recv()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        send(message)
        recv()
        samples.append(clock() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="round trips per transport")
    p.add_argument("--size", type=int, default=64, help="payload size in bytes")
    args = p.parse_args(argv)
    message = "x" * args.size
    results = {}

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_pipe_echo, args=(child,), daemon=True)
    proc.start()
    results["multiprocessing.Pipe (pickle)"] = measure(parent.send, parent.recv, message, args.n)
    proc.kill()
    proc.join()

    for codec in ("json", "marshal", "pickle"):
        with Worker(echo, codec=codec) as w:
            results[f"Worker ({codec})"] = measure(w.send, w.recv, message, args.n)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    server = subprocess.Popen([sys.executable, "-m", "miniray.channels", "--work-fn",
                               "channels_latency.echo"], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        _, host, port, _ = server.stdout.readline().split()
        for codec in ("json", "pickle"):
            with RemoteWorker(host, int(port), codec=codec) as w:
                results[f"RemoteWorker TCP loopback ({codec})"] = measure(
                    w.send, w.recv, message, args.n)
    finally:
        server.terminate()
        server.wait()

    base50, base99 = results["multiprocessing.Pipe (pickle)"]
    print(f"round trip, {args.size}-byte string, {args.n} samples, {os.cpu_count()} CPUs")
    print(f"{'transport':38} {'p50 us':>8} {'p99 us':>8} {'p50/Pipe':>9} {'p99/Pipe':>9}")
    for name, (p50, p99) in results.items():
        print(f"{name:38} {p50:8.1f} {p99:8.1f} {p50 / base50:8.2f}x {p99 / base99:8.2f}x")


if __name__ == "__main__":
    main()
