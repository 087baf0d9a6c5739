"""The ``miniray`` command: worker, up (``--detach``: the persistent cluster), down, ssh-up,
status, jobs, logs, cancel, cache."""

from __future__ import annotations

import argparse
import signal
import sys
import time

__all__ = ["main"]


def _client(url):
    from .broker import Broker, connect
    from .config import settings

    s = settings()
    url = url or s.redis_url
    if not url:
        from .cluster.persistent import find

        running = find()  # the persistent local cluster, when one runs
        url = running.url if running is not None else None
    if not url:
        raise SystemExit("miniray: give --redis URL or set MINIRAY_REDIS_URL "
                         "(`miniray up` prints one), or start the persistent local cluster "
                         "with `miniray up --detach`")
    r = connect(url)
    return r, Broker(r, s.namespace)


def cmd_up(args) -> int:
    from .cluster.local import LocalCluster

    if args.detach:
        return _up_detached(args)
    if args.idle_stop is not None:
        raise SystemExit("miniray up: --idle-stop applies to the persistent cluster; add "
                         "--detach")
    cluster = LocalCluster(workers=args.workers, slots=args.slots)
    print(f"miniray: server and {cluster.nworkers} worker(s) running", flush=True)
    print(f"MINIRAY_REDIS_URL={cluster.url}", flush=True)
    print("(this URL holds the password; Ctrl-C stops everything)", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        while not stop and cluster.server_alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    cluster.close()
    return 0


def _up_detached(args) -> int:
    from .broker import Broker, connect
    from .client import observe
    from .cluster import persistent
    from .config import settings
    from .errors import MinirayError

    if args.slots != 1:
        raise SystemExit("miniray up --detach: the persistent cluster runs one slot per worker; "
                         "leave --slots out")
    if args.workers is not None and args.workers < 1:
        raise SystemExit("miniray up --detach: -n needs at least 1 worker")
    if args.idle_stop is not None and args.idle_stop < 0:
        raise SystemExit("miniray up --detach: --idle-stop needs seconds >= 0 (0: never)")
    try:
        before = persistent.find()
        info = before or persistent.start(workers=args.workers, idle_seconds=args.idle_stop)
    except MinirayError as e:  # (a file not private to this user, a service that failed)
        raise SystemExit(f"miniray up --detach: {e}") from None
    # wait (bounded) for its workers' first heartbeats, so that what follows finds them
    r = connect(info.url)
    keys = Broker(r, settings().namespace).keys
    deadline = time.monotonic() + 20
    alive = observe.list_workers(r, keys)
    while len(alive) < info.workers and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = observe.list_workers(r, keys)
    r.close()
    idle = ("never stops for idleness" if not info.idle_stop_seconds
            else f"stops after {observe.format_duration(info.idle_stop_seconds)} idle")
    print(f"miniray: persistent local cluster {'already ' if before else ''}running: "
          f"service pid {info.pid}, {len(alive)} of {info.workers} worker(s) up, started "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.started))}; {idle}")
    if before and args.workers is not None and args.workers != info.workers:
        print(f"  (-n {args.workers} not applied: it runs {info.workers} worker(s); "
              "`miniray down` first to change that)")
    print(f"  file: {info.path} (mode 0600: it holds the server's URL and password)")
    print(f"  log:  {info.log_path}")
    print("  any notebook kernel, miniray.init(persist=True) and `miniray status` of this user "
          "find it; `miniray down` stops it")
    return 0


def cmd_down(args) -> int:
    from .cluster import persistent
    from .errors import MinirayError

    try:
        info = persistent.find()
        stopped = persistent.stop(timeout=args.timeout)
    except MinirayError as e:
        raise SystemExit(f"miniray down: {e}") from None
    if stopped:
        what = f"service pid {info.pid}, {info.workers} worker(s)" if info else "its service"
        print(f"miniray: persistent local cluster stopped ({what}); nothing of it runs now")
    else:
        print(f"miniray: no persistent local cluster was running (looked for "
              f"{persistent.cluster_file()})")
    return 0


def cmd_status(args) -> int:
    from .client import observe
    from .config import settings

    r, b = _client(args.redis)
    if not (args.redis or settings().redis_url):
        from .cluster.persistent import find

        info = find()
        if info is not None:
            print(f"persistent local cluster: service pid {info.pid}, started "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.started))}, "
                  f"{info.workers} worker(s); file {info.path}")
    print(observe.format_status(observe.list_workers(r, b.keys), observe.list_jobs(r, b.keys)))
    return 0


def cmd_jobs(args) -> int:
    from .client.jobs import format_jobs, list_jobs

    r, b = _client(args.redis)
    print(format_jobs(list_jobs(r, b.keys)))
    return 0


