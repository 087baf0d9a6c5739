"""Measure one engine (W1-W6) in this process; ``run.py`` starts one of these per engine.

Usage (internal): ``python bench/measure.py ENGINE PARAMS_JSON OUT_JSON``. Results are written
to OUT_JSON after every workload, so a crash keeps what was measured before it.
"""

import json
import math
import os
import statistics
import sys
import time
import traceback

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def setup_path():
    """Make ``workloads`` (and the checkout's ``miniray``) importable here and in every worker
    process the engine spawns: set PYTHONPATH before any cluster starts so workers inherit it."""
    extra = [BENCH_DIR, REPO_ROOT]
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(extra + ([old] if old else []))
    for p in reversed(extra):
        if p not in sys.path:
            sys.path.insert(0, p)


setup_path()

import workloads  # noqa: E402
from engines import ENGINES, W4_PRELUDE  # noqa: E402
from procs import run_child  # noqa: E402


def percentile(sorted_xs, q):
    """Linear-interpolated percentile of an already sorted list, q in [0, 100]."""
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def w1_submit(engine, n, reps):
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        futures = [engine.submit(workloads.noop) for _ in range(n)]
        t_submitted = time.perf_counter()
        out = engine.results(futures)
        dt = time.perf_counter() - t0
        if len(out) != n or any(r is not None for r in out):
            raise AssertionError("W1: wrong results")
        runs.append({"seconds": dt, "submit_seconds": t_submitted - t0, "rate": n / dt})
    best = max(runs, key=lambda r: r["rate"])
    return {"value": best["rate"], "unit": "tasks/s", "n": n, "runs": runs}


def w2_map(engine, n, chunksizes, reps=1):
    """Best of ``reps`` maps per chunk size (one map takes a few tens of ms: a single one is
    at the mercy of whatever else the machine runs), the chunk sizes interleaved."""
    items = range(n)
    per_chunksize = {str(cs): {"runs": []} for cs in chunksizes}
    for _ in range(reps):
        for cs in chunksizes:
            t0 = time.perf_counter()
            out = engine.map(workloads.inc, items, cs)
            dt = time.perf_counter() - t0
            if len(out) != n or out[0] != 1 or out[-1] != n:
                raise AssertionError("W2: wrong results for chunksize %d" % cs)
            del out
            per_chunksize[str(cs)]["runs"].append(n / dt)
    for entry in per_chunksize.values():
        entry["rate"] = max(entry["runs"])
        entry["seconds"] = n / entry["rate"]
    best_cs = max(per_chunksize, key=lambda k: per_chunksize[k]["rate"])
    return {"value": per_chunksize[best_cs]["rate"], "unit": "items/s", "n": n, "reps": reps,
            "best_chunksize": int(best_cs), "per_chunksize": per_chunksize}


def w3_roundtrip(engine, n, warmup):
    for _ in range(warmup):
        engine.result(engine.submit(workloads.noop))
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.result(engine.submit(workloads.noop))
        lat.append((time.perf_counter() - t0) * 1e6)
    lat.sort()
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "unit": "us", "n": n,
            "warmup": warmup, "min": lat[0], "max": lat[-1], "mean": statistics.fmean(lat)}


def w4_cold_start(engine_cls, reps, timeout):
    """Fresh interpreter to first result, cluster start included; best of ``reps``.

    The child prints the wall-clock moment it holds the result; teardown (which it does after
    printing) is timed separately and must finish, leaving no process behind."""
    script = W4_PRELUDE + engine_cls.W4_SCRIPT
    runs = []
    for _ in range(reps):
        t0 = time.time()
        rc, out, err, leaked = run_child([sys.executable, "-c", script], timeout=timeout)
        t_exit = time.time() - t0
        mark = [ln for ln in (out or "").splitlines() if ln.startswith("BENCH_FIRST_RESULT")]
        if rc is None or not mark:
            lines = [ln for ln in (err or "").splitlines() if ln.strip()]
            what = ("timed out after %ss" % timeout if rc is None
                    else "exited %s without a result" % rc)
            raise RuntimeError("W4 child %s: %s\nstderr tail:\n%s"
                               % (what, lines[-1] if lines else "(no stderr)",
                                  "\n".join(lines[-30:])))
        _, t_print, value = mark[0].split(" ", 2)
        if value.strip() != "1":
            raise AssertionError("W4: child printed %r, expected 1" % value)
        run = {"seconds": float(t_print) - t0, "exit_seconds": t_exit, "returncode": rc}
        if leaked:
            run["leaked_processes"] = leaked
        runs.append(run)
    best = min(runs, key=lambda r: r["seconds"])
    res = {"value": best["seconds"], "unit": "s", "runs": runs}
    bad_exit = [r["returncode"] for r in runs if r["returncode"] != 0]
    leaks = sorted({n for r in runs for n in r.get("leaked_processes", [])})
    notes = []
    if bad_exit:
        notes.append("child exit code %s" % bad_exit)
    if leaks:
        notes.append("left running after exit (killed): %s" % ", ".join(leaks))
    if notes:
        res["note"] = "; ".join(notes)
    return res


