"""``.ci/python``, which picks the Python that ``make demo`` / ``make test`` build ``.venv`` with: the newest supported
one (3.11 to 3.13) that runs and can make a venv, on the PATH or among pyenv's versions."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "python"
TOOLS = ("sh", "cat", "cut", "grep", "head", "sort")


@pytest.fixture
def machine(tmp_path):
    """A PATH of its own (the few tools the script uses, and the interpreters a test puts there); run the script."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    class Machine:
        bin = bin_dir

        def interpreter(self, name, minor=None, directory=None):
            """A stand-in that answers the script's probe as a Python 3.<minor> would; one that fails if no minor."""
            path = (directory or bin_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            body = f'cat >/dev/null; echo "{minor} $0"' if minor is not None else "exit 127"
            path.write_text(f"#!/bin/sh\n{body}\n")
            path.chmod(0o755)
            return str(path)

        def run(self, *args):
            env = {"PATH": f"{bin_dir}{os.pathsep}{tools}"}
            return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)

    return Machine()


def test_the_newest_that_runs_wins(machine):
    machine.interpreter("python3.13")  # a pyenv shim for a version that is not selected: exits non-zero
    newest = machine.interpreter("python3.12", minor=12)
    machine.interpreter("python3.11", minor=11)
    machine.interpreter("python3", minor=11)
    found = machine.run()
    assert (found.returncode, found.stdout.strip()) == (0, newest)


def test_one_minor_version_can_be_asked_for(machine):
    machine.interpreter("python3.12", minor=12)
    oldest = machine.interpreter("python3.11", minor=11)
    assert machine.run("3.11").stdout.strip() == oldest


def test_pyenvs_versions_count_too(machine, tmp_path):
    root = tmp_path / "pyenv-root"
    machine.interpreter("python3", minor=11)
    newest = machine.interpreter("python3", minor=13, directory=root / "versions" / "3.13.0" / "bin")
    pyenv = machine.bin / "pyenv"
    pyenv.write_text(f'#!/bin/sh\n[ "$1" = root ] && echo "{root}"\n')
    pyenv.chmod(0o755)
    assert machine.run().stdout.strip() == newest


def test_none_usable_says_what_to_do(machine):
    machine.interpreter("python3.13")
    found = machine.run()
    assert found.returncode == 1 and found.stdout == ""
    assert "no usable Python 3.11-3.13" in found.stderr and "PYTHON=" in found.stderr


def test_a_real_interpreter_answers_the_probe(machine):
    """This very Python (a supported one) is found and named by the path it was found at."""
    (machine.bin / "python3").symlink_to(sys.executable)
    found = machine.run()
    assert (found.returncode, found.stdout.strip(), found.stderr) == (0, str(machine.bin / "python3"), "")
