"""Run a child program and make sure everything it started is gone afterwards.

Every child gets a unique ``MINIRAY_BENCH_TOKEN`` in its environment; its descendants inherit it,
even those that daemonise away from the process tree (Ray's raylet, a Redis server), so after the
child ends we can find exactly the processes this bench started and nothing else.
"""

import os
import signal
import subprocess
import time
import uuid

import psutil

TOKEN_VAR = "MINIRAY_BENCH_TOKEN"


def new_token():
    return uuid.uuid4().hex


def _has_token(proc, token):
    try:
        return proc.environ().get(TOKEN_VAR) == token
    except (psutil.Error, OSError):
        return False


def processes_with_token(token):
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me and _has_token(p, token)]


def reap_token(token, grace=3.0):
    """Wait up to ``grace`` s for processes carrying ``token`` to exit; kill the rest.

    Returns the names of the processes that had to be killed (leaks)."""
    deadline = time.monotonic() + grace
    while True:
        left = processes_with_token(token)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    leaked = []
    for p in left:
        try:
            leaked.append(p.name())
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return leaked


def run_child(cmd, timeout, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
              grace=3.0):
    """Run ``cmd`` with a fresh token; on timeout kill it and its descendants.

    Returns ``(returncode or None on timeout, stdout, stderr, leaked process names)``."""
    token = new_token()
    env = dict(os.environ if env is None else env)
    env[TOKEN_VAR] = token
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        out, err = proc.communicate()
        rc = None
    leaked = reap_token(token, grace=grace)
    return rc, out, err, leaked


def stop_all(procs, grace: float = 20.0) -> None:
    """Terminate ``procs`` (``subprocess.Popen``), then wait up to ``grace`` seconds for each,
    killing one that is still there."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
