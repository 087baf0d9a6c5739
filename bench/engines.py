"""One small adapter per engine, so every workload is written once (see ``measure.py``).

An adapter starts its engine with 2 worker processes, submits, waits, maps with a chunk size
and shuts down; ``W4_SCRIPT`` is the child program W4 times from spawn to its first result.
Engines without a ``chunksize`` (Dask, Ray) map by submitting one ``workloads.map_chunk`` task
per chunk, which is what their users do.
"""

import platform

from workloads import map_chunk

WORKERS = 2

# Prepended to every W4 child script: _mark() prints the moment the first result is in hand
# (wall clock, comparable across processes on one host) so teardown is not counted.
W4_PRELUDE = (
    "import time as _bench_time\n"
    "def _mark(value):\n"
    "    print('BENCH_FIRST_RESULT', repr(_bench_time.time()), value, flush=True)\n"
)


def _chunks(items, chunksize):
    items = list(items)
    return [items[i:i + chunksize] for i in range(0, len(items), chunksize)]


class _FuturesEngine:
    """Engines whose handles are ``concurrent.futures.Future``s."""

    ex = None

    def submit(self, fn, *args):
        return self.ex.submit(fn, *args)

    def result(self, handle):
        return handle.result()

    def results(self, handles):
        return [h.result() for h in handles]

    def map(self, fn, items, chunksize):
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def shutdown(self):
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class PPE(_FuturesEngine):
    label = "ProcessPoolExecutor(max_workers=2)"
    W4_SCRIPT = (
        "from concurrent.futures import ProcessPoolExecutor\n"
        "ex = ProcessPoolExecutor(max_workers=2)\n"
        "_mark(ex.submit(abs, -1).result())\n"
        "ex.shutdown()\n"
    )

    def version(self):
        return "python " + platform.python_version()

    def start(self):
        from concurrent.futures import ProcessPoolExecutor
        self.ex = ProcessPoolExecutor(max_workers=WORKERS)


class Loky(_FuturesEngine):
    label = "loky get_reusable_executor(2)"
    W4_SCRIPT = (
        "from loky import get_reusable_executor\n"
        "ex = get_reusable_executor(max_workers=2)\n"
        "_mark(ex.submit(abs, -1).result())\n"
        "ex.shutdown(wait=True)\n"
    )

    def version(self):
        import loky
        return "loky " + loky.__version__

    def start(self):
        from loky import get_reusable_executor
        self.ex = get_reusable_executor(max_workers=WORKERS)


class Miniray(_FuturesEngine):
    label = "miniray.Executor() on the embedded local cluster"
    W4_SCRIPT = (
        "import miniray\n"
        "ex = miniray.Executor()\n"
        "_mark(ex.submit(abs, -1).result())\n"
    )

    def version(self):
        import miniray
        return "miniray " + str(getattr(miniray, "__version__", "?"))

    def start(self):
        import miniray
        if hasattr(miniray, "init"):
            miniray.init(workers=WORKERS)
        self.ex = miniray.Executor()

    def shutdown(self):
        import miniray
        try:
            super().shutdown()
        finally:
            if hasattr(miniray, "shutdown"):
                miniray.shutdown()


class Dask:
    label = "dask LocalCluster(2 workers x 1 thread, processes)"
    W4_SCRIPT = (
        "from distributed import Client, LocalCluster\n"
        "cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,\n"
        "                       dashboard_address=None)\n"
        "client = Client(cluster)\n"
        "_mark(client.submit(abs, -1, pure=False).result())\n"
        "client.close()\n"
        "cluster.close()\n"
    )

    cluster = client = None

    def version(self):
        import dask
        import distributed
        return "dask %s / distributed %s" % (dask.__version__, distributed.__version__)

    def start(self):
        from distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)

    def submit(self, fn, *args):
        # pure=False: identical calls must run as distinct tasks, as they do elsewhere.
        return self.client.submit(fn, *args, pure=False)

    def result(self, handle):
        return handle.result()

    def results(self, handles):
        return self.client.gather(handles)

    def map(self, fn, items, chunksize):
        # Measured here: gathering chunk results that are lists of Python ints costs distributed
        # ~25 us per element in its event loop whatever the chunking, so Dask's W2 is slow.
        futures = [self.client.submit(map_chunk, fn, c, pure=False)
                   for c in _chunks(items, chunksize)]
        return [x for part in self.client.gather(futures) for x in part]

    def shutdown(self):
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None


class Ray:
    label = "ray.init(num_cpus=2)"
    W4_SCRIPT = (
        "import ray\n"
        "ray.init(num_cpus=2, include_dashboard=False)\n"
        "@ray.remote\n"
        "def f(x):\n"
        "    return abs(x)\n"
        "_mark(ray.get(f.remote(-1)))\n"
        "ray.shutdown()\n"
    )

    def __init__(self):
        self._remote = {}
        self._started = False

    def version(self):
        import ray
        return "ray " + ray.__version__

    def start(self):
        import ray
        ray.init(num_cpus=WORKERS, include_dashboard=False)
        self._started = True

    def _rf(self, fn):
        import ray
        rf = self._remote.get(fn)
        if rf is None:
            rf = self._remote[fn] = ray.remote(fn)
        return rf

    def submit(self, fn, *args):
        return self._rf(fn).remote(*args)

    def result(self, handle):
        import ray
        return ray.get(handle)

    def results(self, handles):
        import ray
        return ray.get(handles)

    def map(self, fn, items, chunksize):
        import ray
        rf = self._rf(map_chunk)
        refs = [rf.remote(fn, c) for c in _chunks(items, chunksize)]
        return [x for part in ray.get(refs) for x in part]

    def shutdown(self):
        import ray
        if self._started:
            ray.shutdown()
            self._started = False


ENGINES = {"ppe": PPE, "miniray": Miniray, "loky": Loky, "dask": Dask, "ray": Ray}
