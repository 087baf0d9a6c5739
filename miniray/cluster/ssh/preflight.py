"""Pre-flight checks of an SSH host's Python against the notebook's, and ``install=True``.

The checks run a small script with the host's Python (no miniray needed there) and compare
Python (major.minor: cloudpickle cannot move code between them), cloudpickle and miniray.

``install=True`` builds a wheel of the notebook's miniray here (once per process), copies it
with SFTP, and installs it into a venv on the host, ``<install_dir>/venv-<version>-py<X.Y>-<id>``.
That venv is layered on the chosen Python's environment (a ``.pth`` adds its site dirs after
the venv's own), so torch and friends stay importable while this miniray comes first; missing
dependencies come from the host's package index. The build is guarded by a file lock, so hosts
sharing a home directory (NFS) install once.
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

import miniray
from miniray import __version__
from miniray.errors import SSHPreflightError

from . import connect as ssh

__all__ = ["local_versions", "probe", "mismatches", "preflight_error", "build_wheel", "install"]

_MARK = "MINIRAY_PREFLIGHT "
_PROBE = r"""
import json, os, platform, sys
out = {"python": "%d.%d.%d" % tuple(sys.version_info[:3]), "executable": sys.executable,
       "cpus": os.cpu_count(), "node": platform.node()}
for mod in ("cloudpickle", "miniray"):
    try:
        out[mod] = getattr(__import__(mod), "__version__", "unknown")
    except Exception as e:
        out[mod] = None
