"""Triton Inference Server on workers: a real tritonserver (from the nvidia-pytriton wheel) on
the CPU with a Python-backend model, real workers, real Redis.

pytriton pins numpy<2, so the Triton workers run in a virtual environment of their own
(``.venv-triton`` at the repository root, built once and reused); tasks are submitted from the
test process's own environment.
"""

import fcntl
import glob
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from support import ROOT, Cluster, wait_for
from triton_tasks import (
    add_one,
    load_model,
    model_ready,
    triton_client,
    unload_model,
    write_model_repository,
)

import miniray

# the first test builds the venv (pip downloads ~400 MB once); later runs reuse it
pytestmark = pytest.mark.timeout(900)

VENV = Path(ROOT) / ".venv-triton"
PYTHON = VENV / "bin" / "python"
_CHECK = ("import numpy, pytriton, tritonclient.http, tritonclient.grpc, cloudpickle, hiredis, "
          "psutil; from miniray.triton.binary import find_binary; print(find_binary())")


def _venv_works() -> bool:
    if not PYTHON.exists():
        return False
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([str(PYTHON), "-c", _CHECK], env=env, cwd="/", capture_output=True,
                          check=False)
    return done.returncode == 0


@pytest.fixture(scope="session")
def triton_python():
    """The Triton venv's python: nvidia-pytriton, tritonclient and this checkout of miniray."""
    with open(Path(ROOT) / ".venv-triton.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest run may be building it right now
        if not _venv_works():
            import shutil

            shutil.rmtree(VENV, ignore_errors=True)
            steps = [[sys.executable, "-m", "venv", str(VENV)],
                     [str(PYTHON), "-m", "pip", "install", "nvidia-pytriton",
                      "tritonclient[http,grpc]", "-e", ROOT]]
            for cmd in steps:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=840,
                                      check=False)
                if done.returncode != 0:
                    pytest.fail(f"building the Triton test venv failed: {' '.join(cmd)} exited "
                                f"with {done.returncode}:\n{done.stdout[-6000:]}\n"
                                f"{done.stderr[-6000:]}", pytrace=False)
            if not _venv_works():
                pytest.fail(f"the Triton test venv at {VENV} was built but cannot import "
                            f"pytriton/tritonclient/miniray: {_CHECK}", pytrace=False)
    return str(PYTHON)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_model_repository(tmp_path_factory.mktemp("models"))


def triton_state(cluster, name):
    for w in cluster.workers():
        if w.get("name") == name:
            return w.get("triton")
    return None


def wait_triton(cluster, name, cond, what, timeout=120):
    """Wait until ``cond(state)`` holds for worker ``name``'s heartbeat; fail with its log."""
    try:
        wait_for(lambda: cond(triton_state(cluster, name) or {}), timeout, what)
    except AssertionError:
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log_path.read_text()[-4000:]}"
                         for p in cluster.procs)
        raise AssertionError(f"timed out waiting for {what}; state "
                             f"{triton_state(cluster, name)}\n{logs}") from None
    return triton_state(cluster, name)


def start_triton_worker(cluster, python, models, name):
    cluster.start_worker("--triton", "--triton-models", str(models), name=name, python=python)
    return wait_triton(cluster, name, lambda s: s.get("ready"), f"{name}'s Triton server ready")


def loopback(ip):
    import ipaddress

    ip = ipaddress.ip_address(ip)
    return getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback or ip.is_loopback


def gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def tcluster(server, triton_python, models, tmp_path_factory):
    """One Triton worker ("tw") for the module: its tritonserver starts once."""
    with pytest.MonkeyPatch.context() as mp:
        c = Cluster(server, mp, tmp_path_factory.mktemp("tcluster"))
        try:
            start_triton_worker(c, triton_python, models, "tw")
            yield c
            pid = triton_state(c, "tw")["pid"]
        finally:
            c.stop()
        wait_for(lambda: gone(pid), 30, "the worker's tritonserver to stop with it")


