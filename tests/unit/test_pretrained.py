"""Pretrained weights are fetched once on the login node and read from disk by the ranks: a cache that holds
them is used without the network, a login node without network says what to do, and the ranks (offline)
load the file. No network here: the hub cache is a directory laid out as huggingface_hub lays it out."""

from pathlib import Path

import huggingface_hub.constants
import pytest

from slurmvision import pretrained
from slurmvision.configs import load_config
from slurmvision.configs.model import ModelConfig
from slurmvision.errors import ConfigError
from slurmvision.launch import launcher
from slurmvision.slurm.executor import sbatch_script

pytestmark = pytest.mark.unit
REPO = "timm/resnet18.a1_in1k"


def fake_hub_cache(cache: Path, repo: str = REPO, filename: str = "model.safetensors", data: bytes = b"w") -> Path:
    """A Hugging Face hub cache holding one file of `repo` at its main revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub refuses every request, and timm's source lookup is the known one."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(pretrained, "source", lambda name: pretrained.Source(name, repo=REPO))


def test_weights_in_the_cache_are_used_without_the_network(tmp_path, offline):
    file = fake_hub_cache(tmp_path / "hub")
    model = ModelConfig(name="resnet18", pretrained=True, cache_dir=str(tmp_path / "hub"))
    assert pretrained.fetch(model) == file
    assert pretrained.timm_kwargs(model) == {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}


def test_a_login_node_without_network_says_how_to_get_the_weights(tmp_path, offline):
    model = ModelConfig(name="resnet18", pretrained=True, cache_dir=str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="could not download the weights of resnet18") as err:
        pretrained.fetch(model)
    assert f"`hf download {REPO} --cache-dir {tmp_path / 'hub'}`" in str(err.value)
    assert "model.pretrained_file" in str(err.value)


def test_ranks_never_download(tmp_path, offline, monkeypatch):
    monkeypatch.setattr(pretrained, "download", lambda *args: pytest.fail("a rank downloaded"))
    model = ModelConfig(name="resnet18", pretrained=True, cache_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not in the cache .* on this node"):
        pretrained.timm_kwargs(model)
    file = tmp_path / "weights.pth"
    file.write_bytes(b"w")
    given = ModelConfig(name="resnet18", pretrained=True, pretrained_file=str(file))
    assert pretrained.timm_kwargs(given)["pretrained_cfg_overlay"] == {"file": str(file)}
    assert pretrained.timm_kwargs(ModelConfig(name="resnet18")) == {"pretrained": False}


def test_the_jobs_tasks_run_offline(tmp_path):
    config = load_config("digits-demo", ["data.root=/x"], cluster="a100", run_dir=tmp_path / "run")
    srun = next(
        line
        for line in sbatch_script(config.cluster, tmp_path / "run" / "slurm", "n", "c").splitlines()
        if line.startswith("srun ")
    )
    assert " --export=ALL,HF_HUB_OFFLINE=1 " in srun


def test_launch_refuses_a_missing_weights_file_before_submitting(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "make_executor", lambda *args: pytest.fail("submitted"))
    config = load_config(
        "digits-demo",
        ["data.root=/x", "model.pretrained=true", f"model.pretrained_file={tmp_path / 'missing.pth'}"],
        run_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError, match="model.pretrained_file=.*missing.pth does not exist"):
        launcher.submit(config)


def test_timm_loads_the_fetched_file_offline(tmp_path, monkeypatch):
    """The real timm: resnet18's default weights come from the cache the login node filled, with a head for
    10 classes, and timm's own download functions are never called."""
    import safetensors.torch
    import timm
    import timm.models._builder as builder
    import torch

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("load_state_dict_from_hf", "load_state_dict_from_url"):
        monkeypatch.setattr(builder, name, lambda *args, **kwargs: pytest.fail("timm downloaded"))
    reference = timm.create_model("resnet18")
    safetensors.torch.save_file(reference.state_dict(), tmp_path / "w.safetensors")
    fake_hub_cache(tmp_path / "hub", data=(tmp_path / "w.safetensors").read_bytes())
    model = ModelConfig(name="resnet18", pretrained=True, cache_dir=str(tmp_path / "hub"))
    pretrained.fetch(model)
    loaded = timm.create_model("resnet18", num_classes=10, **pretrained.timm_kwargs(model))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight) and loaded.fc.out_features == 10
