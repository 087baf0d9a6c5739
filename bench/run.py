"""Benchmark miniray against ProcessPoolExecutor(max_workers=2) and its peers, in one run.

Usage::

    python bench/run.py                                # all engines, full sizes (a few minutes)
    python bench/run.py --quick --engines ppe,miniray  # smoke run, well under a minute
    python bench/run.py --engines ppe,loky --json out.json

Options: ``--engines`` comma-separated subset of ppe,miniray,loky,dask,ray (default: all; an
engine that is not installed is reported as skipped with the reason); ``--quick`` smaller
sizes; ``--json PATH`` also write every figure (with per-run details) as JSON;
``--timeout S`` per-engine limit; ``-v`` stream each engine's own output; ``--only W2,W3``
measures only those workloads (the others are left out of the table); ``--python
ENGINE=PATH`` (repeatable) runs that engine's process with another interpreter, e.g.
``--python ray=/tmp/rayvenv/bin/python`` so Ray from its own virtual environment is measured
beside miniray in the same run (the checkout's ``miniray`` and ``bench/`` come first on that
interpreter's path).

Workloads (task functions live in ``bench/workloads.py`` so every engine pickles them by
reference; ``bench/`` reaches the workers through PYTHONPATH):

- W1  10,000 no-op ``submit``s, then all results              tasks/s, higher is better
- W2  ``map(inc, range(200_000), chunksize)`` for chunksize in 1000/5000/20000, each the best
      of 3 (one map is a few tens of ms: noise on a shared machine); the best is reported
      with its chunksize (Dask and Ray: one task per chunk)           items/s, higher is better
- W3  200 sequential submit -> result round trips after 20 warm-ups   p50/p99 us, lower is better
- W4  fresh ``python -c`` to first result, local cluster start included; best of 3
      (time from just before spawn to the child printing; its teardown is checked, not timed)
                                                                   seconds, lower is better
- W5  one task taking a 100 MB numpy array and returning its sum; best of 3   MB/s (10**6 B)
- W6  ten tasks each returning a 100 MB numpy array, submitted at once; each result dropped
      once checked; total time                                  seconds, lower is better

The "client peak RSS" column is the measuring process's peak resident memory during the
workload above what it held when the workload began (Linux ``VmHWM``, reset before each
workload through ``/proc/self/clear_refs``; blank where unavailable, and for W4, which runs in
a child). For W5 it is the cost of sending a 100 MB argument, for W6 of receiving 100 MB
results: the issue's target is at most 1.5x the value's size.

Every engine runs in its own fresh subprocess (``measure.py``), so one engine's processes never
disturb another's and memory is reclaimed; an engine that crashes, hangs or raises is reported
in its rows and the others still run. Every engine uses 2 worker processes: PPE
``max_workers=2``, loky ``get_reusable_executor(2)``, Dask ``LocalCluster(n_workers=2,
threads_per_worker=1, processes=True)``, Ray ``ray.init(num_cpus=2)``, miniray
``miniray.init(workers=2)`` + ``miniray.Executor()``.

The "vs PPE" column is engine / PPE for every row: above 1 is better than PPE for throughput
(W1, W2, W5), below 1 is better for latency and time (W3, W4, W6). The "target" column, shown on
the miniray rows, is informative only; this script always exits 0 unless it is misused.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from procs import run_child  # noqa: E402

ALL_ENGINES = ["ppe", "miniray", "loky", "dask", "ray"]
ERR_WIDTH = 48  # an error is cut to this in the table; it is printed in full below it

FULL = {"w1_n": 10_000, "w1_reps": 2, "w2_n": 200_000, "w2_chunksizes": [1000, 5000, 20000],
        "w2_reps": 3,
        "w3_n": 200, "w3_warmup": 20, "w4_reps": 3, "w4_timeout": 120, "w5_mb": 100,
        "w5_reps": 3, "w6_mb": 100, "w6_n": 10}
QUICK = {"w1_n": 1000, "w1_reps": 1, "w2_n": 20_000, "w2_chunksizes": [1000, 5000],
         "w2_reps": 1,
         "w3_n": 50, "w3_warmup": 5, "w4_reps": 1, "w4_timeout": 60, "w5_mb": 20,
         "w5_reps": 1, "w6_mb": 20, "w6_n": 3}

# (key, title, how to read the value, higher_is_better, miniray target)
# A target is (description, predicate on (value, ratio) -> bool, or None if it can't tell).
METRICS = [
    ("W1", "W1 submit {w1_n:,} no-ops + results", "tasks/s", True,
     (">= 2x PPE", lambda v, r: None if r is None else r >= 2.0)),
    ("W2", "W2 map {w2_n:,} x inc, best chunksize", "items/s", True,
     (">= 1x PPE", lambda v, r: None if r is None else r >= 1.0)),
    ("W3.p50", "W3 round trip p50 ({w3_n} seq.)", "us", False,
     ("<= 1.5x PPE", lambda v, r: None if r is None else r <= 1.5)),
    ("W3.p99", "W3 round trip p99 ({w3_n} seq.)", "us", False, None),
    ("W4", "W4 cold start to 1st result", "s", False,
     ("<= 0.5 s", lambda v, r: v <= 0.5)),
    ("W5", "W5 {w5_mb} MB array -> sum", "MB/s", True, None),
    ("W6", "W6 {w6_n} x {w6_mb} MB results", "s", False,
     ("<= 1x PPE", lambda v, r: None if r is None else r <= 1.0)),
]


WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6"]


def engine_available(name, python=None):
    """None if ``name`` can be imported (by ``python``, default this interpreter), else the
    reason it cannot (checked in a subprocess so this process stays free of every engine's
    imports)."""
    mod = {"ppe": "concurrent.futures", "miniray": "miniray", "loky": "loky",
           "dask": "distributed", "ray": "ray"}[name]
    env = dict(os.environ)
    repo = os.path.dirname(BENCH_DIR)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH", "")]))
    rc, _, err, _ = run_child([python or sys.executable, "-c", "import " + mod], timeout=120,
                              env=env,
                              grace=0)
    if rc == 0:
        return None
    lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
    return "import %s failed: %s" % (mod, lines[-1] if lines else "rc=%s" % rc)


def run_engine(name, params, timeout, verbose, python=None):
    """Measure one engine in a fresh subprocess (of ``python``, default this interpreter);
    always returns a result dict."""
    fd, out_path = tempfile.mkstemp(prefix="miniray-bench-%s-" % name, suffix=".json")
    os.close(fd)
    cmd = [python or sys.executable, os.path.join(BENCH_DIR, "measure.py"), name,
           json.dumps(params),
           out_path]
    stream = None if verbose else -1  # -1 == subprocess.PIPE
    t0 = time.perf_counter()
    rc, out, err, leaked = run_child(cmd, timeout=timeout, stdout=stream, stderr=stream)
    elapsed = time.perf_counter() - t0
    try:
        with open(out_path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        res = {"engine": name, "workloads": {}, "errors": {}}
    finally:
        for p in (out_path, out_path + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
    res["elapsed_seconds"] = elapsed
    tail = ((out or "") + (err or ""))[-3000:]
    if rc is None:
        res.setdefault("fatal", "engine process killed after the %ss timeout" % timeout)
    elif rc != 0 and "fatal" not in res:
        how = "signal %d" % -rc if rc < 0 else "exit code %d" % rc
        res["fatal"] = "engine process died (%s)" % how
    if rc != 0 and tail:
        res["output_tail"] = tail
    if leaked:
        res["leaked_processes"] = leaked
    return res


def metric_value(res, key):
    """(value, error) for one metric of one engine's result."""
    wkey, _, sub = key.partition(".")
    w = res.get("workloads", {}).get(wkey)
    if w is not None:
        return w[sub or "value"], None
    err = res.get("errors", {}).get(wkey) or res.get("fatal") or res.get("skipped")
    return None, err or "not measured"


