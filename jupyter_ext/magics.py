"""``%miniray`` and ``%%miniray map``: thin magics over miniray's public API.

A user's mistake (bad option, syntax error in the body, an EXPR that fails) raises
``UsageError`` before anything is submitted; IPython shows it without a traceback.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Sequence

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import display

import miniray
from miniray.client.observe import ClusterView

from .cell import cell_filename, check_items, check_sendable, compile_cell
from .feed import DEFAULT_BUFFERSIZE
from .logs import format_line
from .run import MapRun
from .target import ClusterTarget
from .tracebacks import item_error

__all__ = ["MinirayMagics", "split_map_line"]

_MAP_USAGE = ("%%miniray map NAME in EXPR [-o VAR] [--chunksize N] [--priority P] "
              "[--job-name S] [--timeout S] [--memory GB] [--cpus N] [--gpus N] [--gpu-memory GB] "
              "[--triton] [--keep-children] [--cache] [--bg] [--buffersize N]")
_LINE_USAGE = ("%miniray local [-n WORKERS] [--persist] | connect URL | status | jobs | "
               "attach JOB [-o VAR] | logs [JOB] [--tail N] | cancel [JOB] | debug [ITEM] | "
               "cache [clear] | up HOST ... (--help) | down")
_KEEP_RUNS = 50


class _Parser(argparse.ArgumentParser):
    """argparse that reports a user's mistake as UsageError instead of exiting."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}\nusage: {self.usage}")

    def exit(self, status=0, message=None):
        raise UsageError(message or self.format_help())


def _map_parser() -> _Parser:
    p = _Parser(prog="%%miniray map", usage=_MAP_USAGE, add_help=False)
    p.add_argument("-o", "--output", metavar="VAR")
    p.add_argument("--chunksize", type=int, default=1)
    p.add_argument("--priority", type=int, default=1)
    p.add_argument("--job-name")
    p.add_argument("--timeout", type=float)
    p.add_argument("--memory", type=float, metavar="GB")
    p.add_argument("--cpus", type=int)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--gpu-memory", type=float, metavar="GB")
    p.add_argument("--triton", action="store_true")
    p.add_argument("--keep-children", action="store_true")
    p.add_argument("--cache", action="store_true")
    p.add_argument("--bg", action="store_true")
    p.add_argument("--buffersize", type=int, default=DEFAULT_BUFFERSIZE, metavar="N")
    return p