def _resolve_job(r, b, job):
    from .client import observe

    if job is None:
        jobs = observe.list_jobs(r, b.keys, limit=1)
        if not jobs:
            raise SystemExit("miniray: no jobs on this server")
        return jobs[0]["job"]
    for j in observe.list_jobs(r, b.keys, limit=1000):
        if job in (j["job"], j["name"]):
            return j["job"]
    raise SystemExit(f"miniray: no job named {job!r}; `miniray status` lists them")


def cmd_logs(args) -> int:
    """A job's lines for a terminal (see ``miniray.client.logview``); Ctrl-C ends a ``-f`` with
    status 0, and a reader that goes away (``| head``) ends it quietly."""
    from .client import logview, observe

    try:
        r, b = _client(args.redis)
        job = _resolve_job(r, b, args.job)
        print(logview.header(observe.job_progress(r, b.keys, job), args.item), flush=True)
        n = 0
        for line in logview.follow_lines(r, b.keys, job, args.follow, args.item):
            print(logview.format_line(line), flush=True)
            n += 1
        if not n:
            print("(no log lines" + ("" if args.item is None else f" of item {args.item}")
                  + (": it printed nothing, or they expired" if not args.follow else "") + ")")
        if args.follow:
            print(f"(job ended: {logview.describe(observe.job_progress(r, b.keys, job))})")
    except KeyboardInterrupt:  # the way out of -f: no traceback, status 0
        print(file=sys.stderr)
    except BrokenPipeError:  # (`miniray logs | head`: the reader has all it wanted)
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_cancel(args) -> int:
    r, b = _client(args.redis)
    job = _resolve_job(r, b, args.job)
    dropped = b.cancel_job(job)
    print(f"cancelled job {job}: {len(dropped)} queued chunk(s) dropped; running tasks "
          "are interrupted by their workers")
    return 0


def cmd_cache(args) -> int:
    from .client import cache
    from .config import settings

    url = args.redis or settings().redis_url
    if not url:
        raise SystemExit("miniray cache: give --redis URL or set MINIRAY_REDIS_URL")
    if args.action == "clear":
        print(f"item cache cleared: {cache.clear(url)} entries removed")
    else:
        st = cache.stats(url)
        print(f"item cache: {st['entries']} entries, {st['bytes']} bytes")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        from .worker.cli import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["ssh-up"]:
        from .cluster.ssh.cluster import main as ssh_up_main

        return ssh_up_main(argv[1:])
    if argv[:1] == ["serve"]:
        try:
            from .channels.server import main as serve_main
        except ImportError:
            raise SystemExit("miniray serve: the channels layer is not installed") from None
        return serve_main(argv[1:])
    p = argparse.ArgumentParser(prog="miniray", description="miniray cluster tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("worker", help="run a worker (see `miniray worker --help`)")
    sub.add_parser("serve", help="run a channels WorkerServer (see `miniray serve --help`)")
    sub.add_parser("ssh-up", help="start workers on SSH hosts (see `miniray ssh-up --help`)")
    up = sub.add_parser("up", help="start a local server and workers in the foreground "
                                   "(--detach: in the background, outliving this shell)")
    up.add_argument("-n", "--workers", type=int, default=None)
    up.add_argument("--slots", type=int, default=1)
    up.add_argument("--detach", action="store_true",
                    help="start the persistent local cluster in the background (or reuse the "
                         "running one) and return; `miniray down` stops it")
    up.add_argument("--idle-stop", type=float, default=None, metavar="SECONDS",
                    help="with --detach: stop after this long without work (default "
                         "MINIRAY_IDLE_STOP_SECONDS, 3600; 0: never)")
    down = sub.add_parser("down", help="stop the persistent local cluster")
    down.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    down.set_defaults(fn=cmd_down)
    for name, fn in (("status", cmd_status), ("jobs", cmd_jobs), ("logs", cmd_logs),
                     ("cancel", cmd_cancel)):
        sp = sub.add_parser(name)
        sp.add_argument("--redis", default=None, help="server URL (default MINIRAY_REDIS_URL)")
        if name not in ("status", "jobs"):
            sp.add_argument("job", nargs="?", default=None,
                            help="job id or name (default: the newest job)")
        if name == "logs":
            sp.add_argument("-f", "--follow", action="store_true",
                            help="print new lines as they come, until the job ends (or Ctrl-C)")
            sp.add_argument("--item", type=int, default=None, metavar="N",
                            help="only the lines of item N (the number in brackets)")
        sp.set_defaults(fn=fn)
    up.set_defaults(fn=cmd_up)
    cache = sub.add_parser("cache", help="the item cache of cache=True maps: size, or clear")
    cache.add_argument("action", nargs="?", choices=["info", "clear"], default="info")
    cache.add_argument("--redis", default=None, help="server URL (default MINIRAY_REDIS_URL)")
    cache.set_defaults(fn=cmd_cache)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
