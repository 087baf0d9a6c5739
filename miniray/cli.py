"""The ``miniray`` command: worker, up, ssh-up, status, jobs, logs, cancel."""

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
        raise SystemExit("miniray: give --redis URL or set MINIRAY_REDIS_URL "
                         "(`miniray up` prints one)")
    r = connect(url)
    return r, Broker(r, s.namespace)


def cmd_up(args) -> int:
    from .local import LocalCluster

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


def cmd_status(args) -> int:
    from . import observe

    r, b = _client(args.redis)
    print(observe.format_status(observe.list_workers(r, b.keys), observe.list_jobs(r, b.keys)))
    return 0


def cmd_jobs(args) -> int:
    from .jobs import format_jobs, list_jobs

    r, b = _client(args.redis)
    print(format_jobs(list_jobs(r, b.keys)))
    return 0


def _resolve_job(r, b, job):
    from . import observe

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
    from . import observe

    r, b = _client(args.redis)
    job = _resolve_job(r, b, args.job)
    try:
        for line in observe.iter_logs(r, b.keys, job, follow=args.follow):
            task = "" if line.task is None else f"[{line.task}]"
            print(f"{line.worker}{task} {line.stream}: {line.text}", flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_cancel(args) -> int:
    r, b = _client(args.redis)
    job = _resolve_job(r, b, args.job)
    dropped = b.cancel_job(job)
    print(f"cancelled job {job}: {len(dropped)} queued chunk(s) dropped; running tasks "
          "are interrupted by their workers")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        from .worker import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["ssh-up"]:
        from .sshcluster import main as ssh_up_main

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
    up = sub.add_parser("up", help="start a local server and workers in the foreground")
    up.add_argument("-n", "--workers", type=int, default=None)
    up.add_argument("--slots", type=int, default=1)
    for name, fn in (("status", cmd_status), ("jobs", cmd_jobs), ("logs", cmd_logs),
                     ("cancel", cmd_cancel)):
        sp = sub.add_parser(name)
        sp.add_argument("--redis", default=None, help="server URL (default MINIRAY_REDIS_URL)")
        if name not in ("status", "jobs"):
            sp.add_argument("job", nargs="?", default=None, help="job id or name (default: newest)")
        if name == "logs":
            sp.add_argument("-f", "--follow", action="store_true")
        sp.set_defaults(fn=fn)
    up.set_defaults(fn=cmd_up)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
