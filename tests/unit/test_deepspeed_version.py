"""The DeepSpeed engine reads private ZeRO attributes: outside the tested versions it refuses to
start, with a message that names the installed version and the tested range."""

import pytest

from slurmvision.errors import SlurmVisionError
from slurmvision.trainer.zero import TESTED_DEEPSPEED, check_version

pytestmark = pytest.mark.unit


def test_the_installed_deepspeed_is_a_tested_version():
    deepspeed = pytest.importorskip("deepspeed")
    check_version(deepspeed.__version__)


@pytest.mark.parametrize("version", ["0.19.7", "0.20.0", "1.0.0"])
def test_an_untested_deepspeed_is_refused_with_the_version_and_the_range(version):
    low, high = TESTED_DEEPSPEED
    with pytest.raises(SlurmVisionError, match=rf"DeepSpeed {version} .*\(>={low},<{high}\).*trainer.engine=ddp"):
        check_version(version)
