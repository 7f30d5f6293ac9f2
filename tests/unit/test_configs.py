"""Configs: recipes and profiles load, overrides apply, every mistake names the key and the fix."""

import re

import pytest

from slurmvision.configs import config_hash, load_config, load_saved_config, save_config
from slurmvision.errors import ConfigError

pytestmark = pytest.mark.unit


def test_recipe_profile_and_overrides_merge_in_order():
    config = load_config(
        "swinv2-tiny-a100", ["data.root=/shards", "optim.lr=2e-3", "cluster.time_min=60"], cluster="a100"
    )
    assert config.optim.lr == 2e-3 and config.optim.lr_base_batch == 1024
    assert config.trainer.precision == "fp16" and config.data.auto_augment == "rand-m9-mstd0.5-inc1"
    assert config.cluster.gpus_per_node == 8 and config.cluster.time_min == 60
    assert config.run.name == "swinv2-tiny-a100" and config.data.root == "/shards"


def test_a_mapping_given_whole_replaces_a_free_form_one_and_merges_into_a_section():
    """For another model than the recipe's: model.kwargs={} drops the recipe's model arguments."""
    recipe = load_config("digits-demo", ["data.root=/x"], cluster="local").model.kwargs
    assert "window_size" in recipe
    config = load_config(
        "digits-demo",
        ["data.root=/x", "model.name=resnet10t", "model.kwargs={stem_width: 8}", "model.kwargs.channels=[8,16,16,16]"],
        cluster="local",
    )
    assert config.model.kwargs == {"stem_width": 8, "channels": [8, 16, 16, 16]}
    config = load_config("digits-demo", ["data.root=/x", "data={batch_size: 3}"], cluster="local")
    assert config.data.batch_size == 3 and config.data.img_size == 32  # a section keeps its other keys


@pytest.mark.parametrize(
    "override,expected",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr'.*did you mean optim.lr"),
        ("trainer.max_step=3", "did you mean trainer.max_steps"),
        ("trainer.precision=bf61", "trainer.precision='bf61'.*'fp32', 'fp16', 'bf16'.*did you mean 'bf16'"),
        ("trainer.max_steps=abc", "trainer.max_steps.*'abc'"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is not allowed: must be >= 1"),
        ("data.remote_timeout_s=0", r"data.remote_timeout_s=0.0 is not allowed: must be > 0"),
        ("data.scale_batch_sizes=[4]", "one batch size per entry of data.scales"),
        ("cluster.gpus_per_node=4", "cluster.tasks_per_node=4"),
        ("optim", "must look like section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("digits-demo", ["data.root=/x", override], cluster="local")


def test_zero3_refuses_an_ema_it_would_have_to_keep_whole():
    with pytest.raises(ConfigError, match="model.ema_decay=0 or use trainer.zero_stage=2"):
        load_config(
            "digits-demo",
            ["data.root=/x", "trainer.engine=deepspeed", "trainer.zero_stage=3", "model.ema_decay=0.999"],
            cluster="local",
        )
    assert (
        load_config(
            "digits-demo", ["data.root=/x", "trainer.engine=deepspeed", "trainer.zero_stage=3"], cluster="local"
        ).trainer.zero_stage
        == 3
    )


def test_unknown_recipe_and_profile_suggest_names():
    with pytest.raises(ConfigError, match="did you mean 'digits-demo'"):
        load_config("digits-dem", [])
    with pytest.raises(ConfigError, match="did you mean 'a100'"):
        load_config("digits-demo", ["data.root=/x"], cluster="a10")


def test_missing_data_root_is_explained():
    with pytest.raises(ConfigError, match="data.root is not set"):
        load_config("digits-demo", [])


def test_recipe_with_a_typo_in_a_section(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("data:\n  root: /x\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"data.batchsize.*mine.yaml.*did you mean data.batch_size"):
        load_config(str(recipe))


def test_saved_config_round_trips(tmp_path):
    config = load_config(
        "digits-demo", ["data.root=/x", "trainer.max_steps=7"], cluster="local", run_dir=tmp_path / "run"
    )
    save_config(config, tmp_path / "run")
    again = load_saved_config(tmp_path / "run")
    assert again == config and config_hash(again) == config_hash(config)


def test_an_elastic_run_keeps_its_global_batch_on_fewer_nodes():
    config = load_config(
        "digits-demo",
        ["data.root=/x", "cluster.nodes=4", "cluster.min_nodes=2", "cluster.tasks_per_node=2", "trainer.grad_accum=3"],
        cluster="local",
    )
    assert config.cluster.elastic
    assert [config.grad_accum_at(nodes * 2) for nodes in (4, 3, 2)] == [3, 4, 6]
    # Not elastic: the configured accumulation, whatever the number of ranks.
    fixed = load_config("digits-demo", ["data.root=/x", "cluster.nodes=2", "trainer.grad_accum=3"], cluster="local")
    assert not fixed.cluster.elastic and fixed.grad_accum_at(7) == 3


def test_an_elastic_range_the_global_batch_cannot_follow_names_the_accumulation_that_can():
    with pytest.raises(
        ConfigError,
        match=r"trainer.grad_accum=1 cannot keep the global batch on 2 to 3 nodes.*"
        r"set trainer.grad_accum=2",
    ):
        load_config("digits-demo", ["data.root=/x", "cluster.nodes=3", "cluster.min_nodes=2"], cluster="local")
    with pytest.raises(ConfigError, match="cluster.min_nodes=3 is not allowed: must be 1 to cluster.nodes=2"):
        load_config("digits-demo", ["data.root=/x", "cluster.nodes=2", "cluster.min_nodes=3"], cluster="local")


@pytest.mark.parametrize(
    "override, key",
    [
        ('cluster.partition="gpu\\nx"', "cluster.partition"),
        ('cluster.account="a\\rb"', "cluster.account"),
        ('cluster.setup=["module load x\\n#SBATCH --exclusive"]', "cluster.setup[0]"),
        ('cluster.additional={"gres": "gpu:1\\nrm"}', "cluster.additional.gres"),
        ('run.name="a\\tb"', "run.name"),
    ],
)
def test_a_control_character_in_a_string_of_the_sbatch_script_is_refused(override, key, tmp_path):
    with pytest.raises(
        ConfigError, match=re.escape(key) + "=.* is not allowed: remove the newline or control character"
    ):
        load_config("digits-demo", ["data.root=/x", override], cluster="a100", run_dir=tmp_path / "run")


def test_a_newline_in_the_run_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="run.dir=.* remove the newline"):
        load_config("digits-demo", ["data.root=/x"], cluster="a100", run_dir=tmp_path / "a\nb")
