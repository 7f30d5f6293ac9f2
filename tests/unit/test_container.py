"""`cluster.container`: a misspelt setting is refused with the right one named, what the ranks read must be
mounted, and the run directory is mounted where the job looks for it (the scripts: test_sbatch_golden.py)."""

import os

import pytest

from slurmvision.configs import load_config
from slurmvision.errors import ConfigError
from slurmvision.slurm.executor import task_command

pytestmark = pytest.mark.unit
PYXIS = ["cluster.container.runtime=pyxis", "cluster.container.image=/images/pt.sqsh"]


def config(*overrides, cluster="a100", run_dir="/scratch/runs/r"):
    return load_config("digits-demo", ["data.root=/data/digits", *overrides], cluster=cluster, run_dir=run_dir)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["cluster.container.runtime=apptainr", "cluster.container.image=/i.sif"], "did you mean 'apptainer'"),
        (["cluster.container.mount=[/data]"], "did you mean cluster.container.mounts"),
        (["cluster.container.image=/i.sif"], "set both cluster.container.runtime and cluster.container.image"),
        ([*PYXIS, "cluster.container.mounts=[data]"], r"cluster.container.mounts='data' .* absolute paths"),
        ([*PYXIS, "cluster.container.mounts=[/data:/d:rx]"], r"SRC\[:DST\[:ro\|rw\]\]"),
        ([*PYXIS, "cluster.container.mounts=[/x]"], r"data.root=/data/digits is not mounted in the container: add it"),
        (
            [*PYXIS, "cluster.container.mounts=[/data]", "model.finetune_from=w.pth"],
            "model.finetune_from='w.pth' .* absolute",
        ),
    ],
)
def test_a_wrong_container_setting_names_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        config(*overrides)


def test_the_local_executor_runs_no_container():
    with pytest.raises(ConfigError, match="cluster.container.runtime='pyxis' .* cluster.executor=slurm"):
        config(*PYXIS, "cluster.container.mounts=[/data]", cluster="local")


def test_data_mounted_elsewhere_is_read_where_the_container_sees_it():
    assert config(*PYXIS, "cluster.container.mounts=[/lustre/data:/data:ro]").cluster.container.sees("/data/digits")


def test_the_run_directory_is_mounted_at_its_real_path_and_through_its_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    cluster = config(*PYXIS, "cluster.container.mounts=[/data]").cluster
    _, srun = task_command(cluster, [tmp_path / "link" / "run", tmp_path / "link" / "run" / "000-sweep"])
    real = os.path.realpath(tmp_path / "real")
    assert srun == [
        "--container-image=/images/pt.sqsh",
        f"--container-mounts=/data,{real}/run,{real}/run:{tmp_path}/link/run",
    ]


def test_apptainer_runs_the_images_interpreter_with_the_gpus():
    cluster = config(
        "cluster.container.runtime=apptainer",
        "cluster.container.image=/i.sif",
        "cluster.container.mounts=[/data,/scratch]",
    ).cluster
    python, srun = task_command(cluster, ["/scratch/runs/r"])
    assert (python, srun) == ("apptainer exec --nv --bind /data,/scratch /i.sif python3 -P", [])
