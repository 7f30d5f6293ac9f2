"""What the commands print: a result as JSON (`--json`) or as text for people."""

from __future__ import annotations

import json
from typing import Any, Callable


def print_result(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=1, sort_keys=False) if as_json else text(data))
