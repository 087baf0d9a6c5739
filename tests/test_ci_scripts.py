"""CI's scripts: .ci/readme_check runs README's commands from a fresh clone in a fresh venv with
no Redis-compatible server on PATH and fails loudly when one fails; .ci/rerun_skipped names the
tests that skipped for a reason. Each runs for real, on a small repository of its own."""

import importlib.machinery
import importlib.util
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    path = os.path.join(ROOT, ".ci", name)
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _executable(path, text="#!/bin/sh\nexit 0\n"):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def _git(*args, cwd):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                   check=True, capture_output=True, timeout=30)


def test_readme_check_reads_readme_first_bash_block():
    commands = _script("readme_check").readme_commands(os.path.join(ROOT, "README.md"))
    assert len(commands) == 2
    assert commands[1].startswith('pip install -e ".[test]" && python -m pytest')


def test_readme_check_path_finds_no_server_but_the_folder_other_programs(tmp_path):
    check = _script("readme_check")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("redis-server", "valkey-server", "git-like-tool"):
        _executable(str(bin_dir / name))
    (tmp_path / "shadow").mkdir()
    path = check.path_without_servers(f"{bin_dir}{os.pathsep}/usr/bin", str(tmp_path / "shadow"))
    assert shutil.which("redis-server", path=path) is None
    assert shutil.which("valkey-server", path=path) is None
    assert shutil.which("git-like-tool", path=path)
    assert shutil.which("sh", path=path)


@pytest.mark.timeout(90)
def test_readme_check_runs_each_command_in_a_fresh_venv_and_fails_loudly(tmp_path):
    """README's commands run in the clone, in a new venv, with no server on PATH although the
    caller's PATH has one; the second command fails, and so does the check, naming it."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    with open(os.path.join(ROOT, ".ci", "readme_check")) as f:
        (repo / ".ci" / "readme_check").write_text(f.read())
    (repo / "README.md").write_text(
        "# x\n\n```bash\n"
        "test -z \"$(command -v redis-server valkey-server)\" && python -c 'import os, sys; "
        "assert sys.prefix == os.environ[\"VIRTUAL_ENV\"] != sys.base_prefix; "
        "assert os.path.isfile(\"README.md\"); print(\"FIRST OK\")'   # a comment\n"
        "exit 3\n```\n\n```bash\nexit 4\n```\n")
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-qm", "x", cwd=repo)
    (repo / "README.md").write_text("uncommitted: not what is checked\n")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    _executable(str(fake / "redis-server"))
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, str(repo / ".ci" / "readme_check")], env=env,
                          capture_output=True, text=True, timeout=80)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "FIRST OK" in out
    assert "README CHECK FAILED: README's command 2 exited with status 3" in out
    assert "uncommitted changes are not checked" in out


_ENV = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # this run's, not theirs
_SKIPPING = {
    "tests/test_mod.py": "import pytest\npytest.importorskip('no_such_torch', reason='torch is "
                         "not installed')\ndef test_a(): pass\n",
    "tests/sub/test_deep.py": "import pytest\n"
                              "@pytest.mark.parametrize('p', ['a b', 'x::y'])\n"
                              "def test_p(p): pytest.skip('needs torch')\n"
                              "class TestK:\n"
                              "    def test_k(self): pytest.skip('needs torch')\n"
                              "    def test_gpu(self): pytest.skip('no GPU here')\n"
                              "def test_runs(): pass\n",
}


def test_rerun_skipped_names_the_tests_that_skipped_for_the_reason(tmp_path, monkeypatch):
    for rel, text in _SKIPPING.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                    os.devnull, "--rootdir", str(tmp_path), f"--junitxml={junit}", "tests"],
                   cwd=tmp_path, env=_ENV, capture_output=True, timeout=60)
    monkeypatch.chdir(tmp_path)
    ids = _script("rerun_skipped").skipped(str(junit), "torch")
    assert sorted(ids) == ["tests/sub/test_deep.py", "tests/sub/test_deep.py::TestK::test_k",
                           "tests/sub/test_deep.py::test_p[a b]", "tests/test_mod.py"], ids
    assert _script("rerun_skipped").skipped(str(junit), "gpu") == [
        "tests/sub/test_deep.py::TestK::test_gpu"]
    # pytest takes them as they are
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), *ids,
                           "tests/sub/test_deep.py::TestK::test_gpu"],
                          cwd=tmp_path, env=_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
