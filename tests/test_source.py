"""Checks over the package's own source that no runtime test would see."""
from __future__ import annotations

import ast
from pathlib import Path

import fedanchor

PACKAGE = Path(fedanchor.__file__).parent


def repeated_keys(source: str) -> list[tuple[int, object]]:
    """(line, key) of every constant key a dict literal names twice: Python keeps the later value without a word."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            seen = set()
            for key in node.keys:
                if isinstance(key, ast.Constant):
                    if key.value in seen:
                        found.append((key.lineno, key.value))
                    seen.add(key.value)
    return found


def test_the_check_finds_a_repeated_key_and_passes_distinct_ones():
    assert repeated_keys('x = {"a": {"b": 1}, "c": 2, "a": {"d": 3}}') == [(1, "a")]
    assert repeated_keys('x = {"a": 1, **y, "b": {"a": 2}}') == []


def test_no_dict_literal_in_the_package_names_a_key_twice():
    offenders = {str(path.relative_to(PACKAGE)): repeated_keys(path.read_text())
                 for path in sorted(PACKAGE.rglob("*.py"))}
    assert not {p: r for p, r in offenders.items() if r}, "merge the repeated keys: the later value hides the earlier"
