"""The configuration reference (docs/CONFIG.md), generated from config.py's own defaults and comments.

    python -m fedanchor.config_reference > docs/CONFIG.md     # or: make docs

A test checks that docs/CONFIG.md is what this prints, so the page cannot drift
from the code. The meaning of a key is the comment on its line in config.py, or
its section's docstring when it has none.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
from typing import Any

from . import config as config_module
from .config import FedAnchorConfig

_FIELD_LINE = re.compile(r"^\s+(?P<name>\w+)\s*:[^=]*(=.*?)?(#\s*(?P<comment>.*))?$")


def _comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and not stripped.startswith(("def ", '"""', "@")):
            text = " ".join(pending + ([match.group("comment")] if match.group("comment") else []))
            out[match.group("name")] = text
        pending = []
    return out


def _value(value: Any) -> str:
    return "`" + json.dumps(value) + "`"


def config_reference() -> str:
    root = FedAnchorConfig()
    lines = ["# Configuration reference", "",
             "Generated from `custom/fedanchor/config.py` by `python -m fedanchor.config_reference` (`make docs`); "
             "do not edit by hand. Set any key in a job's config (`config_fed_*.json`, nested), with "
             "`fedanchor run|compare|bench --set section.key=value`, or in a JSON file (`--config`). Unknown keys and "
             "bad values fail with the valid ones and the fix.", ""]
    top = [f for f in dataclasses.fields(root) if not dataclasses.is_dataclass(getattr(root, f.name))]
    for section in dataclasses.fields(root):
        value = getattr(root, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        cls = type(value)
        doc = inspect.getdoc(cls) or ""
        comments = _comments(cls)
        lines += [f"## `{section.name}`", "", doc, "", "| key | default | meaning |", "|---|---|---|"]
        for field in dataclasses.fields(value):
            lines.append(f"| `{section.name}.{field.name}` | {_value(getattr(value, field.name))} | "
                         f"{comments.get(field.name, '').replace('|', '/')} |")
        lines.append("")
    root_comments = _comments(FedAnchorConfig)
    lines += ["## top level", "", "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {_value(getattr(root, f.name))} | {root_comments.get(f.name, 'federated rounds')} |" for f in top]
    return "\n".join(lines) + "\n"


assert config_module  # the module whose source the comments come from

if __name__ == "__main__":
    print(config_reference(), end="")