def fmt_value(v, unit, w):
    if unit == "s":
        s = "%.3f s" % v
    elif unit == "us":
        s = "%s us" % format(round(v), ",")
    else:
        s = "%s %s" % (format(round(v), ","), unit)
    if w and w.get("best_chunksize"):
        s += " (cs=%d)" % w["best_chunksize"]
    return s


def build_table(results, engines, params):
    rows = []
    base = results.get("ppe")
    for key, title, unit, higher, target in METRICS:
        if params.get("only") and key.partition(".")[0] not in params["only"]:
            continue
        base_v = metric_value(base, key)[0] if base else None
        for i, name in enumerate(engines):
            res = results[name]
            v, err = metric_value(res, key)
            ratio = None if v is None or not base_v else v / base_v
            w = res.get("workloads", {}).get(key.partition(".")[0])
            if i == 0:
                first = title.format(**params)
            elif i == 1:
                first = "  (higher is better)" if higher else "  (lower is better)"
            else:
                first = ""
            if v is None:
                cell = ("skipped: " if res.get("skipped") else "ERROR: ") + \
                    err.splitlines()[0]
                if len(cell) > ERR_WIDTH:
                    cell = cell[:ERR_WIDTH - 3] + "..."
                rtxt = ""
            else:
                cell = fmt_value(v, unit, w)
                rtxt = "%.2fx" % ratio if ratio is not None else "-"
                if w and w.get("note"):
                    cell += "  [" + w["note"] + "]"
            rss = w.get("peak_rss_mb") if w and not key.endswith(".p99") else None
            rsstxt = "" if rss is None else "%s MB" % format(round(rss), ",")
            ttxt = ""
            if name == "miniray" and target is not None:
                desc, ok = target
                verdict = None if v is None else ok(v, ratio)
                ttxt = desc + {None: "", True: ": met", False: ": MISSED"}[verdict]
            rows.append((first, name, cell, rtxt, rsstxt, ttxt))
        rows.append(None)
    return rows


