"""`slurmvision sweep`: one run directory per combination, all validated before anything is submitted,
on Slurm one job array; `status SWEEP_DIR` ranks the runs by top-1. Executors are faked."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from slurmvision.cli import main
from slurmvision.configs import load_config, load_saved_config
from slurmvision.launch import sweep
from slurmvision.slurm import cluster as cluster_module
from slurmvision.slurm import executor as executor_module
from slurmvision.slurm.ledger import Ledger
from tests.unit.test_relaunch import submitted  # noqa: F401 (a fixture: the jobs of a faked executor)

pytestmark = pytest.mark.unit


def test_every_combination_of_the_swept_keys_and_lists_stay_whole():
    assert sweep.split_values("[32,48],{a: 1, b: 2},'x,y',3") == ["[32,48]", "{a: 1, b: 2}", "'x,y'", "3"]
    choices = sweep.combinations(["optim.lr=1e-3,5e-4", "data.scales=[32,48]", "model.drop_path=0.1,0.2"])
    assert choices[1] == {"optim.lr": "1e-3", "model.drop_path": "0.2"} and len(choices) == 4
    assert sweep.run_name(1, choices[1]) == "001-lr=1e-3_drop_path=0.2"
    with pytest.raises(Exception, match="one job array"):
        sweep.combinations(["cluster.nodes=1,2"])


def test_a_sweep_makes_one_run_each_and_status_ranks_them_by_top1(tmp_path, submitted, capsys):
    sweep_dir = tmp_path / "sweep"
    assert main(["sweep", "digits-demo", "data.root=/x", "optim.lr=1e-3,5e-4", "--sweep-dir", str(sweep_dir)]) == 0
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["000-lr=1e-3", "001-lr=5e-4"] and submitted == ["local-0", "local-1"]
    assert [load_saved_config(p).optim.lr for p in runs] == [1e-3, 5e-4]
    (runs[1] / "eval").mkdir()
    (runs[1] / "eval" / "step-00000600.json").write_text(
        json.dumps({"step": 600, "top1": 0.9, "top5": 1.0, "f1_macro": 0.9})
    )
    capsys.readouterr()
    assert main(["status", str(sweep_dir)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].startswith("001-lr=5e-4") and rows[1].endswith("0.9000") and rows[2].endswith("-")
    assert main(["sweep", "digits-demo", "data.root=/x", "optim.lr=1e-3,5e-4", "--sweep-dir", str(sweep_dir)]) == 2


def test_an_invalid_combination_submits_nothing(tmp_path, submitted, capsys):
    assert main(["sweep", "digits-demo", "data.root=/x", "optim.lr=1e-3,-1", "--sweep-dir", str(tmp_path / "s")]) == 2
    assert "optim.lr=-1.0 is not allowed" in capsys.readouterr().err and submitted == []


def test_on_slurm_the_runs_are_one_job_array_each_attempt_checking_every_run_dir(tmp_path, monkeypatch, capsys):
    made = {}

    class Executor:
        def __init__(self, cluster, folder, name, comment, also_check=()):
            made.update(folder=folder, also_check=also_check, submitted=[])

        @contextlib.contextmanager
        def batch(self):
            yield

        def submit(self, job):
            made["submitted"].append(job)
            return SimpleNamespace(job_id=f"7_{len(made['submitted']) - 1}")

    monkeypatch.setattr(executor_module, "make_executor", Executor)
    monkeypatch.setattr(cluster_module, "validate_cluster", lambda cluster: None)
    sweep_dir = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "digits-demo",
                "data.root=/x",
                "model.drop_path=0.1,0.2",
                "--cluster",
                "devslurm",
                "--coordinate",
                "none",
                "--sweep-dir",
                str(sweep_dir),
            ]
        )
        == 0
    )
    runs = [sweep_dir.resolve() / "000-drop_path=0.1", sweep_dir.resolve() / "001-drop_path=0.2"]
    assert made["folder"] == sweep_dir.resolve() / "slurm" and list(made["also_check"]) == runs
    assert [Ledger(run).jobs()[0]["job_id"] for run in runs] == ["7_0", "7_1"]
    config = load_config("digits-demo", ["data.root=/x"], cluster="devslurm")
    setup = executor_module.slurm_parameters(config.cluster, Path("/s"), "n", "c", also_check=tuple(runs))["setup"]
    assert [line.split(" -m slurmvision.slurm.rundir ")[1] for line in setup] == [
        f"{p} || exit 3" for p in [Path("/s"), *runs]
    ]
