"""A newcomer reads any module in one sitting and any function in one screen: no source file over 400
lines, no function over 60 (from its `def` to its last line)."""

import ast
from pathlib import Path

import pytest

import slurmvision

pytestmark = pytest.mark.unit

ROOT = Path(slurmvision.__file__).parent
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def test_no_source_file_is_longer_than_a_sitting():
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"split these files (over {MAX_FILE_LINES} lines): {long}"


def test_no_function_is_longer_than_a_screen():
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert not long, f"split these functions (over {MAX_FUNCTION_LINES} lines): {long}"
