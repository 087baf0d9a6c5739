"""What a tqdm-style progress bar costs inside a task: its writes to the task's captured stdout
next to the same writes to an ``io.StringIO``, timed in the same task process.

    python bench/task_output.py [--n 40000] [--repeat 5]

Runs on the embedded local cluster (one worker). For each style ("write": preformatted ``\\r``
updates alone; "write+flush": each flushed, as tqdm does; "format+write": each formatted as
it is written, as any bar does) it prints the best time per write of both
and their ratio (captured / StringIO; 1.0 means free, the target is about 2 or less).
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import miniray  # noqa: E402


def bar_writes(n, flush, repeat):
    """In the task: best seconds for ``n`` updates to sys.stdout and to a StringIO (interleaved)."""
    import io
    import sys
    import time

    lines = [f"\r{i * 100 // n:3d}%|{'#' * (i * 20 // n):20s}| {i}/{n} [00:01<00:00, 9999.99it/s]"
             for i in range(1, n + 1)]

    def run(f):
        write, flush_ = f.write, f.flush
        t = time.perf_counter()
        if flush == "format":  # as a bar does: each state formatted as it is written
            for i in range(1, n + 1):
                write(f"\r{i * 100 // n:3d}%|{'#' * (i * 20 // n):20s}| {i}/{n} "
                      f"[00:01<00:00, {i / 1.234:7.2f}it/s]")
        elif flush:
            for s in lines:
                write(s)
                flush_()
        else:
            for s in lines:
                write(s)
        dt = time.perf_counter() - t
        f.write("\n")
        return dt

    best_out = best_sio = float("inf")
    for _ in range(repeat):
        best_out = min(best_out, run(sys.stdout))
        best_sio = min(best_sio, run(io.StringIO()))
    return best_out, best_sio, type(sys.stdout).__name__


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    miniray.init(workers=1)
    try:
        with miniray.Executor() as ex:
            for flush, style in ((False, "write"), (True, "write+flush"), ("format", "format+write")):
                out, sio, kind = ex.submit(bar_writes, args.n, flush, args.repeat).result()
                print(f"{style:12s} {kind}: {out / args.n * 1e9:7.0f} ns/update   StringIO: "
                      f"{sio / args.n * 1e9:5.0f} ns/update   ratio {out / sio:5.2f}x")
            lines = sum(1 for _ in ex.logs())
            print(f"log lines shipped for {3 * args.repeat} bars of {args.n:,} updates: {lines}")
    finally:
        miniray.shutdown()


if __name__ == "__main__":
    main()
