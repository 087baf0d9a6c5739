"""``%miniray attach JOB [-o VAR]``: the live view of a kept job started elsewhere (another
kernel, alive or dead), blocking like a map, VAR filled with the ordered results.

A kernel interrupt during the wait detaches: the view stops, VAR gets the results so far,
the job keeps running on the cluster, and the one-line message says how to attach again or
cancel it.
"""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.display import display

import miniray

from .run import MapRun

__all__ = ["attach_run"]

_USAGE = "%miniray attach JOB [-o VAR]"


def _detached(job: str, output: str | None, results: list) -> KeyboardInterrupt:
    kept = (f"the {sum(r is not None for r in results)} result(s) so far are in {output}; "
            if output else "")
    err = KeyboardInterrupt(
        f"detached from job {job}: {kept}it keeps running on the cluster. "
        f"%miniray attach {job} follows it again; %miniray cancel {job} stops it")
    err._render_traceback_ = lambda: [f"KeyboardInterrupt: {err}"]
    return err


def attach_run(magics, rest: list):
    """The body of ``%miniray attach`` (``magics``: the MinirayMagics instance)."""
    __tracebackhide__ = True
    from .magics import _Parser

    p = _Parser(prog="%miniray attach", usage=_USAGE, add_help=False)
    p.add_argument("job")
    p.add_argument("-o", "--output", metavar="VAR")
    args = p.parse_args(rest)
    if args.output is not None and not args.output.isidentifier():
        raise UsageError(f"%miniray attach: -o needs a variable name, not {args.output!r}")
    try:
        handle = miniray.attach(args.job, magics.redis_url)
    except (miniray.JobNotFoundError, miniray.JobNotKeptError) as e:
        raise UsageError(f"%miniray attach: {e}") from None
    run = MapRun.attach(handle, start=False)
    magics.attached = [r for r in magics.attached if not r.done()] + [run]
    display(run)
    run.start()
    interrupted = False
    try:
        run.wait()
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        run.detach()
    run.settle()
    results = run.results()
    if args.output:
        magics.shell.user_ns[args.output] = results
    if not run.snapshot_left:
        print(run.summary())
    if interrupted:
        raise _detached(args.job, args.output, results)
    return None if args.output else results
