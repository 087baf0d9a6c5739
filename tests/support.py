"""Helpers shared by the engine tests (paths, worker environment, a cluster of real workers)."""

import contextlib
import os
import subprocess
import sys
import time
import uuid

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)


def wait_for(cond, timeout=20.0, what="condition"):
    """Poll ``cond`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_env(url, namespace, extra=None):
    env = dict(os.environ)
    # a worker owns the GPUs of the CUDA_VISIBLE_DEVICES it starts with: the tests say which
    # (--gpus, extra), not the allocation the test run happens to be in
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["MINIRAY_REDIS_URL"] = url
    env["MINIRAY_NAMESPACE"] = namespace
    # the tests' task module is importable by workers, as an installed module would be
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


class Cluster:
    """Worker processes against the session server, in a namespace of their own."""

    def __init__(self, server, monkeypatch, tmp_path):
        self.server, self.url = server, server.url
        self.namespace = f"t{uuid.uuid4().hex[:10]}"
        self.procs = []
        self.tmp = tmp_path
        monkeypatch.setenv("MINIRAY_NAMESPACE", self.namespace)
        monkeypatch.setenv("MINIRAY_REDIS_URL", self.url)
        self.env_extra = {}

    def start_worker(self, *args, name=None, extra_env=None, wait=True, python=None):
        """``python``: another interpreter (a venv of its own, e.g. the Triton tests')."""
        name = name or f"w{len(self.procs)}"
        env = worker_env(self.url, self.namespace, {**self.env_extra, **(extra_env or {})})
        with open(self.tmp / f"{name}.log", "ab") as log:  # the child keeps its own copy
            p = subprocess.Popen([python or sys.executable, "-m", "miniray.worker", "--name",
                                  name, *args],
                                 env=env, stdout=log, stderr=log)
        p.log_path = self.tmp / f"{name}.log"
        self.procs.append(p)
        if wait:
            self.wait_workers(sum(1 for q in self.procs if q.poll() is None))
        return p

    def workers(self):
        from miniray.client import observe
        from miniray.broker import connect
        from miniray.keys import Keys

        r = connect(self.url)
        try:
            return observe.list_workers(r, Keys(self.namespace))
        finally:
            r.close()

    def wait_workers(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.workers()) >= n:
                return
            time.sleep(0.05)
        logs = "\n".join(p.log_path.read_text()[-2000:] for p in self.procs)
        raise AssertionError(f"{n} workers did not register within {timeout}s:\n{logs}")

    def executor(self, **kwargs):
        import miniray

        return miniray.Executor(redis_url=self.url, **kwargs)

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()



@contextlib.contextmanager
def own_server(tmp_path, monkeypatch, ns, workers=1, **config):
    """A server of the test's own (it may kill, stop or restrict it: ``config`` is CONFIG
    SET on it, ``proto_max_bulk_len="1mb"`` say) and ``workers`` workers on it, in namespace
    ``ns``; yields the ``ServerProcess``."""
    from miniray.broker import connect
    from miniray.cluster.server import ServerProcess

    srv = ServerProcess(tcp=True)
    if config:
        r = connect(srv.url)
        for name, value in config.items():
            r.execute("CONFIG", "SET", name.replace("_", "-"), value)
        r.close()
    monkeypatch.setenv("MINIRAY_NAMESPACE", ns)
    logs = [open(tmp_path / f"{ns}-w{i}.log", "ab") for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "miniray.worker", "--name", f"{ns}{i}"],
                              env=worker_env(srv.url, ns), stdout=log, stderr=log)
             for i, log in enumerate(logs)]
    srv.workers = procs
    try:
        yield srv
    finally:
        srv.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def miniray_descendants():
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


class SlowLink:
    """A TCP relay to ``url``'s server that holds what its clients send for ``delay`` seconds
    (replies pass at once): a worker behind it reports late, as over a congested network.
    ``url`` is the relay's own, with the same password."""

    def __init__(self, url, delay):
        import socket
        import threading
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.target, self.delay = (parts.hostname, parts.port), delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self.url = url.replace(f":{parts.port}", f":{port}", 1)
        self._socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            self._socks += [down, up]
            threading.Thread(target=self._pump, args=(down, up, self.delay), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, 0.0), daemon=True).start()

    @staticmethod
    def _pump(src, dst, delay):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if delay:
                    time.sleep(delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self._listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
