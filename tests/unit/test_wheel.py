"""The package installed from its wheel, away from this source tree, finds its recipes and cluster
profiles; DeepSpeed is an extra, and a run that needs it says how to install it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from zipfile import ZipFile

import pytest

from slurmvision.cli import main

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (pip builds in the tree it is given)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(source)],
        check=True,
        capture_output=True,
    )
    return next(tmp.glob("slurmvision-*.whl"))


def test_the_wheel_carries_the_recipes_and_cluster_profiles(wheel):
    names = set(ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO / "src").as_posix() for p in (REPO / "src/slurmvision/recipes").rglob("*.yaml")}
    assert {"slurmvision/recipes/digits-demo.yaml", "slurmvision/recipes/clusters/a100.yaml"} <= shipped <= names


def test_config_show_works_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}  # its dependencies from this interpreter's site
    code = "import slurmvision, sys; from slurmvision.cli import main; print(slurmvision.__file__); sys.exit(main())"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "config",
            "show",
            "digits-demo",
            "data.root=/x",
            "--cluster",
            "devslurm",
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    where, shown = result.stdout.split("\n", 1)
    assert Path(where).is_relative_to(target)
    config = json.loads(shown)["config"]
    assert config["model"]["kwargs"]["patch_size"] == 2 and config["cluster"]["partition"] == "low"


def test_deepspeed_missing_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    argv = [
        "digits-demo",
        "data.root=/x",
        "trainer.engine=deepspeed",
        "trainer.zero_stage=2",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert main(["launch", *argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'slurmvision[deepspeed]'" in err
    assert main(["config", "show", *argv]) == 0  # looking at such a config needs no DeepSpeed