def split_map_line(line: str) -> tuple[str, str, str]:
    """``"map x in range(3) -o out"`` -> ``("x", "range(3)", "-o out")``.

    EXPR ends at the first option (`` -x`` / `` --xx``) outside brackets and strings, so
    ``range(-5, 5)`` and ``a - b`` stay whole.
    """
    m = re.match(r"\s*map\s+([^\s]+)\s+in\s+(.*)$", line, re.S)
    if not m:
        raise UsageError(f"expected {_MAP_USAGE}\n got: %%miniray {line.strip()}")
    name, rest = m.group(1), m.group(2)
    depth, quote, i = 0, None, 0
    while i < len(rest):
        c = rest[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif (depth == 0 and c.isspace() and rest[i + 1:i + 2] == "-"
              and re.match(r"-[A-Za-z]|--[A-Za-z]", rest[i + 1:i + 4])):
            return name, rest[:i].strip(), rest[i + 1:].strip()
        i += 1
    return name, rest.strip(), ""


def _despite_interrupts(step, tries: int = 3) -> None:
    """Run ``step`` (bounded: a cancel, a settle) to its end although the user may press
    Interrupt again meanwhile: an interrupt must not leave a map half cancelled."""
    for _ in range(tries):
        try:
            step()
            return
        except KeyboardInterrupt:
            continue


def _interrupted(run: MapRun, output: str | None, results: list) -> KeyboardInterrupt:
    """What an interrupted map re-raises, so that "Run All" stops there as with any
    interrupted cell; shown as its one line (no frames of miniray or IPython)."""
    if results is None:
        where = "it was still submitting its items; nothing was kept"
    elif output:
        done = sum(r is not None for r in results)
        where = (f"the {done} result(s) so far are in {output} (None for the items that did "
                 "not finish)")
    else:
        where = "use -o VAR to keep the results of an interrupted map"

    err = KeyboardInterrupt(f"miniray map {run.name!r} (job {run.job}) cancelled by the "
                            f"interrupt; {where}")
    err._render_traceback_ = lambda: [f"KeyboardInterrupt: {err}"]
    return err


def _redact(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@magics_class
class MinirayMagics(Magics):
    """The ``%miniray`` line magic and the ``%%miniray map`` cell magic."""

    def __init__(self, shell):
        super().__init__(shell)
        self.target = ClusterTarget()  # which cluster: see jupyter_ext.target
        self.runs: list[MapRun] = []
        self._view: ClusterView | None = None
        self._view_url: str | None = None
        self._ssh = None  # the SSHCluster of %miniray up, until %miniray down
        self.attached: list[MapRun] = []  # %miniray attach views (detached at %miniray down)
        self._told_bg = False  # that a --bg job on a cluster living in the kernel dies with it

    @property
    def redis_url(self) -> str | None:
        """The cluster this kernel uses now (None: its embedded one), resolved at each use:
        the persistent cluster may have started or stopped since (see jupyter_ext.target)."""
        return self.target.url()

    @redis_url.setter
    def redis_url(self, url: str | None) -> None:  # None: back to the default
        self.target.choose("default" if url is None else "url", url)

    @line_cell_magic
    def miniray(self, line, cell=None):
        """Run a cell over many items on miniray workers, or manage the cluster.

        %%miniray map NAME in EXPR [-o VAR] [--chunksize N] [--priority P] [--job-name S]
                                    [--timeout S] [--memory GB] [--cpus N] [--gpus N]
                                    [--gpu-memory GB] [--triton] [--keep-children]
                                    [--cache] [--bg] [--buffersize N]
        %miniray local [-n WORKERS] [--persist] | connect URL | status | jobs
                 | attach JOB [-o VAR] | logs [JOB] [--tail N] | cancel [JOB]
                 | debug [ITEM] | cache [clear] | down
        %miniray up HOST[=SLOTS] ... [-n SLOTS] [--python PATH] [--install] [--timeout S]
                 [-i FILE] [--known-hosts FILE] [--accept-new-host-keys]  (--help: more)

        ``--bg`` jobs are kept: they run on if this kernel dies, and ``%miniray attach JOB``
        in any kernel connected to the cluster follows one (an interrupt detaches; the job
        goes on). ``--buffersize N`` (default 4096; 0: no bound): a map of more than N
        chunks submits N and the next ones as they finish, so a huge EXPR (a range of 10
        million) is not pickled and stored up front; EXPR with a ``len()`` is not copied.
        ``--cache`` and ``--bg`` submit everything at once.
        """
        __tracebackhide__ = True
        if cell is None:
            return self._line(line)
        return self._map(line, cell)

    # -- %%miniray map -------------------------------------------------------------------------
    def _map(self, line: str, cell: str):
        __tracebackhide__ = True
        name, expr, opts = split_map_line(line)
        try:
            args = _map_parser().parse_args(shlex.split(opts))
        except ValueError as e:
            raise UsageError(f"%%miniray map: cannot parse the options {opts!r}: {e}") from None
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%%miniray map: -o needs a variable name, not {args.output!r}")
        if args.chunksize < 1:
            raise UsageError(f"%%miniray map: --chunksize must be >= 1, not {args.chunksize}")
        if not expr:
            raise UsageError(f"%%miniray map: EXPR is missing\nusage: {_MAP_USAGE}")
        if args.buffersize < 0:
            raise UsageError(f"%%miniray map: --buffersize must be >= 0 (0: no bound), not "
                             f"{args.buffersize}")
        try:
            limits = miniray.Limits(timeout_seconds=args.timeout, memory_gb=args.memory,
                                    cpus=args.cpus, gpus=args.gpus,
                                    gpu_memory_gb=args.gpu_memory, triton=args.triton,
                                    keep_children=args.keep_children)
        except miniray.ConfigurationError as e:
            raise UsageError(f"%%miniray map: {e}") from None
        fn = compile_cell(cell, name, self.shell.user_ns,
                          cell_filename(self.shell, line, cell), first_line=2)
        try:
            value = eval(expr, self.shell.user_ns)
        except Exception as e:
            raise UsageError(f"%%miniray map: cannot evaluate EXPR {expr!r}: "
                             f"{type(e).__name__}: {e}") from None
        try:  # (a range or a list is not copied: a huge one is fed --buffersize at a time)
            items = value if isinstance(value, Sequence) else list(value)
        except TypeError:
            raise UsageError(f"%%miniray map: EXPR {expr!r} gives a {type(value).__name__}, "
                             "which is not iterable") from None
        check_sendable(fn)  # at once, naming the variable: not from the widget, later
        first = (args.buffersize or len(items)) * args.chunksize  # (the rest as it is fed)
        check_items(items if len(items) <= first else items[:first], expr)
        job_name = args.job_name or f"map {name} in {expr}"[:60]
        url = self.redis_url
        if args.bg and not self._told_bg and (url is None or (
                self._ssh is not None and url == self._ssh.url)):
            self._told_bg = True  # (once per kernel)
            print("miniray: this --bg job runs on this kernel's own cluster, which stops if "
                  "the kernel dies; %miniray local --persist keeps jobs running across kernel "
                  "restarts")
        try:
            run = MapRun(fn, items, redis_url=url, job_name=job_name,
                         priority=args.priority, limits=limits, chunksize=args.chunksize,
                         cancel_button=args.bg, start=False, cache=args.cache, keep=args.bg,
                         buffersize=args.buffersize or None)
        except miniray.SerializationError as e:
            raise UsageError(f"%%miniray map: the cell cannot be sent to workers: {e}") from None
        run.item_name = name  # (its errors say "item 3 of 10 (x = 7)")
        self.runs = self.runs[-(_KEEP_RUNS - 1):] + [run]
        if args.bg:
            if not args.output:
                return run.start()  # the cell's value: the handle, shown as its live view
            self.shell.user_ns[args.output] = run
            display(run)
            run.start()
            return None
        try:
            display(run)  # before anything runs, so its text fallback is the same every time
            run.start()
        except KeyboardInterrupt:  # while it was shown or its items were being submitted
            run.discard()  # (nothing, once it has started: start() cancelled what it sent)
            raise _interrupted(run, args.output, None) from None
        return self._block(run, args.output, name, items)

    def _block(self, run: MapRun, output: str | None, name: str = "item", items=()):
        __tracebackhide__ = True  # IPython: show the user's error, not these frames
        interrupted = False
        try:
            run.wait()
        except KeyboardInterrupt:  # the kernel interrupt is the cancel path of a blocking map
            interrupted = True
        if interrupted:
            _despite_interrupts(run.cancel)
        _despite_interrupts(run.settle)
        results = run.results()
        if output:
            self.shell.user_ns[output] = results
        if not run.snapshot_left:  # (the final state it left in the display says it all)
            print(run.summary())
        if interrupted:
            raise _interrupted(run, output, results)
        errors = run.errors
        if errors:
            raise item_error(run, min(errors), name, items)
        return None if output else results

    # -- %miniray ... ----------------------------------------------------------------------------
    def _cluster(self) -> ClusterView:
        url = self.redis_url
        if self._view is not None and self._view_url != url:
            self._drop_view()  # (the persistent cluster started or stopped since)
        if self._view is None:
            self._view, self._view_url = ClusterView(url), url
        return self._view

    def _drop_view(self) -> None:
        if self._view is not None:
            try:
                self._view.close()
            except Exception:
                pass
            self._view = None

    def _line(self, line: str):
        words = shlex.split(line)
        if not words:
            raise UsageError(f"usage: {_LINE_USAGE}")
        cmd, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            hint = "; use %%miniray map as a cell magic" if cmd == "map" else ""
            raise UsageError(f"%miniray: unknown command {cmd!r}{hint}\nusage: {_LINE_USAGE}")
        return handler(rest)

    def _cmd_local(self, rest):
        p = _Parser(prog="%miniray local", usage="%miniray local [-n WORKERS] [--persist]",
                    add_help=False)
        p.add_argument("-n", "--workers", type=int)
        p.add_argument("--persist", action="store_true")
        args = p.parse_args(rest)
        if args.workers is not None and args.workers < 1:
            raise UsageError("%miniray local: -n needs at least 1 worker")
        self._drop_view()
        if args.persist:
            from .target import start_persistent

            return start_persistent(self, args.workers)
        self.target.choose("embedded")
        cluster = miniray.init(workers=args.workers)
        print(f"miniray: local cluster up with {cluster.nworkers} worker(s)")

    def _cmd_connect(self, rest):
        if len(rest) != 1:
            raise UsageError("usage: %miniray connect URL  (e.g. redis://:PASSWORD@host:6379)")
        url = rest[0]
        try:
            view = ClusterView(url)
        except Exception as e:
            raise UsageError(f"%miniray connect: cannot reach {_redact(url)}: {e}") from None
        self._drop_view()
        self.redis_url, self._view, self._view_url = url, view, url
        print(f"miniray: connected to {_redact(url)}; {len(view.workers())} worker(s) alive")

    def _cmd_up(self, rest):
        __tracebackhide__ = True
        from .ssh import start_ssh_cluster, up_parser

        p = up_parser()
        if "-h" in rest or "--help" in rest:
            print(p.format_help())
            return
        args = p.parse_args(rest)
        if args.slots is not None and args.slots < 1:
            raise UsageError("%miniray up: --slots must be >= 1")
        if self._ssh is not None:
            raise UsageError("%miniray up: SSH workers are already up; %miniray down first")
        cluster, _ = start_ssh_cluster(args.hosts, slots=args.slots, python=args.python,
                                       install=args.install, timeout=args.timeout,
                                       identity=args.identity, known_hosts=args.known_hosts,
                                       accept_new_host_keys=args.accept_new_host_keys)
        self._drop_view()  # like %miniray connect: later maps and %miniray status go there
        self._ssh, self.redis_url = cluster, cluster.url
        hosts = ", ".join(cluster.status.hosts)
        print(f"miniray: {len(cluster.status.hosts)} SSH worker(s) up on {hosts}; "
              "%%miniray map runs there until %miniray down")

    def _cmd_status(self, rest):
        if rest:
            raise UsageError("usage: %miniray status")
        view = self._cluster()
        print(self.target.describe(self._ssh.status.hosts if self._ssh is not None else None))
        print(view.status())  # the text of `miniray status` (observe.format_status)

    def _find_run(self, job):
        for run in reversed(self.runs):
            if job is None or job in (run.job, run.name):
                return run
        return None

    def _resolve(self, job, command) -> str:
        run = self._find_run(job)
        if run is not None:
            return run.job
        found = self._cluster().find_job(job)
        if found is None:
            what = "no jobs yet" if job is None else f"no job named {job!r}"
            raise UsageError(f"%miniray {command}: {what}; %miniray status lists the jobs")
        return found

    def _cmd_jobs(self, rest):
        if rest:
            raise UsageError("usage: %miniray jobs")
        from miniray.client.jobs import format_jobs, list_jobs

        view = self._cluster()
        print(format_jobs(list_jobs(view._r, view.keys)))

    def _cmd_attach(self, rest):
        __tracebackhide__ = True
        from .attach import attach_run

        return attach_run(self, rest)

    def _cmd_logs(self, rest):
        p = _Parser(prog="%miniray logs", usage="%miniray logs [JOB] [--tail N]", add_help=False)
        p.add_argument("job", nargs="?")
        p.add_argument("--tail", type=int, default=50)
        args = p.parse_args(rest)
        job = self._resolve(args.job, "logs")
        lines = list(self._cluster().logs(job))
        for line in lines[-args.tail:] if args.tail > 0 else lines:
            print(format_line(line))

    def _cmd_cancel(self, rest):
        if len(rest) > 1:
            raise UsageError("usage: %miniray cancel [JOB]")
        job = rest[0] if rest else None
        if job is None:
            running = [r for r in self.runs if not r.done()]
            for r in running:
                r.cancel()
            print(f"miniray: cancelled {len(running)} running map(s)")
            return
        run = self._find_run(job)
        if run is not None:
            run.cancel()
            print(f"miniray: cancelled {run.name!r}")
            return
        jid = self._resolve(job, "cancel")
        dropped = self._cluster().cancel_job(jid)
        print(f"miniray: cancelled job {job!r}: {dropped} queued chunk(s) dropped, running "
              "tasks are interrupted")

    def _cmd_debug(self, rest):
        """Re-run a failed item of the last map here, in the debugger (jupyter_ext.debug)."""
        from .debug import debug_item

        debug_item(self.shell, self.runs, rest)

    def _cmd_cache(self, rest):
        """``%miniray cache``: the item cache's size; ``%miniray cache clear`` empties it."""
        from miniray.client import cache

        if rest == ["clear"]:
            n = cache.clear(self.redis_url)
            print(f"miniray: item cache cleared ({n} entr{'y' if n == 1 else 'ies'} removed)")
        elif not rest:
            st = cache.stats(self.redis_url)
            print(f"miniray: item cache holds {st['entries']} entr"
                  f"{'y' if st['entries'] == 1 else 'ies'}, {st['bytes']} bytes "
                  "(%%miniray map ... --cache uses it; %miniray cache clear empties it)")
        else:
            raise UsageError("usage: %miniray cache [clear]")

    def _cmd_down(self, rest):
        for r in self.runs:
            if not r.done():
                r.cancel()
        for r in self.runs:
            r.settle()  # its threads stop reading before the server goes away
        for r in self.attached:  # (detached, not cancelled: the jobs are someone else's)
            r.detach()
        self.attached = []
        self._drop_view()
        ssh, self._ssh = self._ssh, None
        if ssh is not None:
            ssh.close()  # its workers (SIGTERM), tunnels, connections and private server
            print(f"miniray: SSH workers on {', '.join(ssh.status.hosts)} stopped")
            if self.redis_url == ssh.url:
                self.redis_url = None
                miniray.shutdown()  # and the local cluster, if one was started before
                return
        if self.target.choice == "persist" or self.target.kind() == "persistent":
            from .target import stop_persistent

            return stop_persistent(self)
        if self.redis_url is None:
            miniray.shutdown()
            print("miniray: local cluster stopped")
        else:
            print(f"miniray: disconnected from {_redact(self.redis_url)}")
            self.redis_url = None
