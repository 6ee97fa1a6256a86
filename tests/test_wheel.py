"""The package as a user installs it: the wheel, installed into a clean venv, imports as ``leakbench.*`` from the
venv alone (never from this checkout) and its ``leakbench`` command runs."""
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from harness import ROOT

PACKAGES = ("contracts", "splitnn", "defenses", "attacks", "evaluation")

#: Run inside the clean venv: every subpackage must come from the venv, and the registries must be full.
PROBE = """
import sys
import leakbench
from leakbench import attacks, defenses
import leakbench.evaluation.cli
prefix = sys.prefix
for name in ("leakbench", "leakbench.contracts", "leakbench.splitnn", "leakbench.defenses", "leakbench.attacks",
             "leakbench.attacks.peel", "leakbench.evaluation"):
    assert sys.modules[name].__file__.startswith(prefix), (name, sys.modules[name].__file__)
assert not any(name.split(".")[0] in {"splitnn", "defenses", "attacks", "evaluation", "contracts"}
               for name in sys.modules), "a bare top-level name was imported"
print(len(attacks.names()), len(defenses.names()))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from a copy of the sources (a build writes build/ and egg-info beside them)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("leakbench", *PACKAGES):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, cwd=out)
    return next(out.glob("leakbench-*.whl"))


def test_the_wheel_holds_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("leakbench-")}
    assert tops == {"leakbench"}  # nothing generic (an `evaluation` package exists on PyPI) in site-packages
    for package in PACKAGES:
        assert f"leakbench/{package}/__init__.py" in names
    assert "leakbench/attacks/peel/__init__.py" in names
    assert not any("/tests/" in name or name.startswith("tests/") for name in names)


def test_the_wheel_installs_into_a_clean_venv_and_imports_there(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True)
    # The dependencies (torch, ...) come from this environment's site-packages, added as a plain path: its .pth
    # files, the editable install's among them, are not run, so this checkout stays invisible.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    attacks, defenses = map(int, probe.stdout.split())
    assert attacks >= 4 and defenses >= 11
    command = subprocess.run([str(env / "bin" / "leakbench"), "defenses"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert command.returncode == 0, command.stderr
    assert "dp_sgd" in command.stdout
