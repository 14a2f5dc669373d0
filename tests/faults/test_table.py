"""docs/faults.md is the suite's table: every test it names exists, every fault test is named."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.support.cli import REPO

TABLE = REPO / "docs" / "faults.md"
REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)(\[[^\]`]+\])?")


def test_every_test_named_in_the_table_exists() -> None:
    refs = REFERENCE.findall(TABLE.read_text(encoding="utf-8"))
    assert len(refs) > 40
    missing = []
    for file, name, param in refs:
        path = REPO / file
        if not path.exists():
            missing.append(f"{file} (no such file)")
            continue
        source = path.read_text(encoding="utf-8")
        functions = {n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
        if name not in functions:
            missing.append(f"{file}::{name}")
        elif param and f'"{param[1:-1]}"' not in source:
            missing.append(f"{file}::{name}{param} (no such parameter id)")
    assert missing == []


def test_every_fault_test_is_in_the_table() -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/faults"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    ids = [line for line in collected.stdout.splitlines() if line.startswith("tests/faults/") and "::" in line]
    assert len(ids) > 40, collected.stdout + collected.stderr
    table = TABLE.read_text(encoding="utf-8")
    absent = [i for i in ids if "test_table.py" not in i and i not in table]
    assert absent == []