def test_tasks_infer_through_the_node_server(tcluster, capsys):
    from miniray.cli import main as cli

    state = triton_state(tcluster, "tw")
    assert state["managed"] and state["models"] == ["add_one"]
    assert state["url"].startswith("http://127.0.0.1:")
    assert state["grpc_url"].startswith("grpc://127.0.0.1:")
    # security: nothing of the server listens beyond loopback
    listening = [c.laddr for c in psutil.Process(state["pid"]).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) == 3 and all(loopback(a.ip) for a in listening), listening
    with tcluster.executor(limits=miniray.Limits(triton=True)) as ex:
        out = list(ex.map(add_one, [[1.0, 2.0], [41.0], [-1.0, 0.5, 9.0]]))
        assert [values for values, _ in out] == [[2.0, 3.0], [42.0], [0.0, 1.5, 10.0]]
        assert {server for _, server in out} == {state["server"]}
        assert ex.submit(add_one, [7.0], "grpc").result(timeout=60)[0] == [8.0]
        assert ex.submit(triton_client).result(timeout=60) == "InferenceServerClient"
    assert cli(["status"]) == 0
    assert f"triton ready {state['url']}  models=add_one  restarts=0" in capsys.readouterr().out


def test_load_and_unload_models(tcluster):
    from miniray.broker import connect
    from miniray.keys import Keys

    server = triton_state(tcluster, "tw")["server"]
    with tcluster.executor(limits=miniray.Limits(triton=True)) as ex:
        assert ex.submit(unload_model, "add_one").result(timeout=60) is False
        wait_triton(tcluster, "tw", lambda s: s.get("models") == [], "add_one unloaded")
        # tritonclient's own error cannot be pickled: it comes back as TritonError, with its text
        with pytest.raises(miniray.TritonError, match="InferenceServerException") as err:
            ex.submit(add_one, [1.0]).result(timeout=60)
        assert "add_one" in str(err.value)
        assert ex.submit(load_model, "add_one").result(timeout=120) is True
        assert ex.submit(add_one, [1.0]).result(timeout=60)[0] == [2.0]
        # a model nobody used for its stale_after_seconds is unloaded by the worker
        assert ex.submit(load_model, "add_one", 1).result(timeout=60) is True
        wait_triton(tcluster, "tw", lambda s: s.get("models") == [], "stale add_one unloaded")
        r = connect(tcluster.url)
        try:  # its last-use record goes right after
            wait_for(lambda: r.execute("HGET", Keys(tcluster.namespace).triton_used(server),
                                       "add_one") is None, 30, "the record of add_one removed")
        finally:
            r.close()
        assert ex.submit(model_ready, "add_one").result(timeout=60) is False
        with pytest.raises(miniray.TritonError, match="could not load model 'nope'"):
            ex.submit(load_model, "nope").result(timeout=60)
        assert ex.submit(load_model, "add_one").result(timeout=120) is True  # stays loaded
        wait_triton(tcluster, "tw", lambda s: s.get("models") == ["add_one"], "add_one back")


def test_attach_to_a_running_server(tcluster, triton_python):
    state = triton_state(tcluster, "tw")
    tcluster.start_worker("--triton-url", state["url"], "--triton-grpc-url", state["grpc_url"],
                          name="attached", python=triton_python)
    attached = wait_triton(tcluster, "attached", lambda s: s.get("ready"), "attached ready")
    assert not attached["managed"] and attached["pid"] is None
    assert attached["server"] == state["server"]  # same server, same lock and records
    with tcluster.executor(limits=miniray.Limits(triton=True, nodes=("attached",))) as ex:
        assert ex.submit(add_one, [1.5], "grpc").result(timeout=60) == ([2.5], state["server"])
    tcluster.procs[-1].terminate()
    tcluster.procs[-1].wait(30)
    assert not gone(state["pid"])  # the attached worker leaves the server it did not start


def test_lazy_server_loads_models_on_demand(tcluster, triton_python, models):
    tcluster.start_worker("--triton-models", str(models), "--triton-lazy", "--slots", "2",
                          name="lazy", python=triton_python)
    state = wait_triton(tcluster, "lazy", lambda s: s.get("ready"), "lazy's server ready")
    assert state["models"] == []
    with tcluster.executor(limits=miniray.Limits(triton=True, nodes=("lazy",))) as ex:
        assert ex.submit(model_ready, "add_one").result(timeout=60) is False
        # two task processes ask at once: one loads it under the node's lock, the others wait
        # for the lock and find it loaded
        assert list(ex.map(load_model, ["add_one"] * 3, timeout=120, chunksize=1)) == [True] * 3
        assert ex.submit(add_one, [0.0]).result(timeout=60) == ([1.0], state["server"])
    wait_triton(tcluster, "lazy", lambda s: s.get("models") == ["add_one"], "lazy has add_one")
    tcluster.procs[-1].terminate()
    tcluster.procs[-1].wait(30)
    wait_for(lambda: gone(state["pid"]), 30, "lazy's tritonserver to stop with its worker")


