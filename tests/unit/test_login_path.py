"""The login-node path starts fast and never imports torch, timm or deepspeed (every login-node module:
test_imports.py)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "timm", "deepspeed", "torchvision")


def run_and_list_modules(code: str) -> set[str]:
    script = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["launch", "--help"],
        ["status", "--help"],
        ["coordinate", "--help"],
        ["config", "show", "digits-demo", "data.root=/x"],
        ["launch", "swinv2-tiny-a100", "data.root=/x", "--cluster", "a100", "--dry-run"],
    ],
)
def test_login_commands_do_not_import_torch(argv):
    code = (
        "import contextlib, io\nfrom slurmvision.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass"
    )
    loaded = run_and_list_modules(code)
    assert not [m for m in HEAVY if m in loaded]


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "slurmvision", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in (
        "shards",
        "train",
        "launch",
        "coordinate",
        "status",
        "cancel",
        "eval",
        "export",
        "explain",
        "config",
        "checkpoint",
        "demo",
    ):
        assert command in out


def test_user_error_is_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "slurmvision", "config", "show", "digits-demo", "data.root=/x", "optim.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "did you mean optim.lr" in result.stderr
