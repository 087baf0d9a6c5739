"""The node's Triton Inference Server, kept by a ``miniray worker --triton``.

A managed server (``--triton-models DIR``) is found (``MINIRAY_TRITON_BIN``, PATH, or the
binary in the ``nvidia-pytriton`` wheel: ``binary.py``), started on free loopback ports with
explicit model control, health-checked, restarted with backoff when it dies, and stopped with
the worker. An attached server (``--triton-url URL``) is only health-checked. Either way a
monitor thread unloads models that tasks stopped using
(``miniray.triton.load_model(stale_after_seconds=)``).

Tasks reach the server through the ``ENV_*`` variables the worker puts in its task processes'
environment; the per-server load lock and last-use records live in Redis (``keys.py``). The
health checks and model loads speak Triton's HTTP API (``httpapi.py``).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from urllib.parse import urlparse

from miniray.errors import ConfigurationError, TritonError

from .binary import find_binary, wheel_setup
from .httpapi import loaded_models, repository_call, server_ready

__all__ = ["ENV_GRPC", "ENV_HTTP", "ENV_SERVER", "TritonServer"]

log = logging.getLogger("miniray.triton")

# worker -> task process plumbing (not user settings)
ENV_HTTP = "MINIRAY_TRITON_HTTP"  # host:port of the server's HTTP endpoint
ENV_GRPC = "MINIRAY_TRITON_GRPC"  # host:port of its gRPC endpoint ("" when not known)
ENV_SERVER = "MINIRAY_TRITON_SERVER"  # the server's name in Redis keys

_CHECK_SECONDS = 0.5  # health check period
_INDEX_SECONDS = 2.0  # how often the list of loaded models is refreshed
_STALE_CHECK_SECONDS = 2.0  # how often last-use records are scanned
_HUNG_SECONDS = 30.0  # a server that was ready and stops answering this long is killed
_MAX_BACKOFF = 60.0
_EXIT_TIMEOUT = 5  # seconds tritonserver may take to finish requests on SIGTERM
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
# Runs tritonserver with a parent-death signal: if the worker is SIGKILLed, its server stops
# instead of holding the GPU and the ports. (preexec_fn is unsafe in a threaded process.)
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(0); os.execv(sys.argv[2], sys.argv[2:])"
)


# -- the per-server lock in Redis (shared with miniray.triton) ------------------------------
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end " \
           "return 0"


@contextlib.contextmanager
def redis_lock(r, key: str, ttl: float, wait: float | None):
    """Hold ``key`` (SET NX PX) for the block; wait up to ``wait`` s (None: don't wait).

    Yields True when held, False when it could not be had in time.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + (wait or 0.0)
    while not r.execute("SET", key, token, "NX", "PX", int(ttl * 1000)):
        if wait is None or time.monotonic() > deadline:
            yield False
            return
        time.sleep(0.05)
    try:
        yield True
    finally:
        r.execute("EVAL", _RELEASE, 1, key, token)


def parse_used(value) -> tuple[float, float]:
    """A last-use record (see keys.py): (last use, stale after) in seconds."""
    last, after = (value.decode() if isinstance(value, bytes) else value).split()
    return float(last), float(after)


# -- the managed server's ports, work folders and exit codes ---------------------------------
def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _remove_orphan_workdirs() -> None:
    """Remove what killed workers left: ``miniray-triton-PID-*`` of PIDs no longer running."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "miniray-triton-*-*")):
        pid = os.path.basename(path).split("-")[2]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _hostport(url: str, option: str, default_port: int) -> str:
    u = urlparse(url if "//" in url else f"//{url}")
    if u.scheme not in ("", "http", "grpc") or not u.hostname:
        raise ConfigurationError(
            f"{option} {url!r} is not a Triton address; give e.g. http://127.0.0.1:8000 "
            "(or host:port)")
    try:
        port = u.port or default_port
    except ValueError:
        raise ConfigurationError(f"{option} {url!r} has a bad port; give e.g. host:8000") from None
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{port}"


def _how(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class TritonServer:
    """One node's Triton server: managed (``models``: a model repository) or attached (``url``).

    ``ready`` is the last health check's answer, kept by the monitor thread: reading it does no
    I/O (the scheduler reads it at every claim).
    """

    def __init__(self, models: str | None = None, url: str | None = None,
                 grpc_url: str | None = None, lazy: bool = False, binary: str | None = None):
        if models and url:
            raise ConfigurationError(
                "give --triton-models DIR (this worker starts a Triton server) or --triton-url "
                "URL (it uses one already running), not both")
        if not models and not url:
            raise ConfigurationError(
                "--triton needs --triton-models DIR (a Triton model repository this worker "
                "serves with a tritonserver of its own) or --triton-url URL (a Triton server "
                "already running on this node)")
        self.managed = bool(models)
        self.lazy = lazy
        self.proc: subprocess.Popen | None = None
        self.models: list[str] = []
        self.restarts = 0
        self.error: str | None = None
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._launches = 0
        self._failures = 0  # deaths in a row without a healthy minute between them
        self._next_start = 0.0
        self._ready_since: float | None = None
        self._unhealthy_since: float | None = None
        self._reload: list[str] | None = None  # models to load at the next start
        self._shm_prefix = ""
        self.workdir: Path | None = None
        if url:
            self.http = _hostport(url, "--triton-url", 8000)
            self.grpc = _hostport(grpc_url, "--triton-grpc-url", 8001) if grpc_url else ""
            self.metrics = ""
        else:
            repo = Path(models).expanduser().resolve()
            if not repo.is_dir():
                raise ConfigurationError(
                    f"--triton-models {models}: no such directory. Give a Triton model "
                    "repository: one folder per model, each with config.pbtxt and a version "
                    "folder such as 1/")
            self.repo = repo
            from miniray.config import settings

            self.binary = find_binary(binary or settings().triton_bin)
            self.http, self.grpc, self.metrics = (f"127.0.0.1:{p}" for p in _free_ports(3))
            _remove_orphan_workdirs()
            self.workdir = Path(tempfile.mkdtemp(prefix=f"miniray-triton-{os.getpid()}-"))
            weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
            self._args, self._libs = wheel_setup(self.binary, self.workdir)
        host, _, port = self.http.rpartition(":")
        self.server_id = f"{socket.gethostname()}:{port}" if host in _LOOPBACK else self.http

    @property
    def ready(self) -> bool:
        """True while the server answers ``/v2/health/ready`` (as of the last check)."""
        return self._ready

    def task_env(self) -> dict:
        """What a task process needs to find this server (read by ``miniray.triton``)."""
        return {ENV_HTTP: self.http, ENV_GRPC: self.grpc, ENV_SERVER: self.server_id}

    def describe(self) -> dict:
        """The server's state for the worker's heartbeat (``miniray status`` shows it)."""
        proc = self.proc
        return {
            "managed": self.managed, "url": f"http://{self.http}",
            "grpc_url": f"grpc://{self.grpc}" if self.grpc else None,
            "metrics_url": f"http://{self.metrics}/metrics" if self.metrics else None,
            "ready": self._ready, "models": list(self.models), "restarts": self.restarts,
            "pid": proc.pid if proc is not None and proc.poll() is None else None,
            "error": self.error, "server": self.server_id,
        }

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, connect, namespace: str) -> None:
        """Start the monitor thread (it starts a managed server); ``connect()`` gives Redis."""
        from miniray.keys import Keys

        self._connect, self._keys = connect, Keys(namespace)
        self._thread = threading.Thread(target=self._monitor, name="miniray-triton", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the monitor; stop a managed server (SIGTERM, then SIGKILL) and forget its models."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._ready = False
        if self.proc is not None:
            self._terminate(self.proc)
            self.proc = None
            self._cleanup_shm()
        if self.managed and self._thread is not None:
            try:
                r = self._connect()
                r.execute("DEL", self._keys.triton_used(self.server_id))
                r.close()
            except Exception as e:  # the Redis server may be gone already
                log.debug("could not clear the Triton last-use records: %s", e)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, proc: subprocess.Popen) -> None:
        from miniray.worker.isolation import kill_tree

        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_EXIT_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(proc.pid)  # its Python backend stubs too, should any outlive it
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    # -- the monitor thread --------------------------------------------------------------------
    def _monitor(self) -> None:
        r = None
        next_index = next_stale = 0.0
        if self.managed:  # a fresh server: records of an earlier one with this name are void
            with contextlib.suppress(Exception):
                r = self._connect()
                r.execute("DEL", self._keys.triton_used(self.server_id))
        while not self._stop.is_set():
            try:
                if self.managed:
                    self._supervise()
                self._check()
                now = time.monotonic()
                if self._ready and now >= next_index:
                    self.models = loaded_models(self.http)
                    next_index = now + _INDEX_SECONDS
                if self._ready and now >= next_stale:
                    r = r or self._connect()
                    self._unload_stale(r)
                    next_stale = now + _STALE_CHECK_SECONDS
            except Exception as e:  # Redis or Triton hiccups: never let the thread die
                log.warning("Triton monitor: %s: %s", type(e).__name__, e)
                if r is not None:
                    r.close()
                r = None
            self._stop.wait(_CHECK_SECONDS)
        if r is not None:
            r.close()

    def _check(self) -> None:
        ok = server_ready(self.http)
        now = time.monotonic()
        if ok and not self._ready:
            log.info("Triton server at http://%s is ready", self.http)
            self.error = None
            self.models = loaded_models(self.http)
        elif self._ready and not ok:
            log.warning("Triton server at http://%s stopped answering its health check",
                        self.http)
        if ok:
            self._ready_since = self._ready_since or now
            self._unhealthy_since = None
        else:
            self._unhealthy_since = self._unhealthy_since or now
            if not self.managed:
                self.error = f"no answer from http://{self.http}/v2/health/ready"
        self._ready = ok

    def _supervise(self) -> None:
        from miniray.worker.isolation import kill_tree

        now = time.monotonic()
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            self._ready = False
            self.proc = None
            self._cleanup_shm()
            if self._ready_since is not None and now - self._ready_since > 60:
                self._failures = 0
            self._failures += 1
            delay = min(_MAX_BACKOFF, 0.5 * 2 ** min(self._failures - 1, 10))
            self._next_start = now + delay
            if self._ready_since is not None:
                self._reload = list(self.models)  # bring back what was loaded
            self.models = []
            self.error = (f"tritonserver (pid {proc.pid}) {_how(proc.returncode)}; "
                          f"restarting in {delay:g} s. Its log ends:\n{self._log_tail()}")
            log.warning("%s", self.error)
            self._ready_since = self._unhealthy_since = None
        elif proc is not None:
            hung = (self._ready_since is not None and self._unhealthy_since is not None
                    and now - self._unhealthy_since > _HUNG_SECONDS)
            if hung:
                log.warning("Triton server pid %d has not answered for %g s; killing it",
                            proc.pid, _HUNG_SECONDS)
                kill_tree(proc.pid)
        if self.proc is None and now >= self._next_start and not self._stop.is_set():
            self._launch()

    def _launch(self) -> None:
        if self._reload is not None:
            load = self._reload
        else:
            load = [] if self.lazy else ["*"]
        self._launches += 1
        self.restarts = self._launches - 1
        # A prefix of our own: two servers on one host must not share the backend's /dev/shm
        self._shm_prefix = f"miniray{os.getpid()}x{self._launches}_"
        args = [
            self.binary, f"--model-repository={self.repo}", "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in load],
            "--http-address=127.0.0.1", f"--http-port={self.http.rpartition(':')[2]}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc.rpartition(':')[2]}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics.rpartition(':')[2]}",
            # ready means "serving", not "every model loaded": one broken model must not take
            # the node's other models away, nor kill the server at start
            "--strict-readiness=false", "--exit-on-error=false",
            f"--exit-timeout-secs={_EXIT_TIMEOUT}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
            *self._args,
        ]
        env = dict(os.environ)
        # the Python backend runs model.py with the first python on PATH: this worker's
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        if self._libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p] + self._libs)
        with open(self.workdir / "tritonserver.log", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *args],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.workdir)
        log.info("started tritonserver (pid %d) for %s on http://%s, grpc://%s%s",
                 self.proc.pid, self.repo, self.http, self.grpc,
                 f" (restart {self.restarts})" if self.restarts else "")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.workdir / "tritonserver.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])[-2000:]

    def _cleanup_shm(self) -> None:
        # a killed server leaves its Python backend's shared memory behind
        if self._shm_prefix:
            for path in glob.glob(f"/dev/shm/{self._shm_prefix}*"):
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _unload_stale(self, r) -> None:
        key = self._keys.triton_used(self.server_id)
        flat = r.execute("HGETALL", key) or []
        now = time.time()
        for model, value in zip(flat[::2], flat[1::2]):
            model = model.decode()
            last, after = parse_used(value)
            if after <= 0 or now - last < after:
                continue
            # the lock load_model holds: no task is loading or touching the model meanwhile
            with redis_lock(r, self._keys.triton_lock(self.server_id, model), 60, None) as held:
                if not held or r.execute("HGET", key, model) != value:
                    continue
                try:
                    repository_call(self.http, model, "unload", timeout=60)
                except TritonError as e:  # forget it rather than retry every few seconds
                    log.warning("could not unload stale model %s: %s", model, e)
                else:
                    log.info("unloaded Triton model %s: unused for %.0f s (stale after %g s)",
                             model, now - last, after)
                r.execute("HDEL", key, model)
