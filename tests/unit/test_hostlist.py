"""Slurm host lists expanded as `scontrol show hostnames` does (tests/slurm checks the two agree)."""

import pytest

from slurmvision.errors import ClusterError
from slurmvision.slurm.hostlist import expand

pytestmark = pytest.mark.unit
# Shared with the Slurm test that asks scontrol for the same expansions.
CASES = {
    "node7": ["node7"],
    "gpu[001-004,010]": ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"],
    "a[1-2]-b[1-4]": ["a1-b1", "a1-b2", "a1-b3", "a1-b4", "a2-b1", "a2-b2", "a2-b3", "a2-b4"],
    "n[1-2],m3,login-[08-10]": ["n1", "n2", "m3", "login-08", "login-09", "login-10"],
    "x[8-10]": ["x8", "x9", "x10"],
    "rack1-node[3,5]": ["rack1-node3", "rack1-node5"],
}


@pytest.mark.parametrize("nodelist", CASES)
def test_expand(nodelist):
    assert expand(nodelist) == CASES[nodelist]


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu1-2]", "gpu[a-b]", "gpu[5-3]", "g[[1]]"])
def test_a_malformed_list_is_one_clear_error(bad):
    with pytest.raises(ClusterError, match="invalid Slurm host list"):
        expand(bad)