print("MINIRAY_PREFLIGHT " + json.dumps(out))
"""

# Runs on the host with the chosen Python: argv = venv dir, wheel, requirements...
_INSTALL = r"""
import fcntl, os, site, subprocess, sys, venv
target, wheel, reqs = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(os.path.dirname(target), exist_ok=True)
with open(target + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    py = os.path.join(target, "bin", "python")
    if os.path.exists(os.path.join(target, ".miniray-complete")):
        print("MINIRAY_INSTALL reused")
        sys.exit(0)
    venv.EnvBuilder(clear=True, with_pip=False, symlinks=True).create(target)
    sp = subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    with open(os.path.join(sp, "_miniray_layer.pth"), "w") as f:
        f.write("import site; " + "; ".join("site.addsitedir(%r)" % d for d in dirs) + "\n")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
    if subprocess.call(pip + ["--version"], stdout=subprocess.DEVNULL) != 0:
        if subprocess.call([py, "-m", "ensurepip", "-q"]) != 0:
            print("MINIRAY_INSTALL no pip for %s: install python3-pip (or python3-venv) there, "
                  "or give python= an interpreter that has pip" % sys.executable)
            sys.exit(3)
    subprocess.check_call(pip + ["install", "--no-deps", "--ignore-installed",
                                 "--no-warn-script-location", wheel])
    subprocess.check_call(pip + ["install", "--no-warn-script-location"] + reqs)
    open(os.path.join(target, ".miniray-complete"), "w").close()
    print("MINIRAY_INSTALL installed")
"""


def _major_minor(version):
    return ".".join(str(version).split(".")[:2])


def local_versions() -> dict:
    import platform

    import cloudpickle

    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__,
            "miniray": __version__}


def probe(client, python, host, timeout=60.0) -> dict:
    """Run the pre-flight script with ``python`` on the host; its versions as a dict."""
    status, out = ssh.run(client, f"{shlex.quote(python)} -c {shlex.quote(_PROBE)}",
                          timeout=timeout)
    for line in out.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    hint = (" (not found: give the path of a Python 3 there with python=/--python)"
            if status == 127 else "")
    raise SSHPreflightError(f"{host}: cannot run {python}{hint}; exit status {status}: "
                            f"{out.strip()[-300:] or '(no output)'}", host)


def mismatches(remote: dict, local: dict) -> list:
    """``[(what, theirs, ours), ...]`` where the host differs from the notebook."""
    out = []
    if _major_minor(remote.get("python")) != _major_minor(local["python"]):
        out.append(("Python", remote.get("python"), local["python"]))
    for mod in ("cloudpickle", "miniray"):
        if remote.get(mod) != local[mod]:
            out.append((mod, remote.get(mod), local[mod]))
    return out


def preflight_error(found: dict, local: dict, install: bool) -> SSHPreflightError:
    """One error naming every mismatch on every host, and how to fix it."""
    lines = []
    python_differs = False
    for host, (python, problems) in found.items():
        parts = []
        for what, theirs, ours in problems:
            python_differs |= what == "Python"
            have = "not installed" if theirs is None else theirs
            parts.append(f"{what} {have} (notebook: {ours})")
        lines.append(f"  {host} ({python}): " + "; ".join(parts))
    fixes = []
    if python_differs:
        fixes.append(f"run Python {_major_minor(local['python'])} on every host (give its path "
                     "with python=... / --python PATH): cloudpickle cannot carry code between "
                     "Python versions")
    if not install:
        fixes.append(f"pass install=True (%miniray up ... --install) to install miniray "
                     f"{local['miniray']} and cloudpickle {local['cloudpickle']} into a venv on "
                     "each host")
    fixes.append(f"or `pip install miniray=={local['miniray']} cloudpickle=="
                 f"{local['cloudpickle']}` into the host's Python yourself")
    err = SSHPreflightError(f"pre-flight failed on {len(found)} host(s):\n" + "\n".join(lines)
                            + "\nFix: " + "; ".join(fixes), next(iter(found)))
    err.mismatches = {h: p for h, (_, p) in found.items()}
    return err


_PACKAGE = os.path.dirname(os.path.abspath(miniray.__file__))  # .../miniray


def _source_dir():
    root = os.path.dirname(_PACKAGE)
    pyproject = os.path.join(root, "pyproject.toml")
    if not os.path.exists(pyproject):
        return None
    with open(pyproject) as f:
        return root if re.search(r'(?m)^name\s*=\s*"miniray"', f.read()) else None


_wheel_lock = threading.Lock()
_SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                               "__pycache__", ".pytest_cache", "node_modules", "*.pyc")


def build_wheel() -> str:
    """A wheel of the miniray this process runs, built from its source tree (once per process).

    Its files and packages are copied first, so the build leaves nothing (build/, egg-info)
    in the checkout.
    """
    with _wheel_lock:
        return _build_wheel()


@functools.lru_cache(maxsize=1)
def _build_wheel() -> str:
    src = _source_dir()
    if src is None:
        raise SSHPreflightError(
            "install=True needs miniray's source tree to build a wheel, and this miniray was "
            f"installed from a wheel ({_PACKAGE}); install miniray=="
            f"{__version__} on the hosts with pip instead")
    out = tempfile.mkdtemp(prefix="miniray-wheel-")
    atexit.register(shutil.rmtree, out, True)
    tree = os.path.join(out, "src")
    os.makedirs(tree)
    for entry in os.scandir(src):  # top-level files and packages: no venvs, data or tests
        if entry.is_file():
            shutil.copy2(entry.path, tree)
        elif entry.is_dir() and entry.name != "tests" and \
                os.path.exists(os.path.join(entry.path, "__init__.py")):
            shutil.copytree(entry.path, os.path.join(tree, entry.name), ignore=_SKIP)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, tree]
    if _setuptools_builds_wheels():
        cmd.insert(5, "--no-build-isolation")  # build offline with the setuptools we have
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(tree, ignore_errors=True)
    wheels = glob.glob(os.path.join(out, "miniray-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SSHPreflightError(f"building a miniray wheel from {src} failed: "
                                f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return wheels[0]


def _requirements(local) -> list:
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("miniray") or []
    except PackageNotFoundError:
        reqs = []
    out = [f"cloudpickle=={local['cloudpickle']}"]
    for r in reqs:
        name = re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower()
        if "extra ==" not in r and name != "cloudpickle":
            out.append(r)
    return out


def install(client, python, host, install_dir, local, timeout=900.0) -> str:
    """Install this miniray into a venv on the host; return that venv's python."""
    wheel = build_wheel()
    with open(wheel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    ident = hashlib.sha256(f"{python}\0{digest}".encode()).hexdigest()[:10]
    base = install_dir.rstrip("/")
    target = f"{base}/venv-{local['miniray']}-py{_major_minor(local['python'])}-{ident}"
    status, out = ssh.run(client, f"mkdir -p {_shell_path(base)}/wheels && cd {_shell_path(base)}"
                          " && pwd", timeout=30)
    if status != 0:
        raise SSHPreflightError(f"{host}: cannot create {install_dir}: {out.strip()}", host)
    abs_base = out.strip().splitlines()[-1]
    abs_target = abs_base + target[len(base):]
    remote_wheel = f"{abs_base}/wheels/{os.path.basename(wheel)}"
    ssh.put_file(client, wheel, remote_wheel)
    args = " ".join(shlex.quote(a) for a in [abs_target, remote_wheel, *_requirements(local)])
    status, out = ssh.run(client, f"{shlex.quote(python)} -c {shlex.quote(_INSTALL)} {args}",
                          timeout=timeout)
    if status != 0:
        raise SSHPreflightError(f"{host}: installing miniray into {abs_target} with {python} "
                                f"failed (exit {status}):\n{out.strip()[-800:]}", host)
    return f"{abs_target}/bin/python"


def _shell_path(path):
    """Quote a path for the shell but let a leading ``~/`` expand to the login directory."""
    if path == "~" or path.startswith("~/"):
        return "~/" + shlex.quote(path[2:] or ".")
    return shlex.quote(path)


def _setuptools_builds_wheels() -> bool:
    """Whether this environment's setuptools can build a wheel by itself: 70.1 and newer
    have bdist_wheel built in, older ones need the ``wheel`` package (a new venv's setuptools
    65 has neither: pip then builds in an isolated environment of its own)."""
    try:
        import setuptools
    except ImportError:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        return tuple(int(x) for x in setuptools.__version__.split(".")[:2]) >= (70, 1)
    except ValueError:
        return False
