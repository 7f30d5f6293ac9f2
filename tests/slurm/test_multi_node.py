"""One job across two hosts of the local cluster (node1 and node2, each in its own network
namespace): rendezvous from the job's node list, the result of a one-host run with as many
ranks, preemption of both hosts at once, the loss of one; the last two coordinated by watcher
jobs inside Slurm, with no coordinator process on this (login) side."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from slurmvision.configs import load_cluster
from slurmvision.evaluate.inspect import inspect_checkpoint
from slurmvision.launch.launcher import submit, wait_for
from slurmvision.launch.local import train_here
from slurmvision.launch.status import format_status, run_status
from slurmvision.slurm.ledger import Ledger

from ..integration.conftest import tiny_config, tiny_shards  # noqa: F401  (fixture)
from ..unit.test_hostlist import CASES
from .test_train_on_slurm import LONGER, SETTINGS, return_to_service, start_when_requeued, wait_for_log, wait_until_gone
from .test_watcher import chain_ends, launch_watched

# Tests of one group share nodes and run one at a time; the groups run side by side (make test).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("two-hosts")]
REPO = Path(__file__).resolve().parents[2]
DEVSLURM = Path(os.environ.get("SLURM_CONF", REPO / ".devslurm" / "etc" / "slurm.conf")).resolve().parents[1]


def two_host_config(shards, run_dir, tasks_per_node: int, *overrides):
    config = tiny_config(shards, run_dir, *SETTINGS, *overrides)
    config.cluster = load_cluster("devslurm-multi")
    config.cluster.tasks_per_node, config.cluster.time_min, config.cluster.retry_backoff_s = tasks_per_node, 10, 0
    return config


@pytest.fixture(scope="module", autouse=True)
def two_hosts():
    hosts = subprocess.run(["sinfo", "-h", "-p", "multi", "-o", "%D"], capture_output=True, text=True).stdout.strip()
    if hosts != "2":
        pytest.fail("the local cluster has no two-host partition 'multi': start it with `make slurm-up NODES=2`")


@pytest.mark.parametrize("nodelist", CASES)
def test_host_lists_expand_as_scontrol_expands_them(nodelist):
    scontrol = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    assert scontrol.stdout.split() == CASES[nodelist]


def sacct_nodes(job_id: str) -> str:
    return (
        subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "--format=NodeList"], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_a_two_host_job_trains_what_one_host_trains_with_as_many_ranks(tiny_shards, tmp_path, tasks_per_node):  # noqa: F811
    ranks = 2 * tasks_per_node
    # Four ranks share this machine's two cores twice over (here and in the job): fewer steps, no loader workers.
    lighter = ["trainer.max_steps=4", "data.workers=0"] if ranks > 2 else []
    train_here(tiny_config(tiny_shards, tmp_path / "one-host", *SETTINGS, *lighter), nproc=ranks)
    job = submit(two_host_config(tiny_shards, tmp_path / "two-hosts", tasks_per_node, *lighter))
    results = wait_for(job)
    assert results["step"] == (4 if lighter else 8)
    two_hosts = inspect_checkpoint(tmp_path / "two-hosts")
    assert two_hosts["world_size"] == ranks
    assert two_hosts["params_sha256"] == inspect_checkpoint(tmp_path / "one-host")["params_sha256"]
    assert sacct_nodes(job.job_id) == "node[1-2]"
    (attempt,) = Ledger(tmp_path / "two-hosts").attempts()
    assert attempt["nodes"] == "node[1-2]" and attempt["world_size"] == ranks
    # Each host's ranks ran there, and met at the first host.
    for rank in range(ranks):
        host = "node1" if rank < tasks_per_node else "node2"
        log = (tmp_path / "two-hosts" / "logs" / f"rank-{rank:05d}.log").read_text()
        assert f"rank {rank} of {ranks} on {host} (submitit): gloo, rendezvous at node1:" in log


def test_preempting_a_two_host_job_saves_both_hosts_at_one_step_and_resumes_bit_for_bit(
    tiny_shards,
    tmp_path,  # noqa: F811
    straight_sha,
):
    run_dir = tmp_path / "run"
    job = launch_watched(two_host_config(tiny_shards, run_dir, 1, *LONGER))
    wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "multi-high", "-N", "2", "-o", str(tmp_path / "high.out"), "--wrap", "sleep 5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for rank in (0, 1):
        wait_for_log(run_dir / "logs" / f"rank-{rank:05d}.log", "stopped by SIGTERM")
    wait_until_gone(high)
    start_when_requeued(job)
    assert chain_ends(run_dir).startswith("run finished")
    stops = [
        (run_dir / "logs" / f"rank-{rank:05d}.log").read_text().split("stopped by SIGTERM")[1].splitlines()[0]
        for rank in (0, 1)
    ]
    step = stops[0].split(" at step ")[1].split(":")[0]
    assert all(f"at step {step}:" in stop and "checkpoint saved" in stop for stop in stops), stops
    assert inspect_checkpoint(run_dir)["params_sha256"] == straight_sha  # one host's, 2 ranks
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "preemption" and first["lost_steps"] == 0 and first["step_reached"] == int(step)
    assert second["step_start"] == int(step) and second["outcome"] == "finished" and second["nodes"] == "node[1-2]"
    assert len(Ledger(run_dir).jobs()) == 1  # Slurm requeued it: nothing resubmitted
    # The requeue left the watcher's dependency unfulfilled: one watcher ran, after the end.
    assert len(list((run_dir / "logs").glob("watcher-*.log"))) == 1


def each_sample_once(run_dir) -> dict[int, int]:
    """Samples trained per epoch, from the audit keys; none of them twice in one epoch."""
    per_epoch: dict[int, list] = {}
    for path in (run_dir / "audit").glob("rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            per_epoch.setdefault(entry["epoch"], []).extend(entry["keys"])
    for epoch, keys in per_epoch.items():
        assert len(keys) == len(set(keys)), f"a sample was trained twice in epoch {epoch}"
    return {epoch: len(keys) for epoch, keys in per_epoch.items()}


def lose_host(host: str) -> None:
    """What a dead host looks like to Slurm: its slurmd gone, the node DOWN."""
    pid = (DEVSLURM / "run" / f"slurmd-{host}.pid").read_text().strip()
    subprocess.run(["kill", "-9", pid], check=True)
    subprocess.run(["scontrol", "update", f"nodename={host}", "state=down", "reason=slurmvision-test"], check=True)


def bring_back(host: str) -> None:
    subprocess.run(
        ["bash", str(REPO / "scripts" / "devslurm.sh"), "up", "--nodes", "2"],
        check=True,
        capture_output=True,
        env={**os.environ, "DEVSLURM_DIR": str(DEVSLURM)},
    )
    return_to_service(host)


def test_losing_a_host_goes_on_with_fewer_ranks_at_the_same_global_batch(tiny_shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    config = two_host_config(tiny_shards, run_dir, 1, *LONGER)
    config.cluster.min_nodes, config.cluster.watcher_every_s = 1, 10
    job = launch_watched(config)
    try:
        wait_for_log(run_dir / "logs" / "rank-00000.log", "step 2/")
        lose_host("node2")
        start_when_requeued(job)
        message = chain_ends(run_dir)
    finally:
        bring_back("node2")
    assert message.startswith("run finished"), message
    assert any("resized to 1" in e["message"] for e in Ledger(run_dir).events(100))  # the requeued job, by a watcher
    first, second = Ledger(run_dir).attempts()
    assert first["cause"] == "node failure" and first["world_size"] == 2 and first["nodes"] == "node[1-2]"
    assert second["world_size"] == 1 and second["nodes"] == "node1" and second["outcome"] == "finished"
    assert second["step_start"] <= first["step_reached"]
    # Every sample of every epoch once, across the change from two ranks to one.
    assert set(each_sample_once(run_dir).values()) == {72}
    assert inspect_checkpoint(run_dir)["world_size"] == 1 and inspect_checkpoint(run_dir)["step"] == 60
    assert "shrank" in format_status(run_status(str(run_dir)))
