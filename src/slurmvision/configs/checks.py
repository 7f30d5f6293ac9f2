"""The value checks of the config sections: each error names the key at fault and what it may be
(for a mistyped choice, the closest allowed value). Torch-free, as every module of the package."""

from __future__ import annotations

import difflib
from typing import Any

from slurmvision.errors import ConfigError


def choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}{hint}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def one_line(key: str, value: Any) -> None:
    """Strings that go into an sbatch script or a job name: a newline or another control
    character would end an #SBATCH line early or add a line of its own."""
    check(not isinstance(value, str) or value.isprintable(), key, value, "remove the newline or control character")