def w5_array(engine, mb, reps):
    import numpy as np
    nbytes = mb * 10**6
    arr = np.ones(nbytes // 8, dtype=np.float64)
    expected = float(arr.size)
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = engine.result(engine.submit(workloads.array_sum, arr))
        dt = time.perf_counter() - t0
        if got != expected:
            raise AssertionError("W5: sum %r, expected %r" % (got, expected))
        runs.append({"seconds": dt, "rate": mb / dt})
    return {"value": max(r["rate"] for r in runs), "unit": "MB/s", "mb": mb, "runs": runs}


def w6_results(engine, mb, n):
    """``n`` tasks each returning an ``mb`` MB array, all submitted at once; each result is
    dropped once checked, so the peak RSS shows what one value costs in flight, not ``n`` of
    them kept."""
    nbytes = mb * 10**6
    t0 = time.perf_counter()
    handles = [engine.submit(workloads.make_array, nbytes, i) for i in range(n)]
    i = 0
    while handles:
        arr = engine.result(handles.pop(0))
        if arr.nbytes != nbytes // 8 * 8 or arr[0] != i or arr[-1] != i:
            raise AssertionError("W6: result %d is wrong" % i)
        del arr
        i += 1
    dt = time.perf_counter() - t0
    return {"value": dt, "unit": "s", "mb": mb, "n": n, "rate": n * mb / dt}


class PeakRSS:
    """This process's peak resident memory during a step, above what it held at the start:
    Linux's VmHWM, reset before the step (``/proc/self/clear_refs``), so a peak that lasts a
    millisecond still counts; None where that is not available."""

    def start(self):
        self.base = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")
        except OSError:
            pass

    def above_base_mb(self):
        if self.base is None:
            return None
        try:
            return (self._status("VmHWM") - self.base) / 2**20
        except OSError:
            return None

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError("no %s in /proc/self/status" % field)


def main(argv):
    name, params, out_path = argv[0], json.loads(argv[1]), argv[2]
    result = {"engine": name, "workloads": {}, "errors": {}}

    def save():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, out_path)

    peak = PeakRSS()

    only = params.get("only")

    def step(key, fn, *args):
        if only is not None and key not in only:
            return  # not asked for (run.py --only): left out of the table
        print("[%s] %s ..." % (name, key), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            peak.start()
            result["workloads"][key] = fn(*args)
            if key != "W4":  # (W4 runs in a child: nothing of it is in this process)
                result["workloads"][key]["peak_rss_mb"] = peak.above_base_mb()
        except BaseException as e:  # noqa: BLE001 - a workload's failure is a result
            result["errors"][key] = "%s: %s" % (type(e).__name__, e)
            result["errors"][key + "_traceback"] = traceback.format_exc()
            if isinstance(e, KeyboardInterrupt):
                raise
        print("[%s] %s done in %.1fs" % (name, key, time.perf_counter() - t0),
              file=sys.stderr, flush=True)
        save()

    engine_cls = ENGINES[name]
    engine = engine_cls()
    result["label"] = engine_cls.label
    try:
        result["version"] = engine.version()
    except BaseException as e:  # noqa: BLE001
        result["fatal"] = "import failed: %s: %s" % (type(e).__name__, e)
        save()
        return 1
    save()

    # W4 first, while no cluster of ours is running to compete with the child's.
    step("W4", w4_cold_start, engine_cls, params["w4_reps"], params["w4_timeout"])

    t0 = time.perf_counter()
    try:
        engine.start()
        # Warm up: every worker has started and imported the workloads module.
        engine.results([engine.submit(workloads.noop) for _ in range(8)])
        engine.map(workloads.inc, range(100), 10)
    except BaseException as e:  # noqa: BLE001
        result["fatal"] = "start failed: %s: %s" % (type(e).__name__, e)
        result["errors"]["start_traceback"] = traceback.format_exc()
        save()
        try:
            engine.shutdown()
        except BaseException:  # noqa: BLE001
            pass
        return 1
    result["start_seconds"] = time.perf_counter() - t0
    save()

    try:
        step("W1", w1_submit, engine, params["w1_n"], params["w1_reps"])
        step("W2", w2_map, engine, params["w2_n"], params["w2_chunksizes"],
             params.get("w2_reps", 1))
        step("W3", w3_roundtrip, engine, params["w3_n"], params["w3_warmup"])
        step("W5", w5_array, engine, params["w5_mb"], params["w5_reps"])
        step("W6", w6_results, engine, params["w6_mb"], params["w6_n"])
    finally:
        t0 = time.perf_counter()
        try:
            engine.shutdown()
            result["shutdown_seconds"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001
            result["errors"]["shutdown"] = "%s: %s" % (type(e).__name__, e)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
