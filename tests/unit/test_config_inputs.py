"""What a user types reaches the config as meant: YAML 1.2 values, text as written, the same type from a
recipe, a profile or the command line; `${...}` and broken YAML give one-line errors; a profile and a
recipe's `cluster:` merge in the README's order in every command."""

import re
import subprocess

import pytest

from slurmvision.cli import main
from slurmvision.configs import config_hash, load_config, load_saved_config, save_config
from slurmvision.errors import ConfigError
from slurmvision.slurm.executor import sbatch_script

pytestmark = pytest.mark.unit

# YAML 1.1 read these as True, 5349 (octal), False and 5400 (base 60).
TEXTS = {"partition": "on", "account": "012345", "qos": "no", "constraint": "1:30:00"}


def recipe(tmp_path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  root: /x\n" + text)
    return str(path)


def test_text_fields_keep_the_text_as_written_from_a_recipe_a_profile_and_the_command_line(tmp_path):
    lines = "".join(f"  {key}: {value}\n" for key, value in TEXTS.items())
    from_recipe = load_config(recipe(tmp_path, "cluster:\n" + lines)).cluster
    (tmp_path / "site.yaml").write_text(lines.replace("  ", ""))
    from_profile = load_config(recipe(tmp_path, ""), cluster=str(tmp_path / "site.yaml")).cluster
    from_overrides = load_config(recipe(tmp_path, ""), [f"cluster.{k}={v}" for k, v in TEXTS.items()]).cluster
    for cluster in (from_recipe, from_profile, from_overrides):
        assert {key: getattr(cluster, key) for key in TEXTS} == TEXTS


def test_untyped_values_are_read_by_yaml_1_2_alike_in_a_recipe_and_on_the_command_line(tmp_path):
    kwargs = {"a": "on", "b": "012", "c": "1e3", "d": "'1e3'", "e": "true", "f": "0x10", "g": "1:30"}
    lines = "".join(f"    {key}: {value}\n" for key, value in kwargs.items())
    written = load_config(recipe(tmp_path, "model:\n  kwargs:\n" + lines))
    typed = load_config(recipe(tmp_path, ""), [f"model.kwargs.{k}={v}" for k, v in kwargs.items()])
    expected = {"a": "on", "b": 12, "c": 1000.0, "d": "1e3", "e": True, "f": 16, "g": "1:30"}
    assert written.model.kwargs == typed.model.kwargs == expected
    assert load_config(recipe(tmp_path, ""), ["optim.lr=1e-3", "data.scales=[64, 0x60]"]).data.scales == [64, 96]


def test_a_time_in_hours_is_refused_not_read_as_seconds(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.time_min in .*mine.yaml.*'1:30:00'"):
        load_config(recipe(tmp_path, "cluster:\n  time_min: 1:30:00\n"))
    with pytest.raises(ConfigError, match=r"cluster.time_min in the command line.*'1:30:00'"):
        load_config(recipe(tmp_path, ""), ["cluster.time_min=1:30:00"])


def test_text_that_yaml_would_read_otherwise_survives_save_and_load(tmp_path):
    config = load_config(
        recipe(tmp_path, ""),
        [
            *(f"cluster.{k}={v}" for k, v in TEXTS.items()),
            "model.kwargs={x: '1e3', y: '\\${z}', w: 'a\\b', v: 'c\\\\\\${d}'}",
        ],
        run_dir=tmp_path / "run",
    )
    assert config.model.kwargs == {"x": "1e3", "y": "${z}", "w": "a\\b", "v": "c\\${d}"}
    save_config(config, tmp_path / "run")
    again = load_saved_config(tmp_path / "run")
    assert again == config and config_hash(again) == config_hash(config)
    assert load_config(str(tmp_path / "run" / "config.yaml")) == config  # a saved config is a recipe too


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.root=${HOME}/x", r"data.root.*Interpolation key 'HOME' not found.*\$HOME outside single quotes"),
        ("data.root=${oops", r"data.root.*\$\{oops"),
        ("model.name=[a,", r"override 'model.name=\[a,' is not valid YAML"),
        ('cluster.setup=["echo \\${HOME}"]', r"override 'cluster.setup=.* is not valid YAML"),
        ("data.scales[0]=64", r"give the list whole, e.g. data.scales=\[...\]"),
    ],
)
def test_interpolation_and_broken_yaml_on_the_command_line_give_one_line(override, expected, capsys):
    assert main(["config", "show", "digits-demo", "data.root=/x", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(expected, err), err


def test_a_setup_line_with_an_escaped_interpolation_is_the_shells(tmp_path, capsys):
    path = recipe(tmp_path, 'cluster:\n  setup:\n    - export DATA=\\${HOME}/data\n    - echo "$DATA"\n')
    config = load_config(path, cluster="devslurm", run_dir=tmp_path / "run")
    assert config.cluster.setup == ["export DATA=${HOME}/data", 'echo "$DATA"']
    save_config(config, tmp_path / "run")
    assert load_saved_config(tmp_path / "run") == config
    script = sbatch_script(config.cluster, tmp_path / "run" / "slurm", "sv-run", "run")
    assert "\nexport DATA=${HOME}/data\n" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
    assert main(["launch", path, "--cluster", "devslurm", "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "\nexport DATA=${HOME}/data\n" in capsys.readouterr().out


def resolved(argv, capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out.split("# resolved config\n")[-1]


@pytest.mark.parametrize("profile", [[], ["--cluster", "a100"]])
def test_config_show_and_launch_merge_a_profile_and_a_recipes_cluster_keys_alike(profile, tmp_path, capsys):
    path = recipe(tmp_path, "cluster:\n  time_min: 45\n  partition: mine\n")
    run = ["--run-dir", str(tmp_path / "run")]
    shown = resolved(["config", "show", path, *run, *profile], capsys)
    assert shown == resolved(["launch", path, *run, *profile, "--dry-run"], capsys)
    config = load_config(path, cluster=profile[-1] if profile else "local", run_dir=tmp_path / "run")
    assert config.cluster.time_min == 45 and config.cluster.partition == "mine"  # the recipe wins over the profile
    if profile:
        assert config.cluster.gpus_per_node == 8 and config.cluster.name == "a100"  # the profile's other keys stay
