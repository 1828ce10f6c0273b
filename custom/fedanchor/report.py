"""Results as people read them: a recall table on the terminal, and results.json on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .config import config_to_dict
from .evaluation import KS


def recall_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, list[float], list[float], list[float]]]:
    """(direction, level, recalls at KS, chance at KS) for every direction in the metrics."""
    directions = sorted({k.split("/")[0] for k in metrics if "->" in k.split("/")[0]})
    rows = []
    for d in directions:
        for level, prefix in (("instance", "recall"), ("semantic", "semantic_recall")):
            values = [metrics.get(f"{d}/{prefix}@{k}", float("nan")) for k in KS]
            chance = [metrics.get(f"{d}/chance_{prefix}@{k}", float("nan")) for k in KS]
            rows.append((d, level, values, chance, []))
    return rows


def print_recall_table(runs: Mapping[str, Mapping[str, float]]) -> None:
    header = f"{'run':<26} {'direction':<22} {'level':<9} " + " ".join(f"{'R@' + str(k):>6}" for k in KS) + "   chance"
    print(header)
    print("-" * len(header))
    for label, metrics in runs.items():
        for direction, level, values, chance, _ in recall_rows(metrics):
            cells = " ".join(f"{v:6.3f}" for v in values)
            print(f"{label:<26} {direction:<22} {level:<9} {cells}   " + "/".join(f"{c:.3f}" for c in chance))


def write_run(folder: Path, runs: Mapping[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {}
    for label, result in runs.items():
        payload[label] = {
            "config": config_to_dict(result.config),  # type: ignore[attr-defined]
            "initial_eval": result.initial_eval,  # type: ignore[attr-defined]
            "rounds": [r.as_dict() for r in result.rounds],  # type: ignore[attr-defined]
        }
    path = folder / "results.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path