def test_outside_a_task_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MINIRAY_TRITON_HTTP", raising=False)
    for call in (miniray.triton.client, lambda: miniray.triton.load_model("m"),
                 lambda: miniray.triton.unload_model("m")):
        with pytest.raises(miniray.TritonError, match=r"--triton.*Limits\(triton=True\)"):
            call()


def test_bad_triton_options_are_clear_errors(tmp_path, monkeypatch):
    from miniray.triton.server import TritonServer

    with pytest.raises(miniray.ConfigurationError, match="--triton-models DIR .* --triton-url"):
        TritonServer()
    with pytest.raises(miniray.ConfigurationError, match="not both"):
        TritonServer(models=str(tmp_path), url="http://127.0.0.1:8000")
    with pytest.raises(miniray.ConfigurationError, match="no such directory.*config.pbtxt"):
        TritonServer(models=str(tmp_path / "nope"))
    with pytest.raises(miniray.ConfigurationError, match="not a Triton address"):
        TritonServer(url="ftp://host")
    monkeypatch.setenv("MINIRAY_TRITON_BIN", str(tmp_path))
    with pytest.raises(miniray.ConfigurationError, match="MINIRAY_TRITON_BIN=.*not an executable"):
        TritonServer(models=str(tmp_path))


def test_triton_tasks_wait_for_a_triton_worker(cluster, triton_python, models):
    from miniray.client import observe
    from miniray.broker import connect
    from miniray.keys import Keys

    cluster.start_worker(name="plain")
    with cluster.executor(limits=miniray.Limits(triton=True), priority=10) as tex, \
            cluster.executor(priority=1) as ex:
        f = tex.submit(add_one, [1.0])
        r = connect(cluster.url)
        try:
            wait_for(lambda: any(j["job"] == f.job and j["queued"] == 1
                                 for j in observe.list_jobs(r, Keys(cluster.namespace))),
                     30, "the Triton job queued")
        finally:
            r.close()
        # the plain worker looks at the higher-priority Triton job first, passes it over and
        # runs this one; in a task there, miniray.triton says why it cannot help
        with pytest.raises(miniray.TritonError, match=r"Limits\(triton=True\)"):
            ex.submit(triton_client).result(timeout=60)
        assert not f.done()
        state = start_triton_worker(cluster, triton_python, models, "tw2")
        assert f.result(timeout=120) == ([2.0], state["server"])
        # a killed worker's server stops too (parent-death signal); on SIGTERM the worker
        # stops it itself (see the tcluster fixture)
        cluster.procs[-1].kill()
        cluster.procs[-1].wait(30)
        wait_for(lambda: gone(state["pid"]), 30, "tw2's tritonserver to stop")
        # what it left in /tmp goes when the next --triton worker on this host starts
        from miniray.triton.server import _remove_orphan_workdirs

        left = glob.glob(os.path.join(tempfile.gettempdir(),
                                      f"miniray-triton-{cluster.procs[-1].pid}-*"))
        assert left
        _remove_orphan_workdirs()
        assert not any(os.path.exists(p) for p in left)


def test_worker_restarts_a_dead_server(tcluster):
    before = triton_state(tcluster, "tw")
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_triton(tcluster, "tw", lambda s: s.get("ready") and s["restarts"] >= 1
                        and s["pid"] != before["pid"] and s["models"] == ["add_one"],
                        "tritonserver restarted with add_one loaded again")
    assert after["url"] == before["url"]  # same ports: the tasks' environment stays right
    with tcluster.executor(limits=miniray.Limits(triton=True)) as ex:
        assert ex.submit(add_one, [3.0]).result(timeout=60)[0] == [4.0]