def print_table(rows):
    headers = ("workload", "engine", "value", "vs PPE", "client peak RSS", "target (miniray)")
    body = [r for r in rows if r is not None]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers[:-1])]
    widths[2] = min(widths[2], ERR_WIDTH)

    def line(cells):
        parts = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1]),
                 cells[2].ljust(widths[2]), cells[3].rjust(widths[3]),
                 cells[4].rjust(widths[4]), cells[5]]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("-" * (sum(widths) + 10 + len(headers[-1])))
    for r in rows:
        print("" if r is None else line(r))


def print_errors(results, engines):
    for name in engines:
        res = results[name]
        errs = [(k, v) for k, v in res.get("errors", {}).items()
                if not k.endswith("_traceback")]
        if not (res.get("fatal") or errs or res.get("leaked_processes")):
            continue
        print("\n[%s] problems:" % name)
        if res.get("fatal"):
            print("  " + res["fatal"])
        for k, v in errs:
            print("  %s: %s" % (k, v.replace("\n", "\n    ")))
        if res.get("leaked_processes"):
            print("  processes left after the engine's process ended (killed): "
                  + ", ".join(res["leaked_processes"]))
        if res.get("fatal") and res.get("output_tail"):
            print("  last output of its process:\n    "
                  + res["output_tail"].strip().replace("\n", "\n    "))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ALL_ENGINES),
                    help="comma-separated subset of %s" % ",".join(ALL_ENGINES))
    ap.add_argument("--quick", action="store_true", help="small smoke-test sizes")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--timeout", type=float, help="per-engine limit in seconds "
                    "(default 900, or 180 with --quick)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show engines' own output")
    ap.add_argument("--only", metavar="W2,W3",
                    help="comma-separated subset of %s to measure (default: all)"
                    % ",".join(WORKLOADS))
    ap.add_argument("--python", metavar="ENGINE=PATH", action="append", default=[],
                    help="run ENGINE's process with the interpreter at PATH (repeatable), "
                    "e.g. ray=/tmp/rayvenv/bin/python")
    args = ap.parse_args(argv)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ALL_ENGINES]
    if unknown or not engines:
        ap.error("unknown engine(s) %s; choose from %s" % (unknown, ",".join(ALL_ENGINES)))
    params = dict(QUICK if args.quick else FULL)
    if args.only:
        only = [w.strip().upper() for w in args.only.split(",") if w.strip()]
        bad = [w for w in only if w not in WORKLOADS]
        if bad or not only:
            ap.error("unknown workload(s) %s in --only; choose from %s"
                     % (bad, ",".join(WORKLOADS)))
        params["only"] = only
    pythons = {}
    for spec in args.python:
        eng, sep, path = spec.partition("=")
        if not sep or eng.strip() not in ALL_ENGINES or not path:
            ap.error("--python wants ENGINE=PATH with ENGINE one of %s, got %r"
                     % (",".join(ALL_ENGINES), spec))
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            ap.error("--python %s: %s is not an executable file" % (spec, path))
        pythons[eng.strip()] = path
    timeout = args.timeout or (180 if args.quick else 900)

    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    results = {}
    for name in engines:
        reason = engine_available(name, pythons.get(name))
        if reason:
            print("[%s] skipped: %s" % (name, reason), file=sys.stderr, flush=True)
            results[name] = {"engine": name, "skipped": reason, "workloads": {}, "errors": {}}
            continue
        print("[%s] measuring in a fresh process ..." % name, file=sys.stderr, flush=True)
        results[name] = res = run_engine(name, params, timeout, args.verbose,
                                         pythons.get(name))
        status = ("FAILED: " + res["fatal"]) if res.get("fatal") else "ok"
        print("[%s] %s (%.1fs)" % (name, status, res["elapsed_seconds"]), file=sys.stderr,
              flush=True)
    total = time.perf_counter() - t_start
    sys.stderr.flush()

    print()
    print("miniray bench%s: Python %s, %s, %d CPUs; baseline ProcessPoolExecutor(max_workers=2)"
          % (" (--quick)" if args.quick else "", platform.python_version(), platform.machine(),
             os.cpu_count() or 0))
    for name in engines:
        res = results[name]
        extra = ""
        if res.get("start_seconds") is not None:
            extra = ", in-process start %.2fs" % res["start_seconds"]
        if name in pythons:
            extra += ", python " + pythons[name]
        print("  %-8s %s%s" % (name, res.get("version") or res.get("skipped") or "?", extra))
    if load_before > 0.5:
        print("  note: 1-min load average was %.2f before the run (other work on this host); "
              "figures are noisy, latency (W3) most of all" % load_before)
    print()
    print_table(build_table(results, engines, params))
    print("vs PPE = engine / PPE on every row: > 1 is better for throughput (W1, W2, W5); "
          "< 1 is better (lower is better) for latency and time (W3, W4, W6).")
    print_errors(results, engines)
    print("\ntotal %.1fs" % total)

    if args.json:
        doc = {"quick": args.quick, "params": params, "python": platform.python_version(),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "loadavg_before": load_before,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "total_seconds": total,
               "baseline": "ppe", "engines": results,
               "ratios_vs_ppe": {name: {key: row_ratio(results, name, key)
                                        for key, *_ in METRICS} for name in engines}}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def row_ratio(results, name, key):
    if "ppe" not in results:
        return None
    b = metric_value(results["ppe"], key)[0]
    v = metric_value(results[name], key)[0]
    return v / b if v is not None and b else None


if __name__ == "__main__":
    sys.exit(main())
