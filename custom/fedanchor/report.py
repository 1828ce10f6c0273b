"""Results as people read them: a recall table on the terminal, and results.json on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .config import config_to_dict
from .evaluation import KS
from .plots import plot_embedding_map, plot_rounds


def recall_rows(metrics: Mapping[str, float]) -> list[tuple[str, str, list[float], list[float]]]:
    """(direction, level, recalls at KS, chance at KS) for every direction in the metrics."""
    directions = sorted({k.split("/")[0] for k in metrics if "->" in k.split("/")[0]})
    rows = []
    for d in directions:
        for level, prefix in (("instance", "recall"), ("semantic", "semantic_recall")):
            values = [metrics.get(f"{d}/{prefix}@{k}", float("nan")) for k in KS]
            chance = [metrics.get(f"{d}/chance_{prefix}@{k}", float("nan")) for k in KS]
            rows.append((d, level, values, chance))
    return rows


def print_recall_table(runs: Mapping[str, Mapping[str, float]]) -> None:
    header = f"{'run':<26} {'direction':<22} {'level':<9} " + " ".join(f"{'R@' + str(k):>6}" for k in KS) + "   chance"
    print(header)
    print("-" * len(header))
    for label, metrics in runs.items():
        for direction, level, values, chance in recall_rows(metrics):
            cells = " ".join(f"{v:6.3f}" for v in values)
            print(f"{label:<26} {direction:<22} {level:<9} {cells}   " + "/".join(f"{c:.3f}" for c in chance))


def comparison_lines(fedanchor: Mapping[str, float], anchors_only: Mapping[str, float], k: int = 10) -> list[str]:
    """What the federation added over the anchors-only CCA on the same anchors, per direction, and every recall that
    sits at or below chance (none should)."""
    lines = []
    for direction, level, values, chance in recall_rows(fedanchor):
        at = KS.index(k)
        rival = anchors_only.get(f"{direction}/{'recall' if level == 'instance' else 'semantic_recall'}@{k}")
        versus = f" vs anchors-only {rival:.3f} ({values[at] - rival:+.3f})" if rival is not None else ""
        lines.append(f"{direction} {level} R@{k}: fedanchor {values[at]:.3f}{versus}")
    below = [f"{d} {level} R@{KS[i]}" for d, level, values, chance in recall_rows(fedanchor)
             for i, (v, c) in enumerate(zip(values, chance)) if v <= c]
    lines.append("at or below chance: " + (", ".join(below) if below else "none"))
    return lines


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
    for label, result in runs.items():
        stem = label.replace(" ", "_").replace("/", "_")
        plot_rounds([r.as_dict() for r in result.rounds], folder / f"{stem}-rounds.png", title=label,  # type: ignore[attr-defined]
                    initial_eval=result.initial_eval)  # type: ignore[attr-defined]
        if getattr(result, "embeddings", None):
            plot_embedding_map(result.embeddings, folder / f"{stem}-embeddings.png", title=f"{label}: held-out pairs")  # type: ignore[attr-defined]
    return path


def round_table(rounds: list[Mapping], initial_eval: Mapping[str, float] | None = None) -> str:
    """Per round: mean local loss, each site's CKA to the consensus, held-out recall@1/5/10 both directions."""
    sites = sorted({s for r in rounds for s in r.get("site_metrics", {})})
    evals = [r.get("eval", {}) for r in rounds]
    directions = sorted({k.split("/")[0] for e in evals + [initial_eval or {}] for k in e if "->" in k.split("/")[0]})
    head = ["round", "loss"] + [f"cka {s}" for s in sites] + [f"{d} R@1/5/10" for d in directions]
    rows = []
    if initial_eval:
        rows.append(["0", "-"] + ["-" for _ in sites] + [_recalls(initial_eval, d) for d in directions])
    for r in rounds:
        metrics = r.get("site_metrics", {})
        losses = [m.get("loss/loss") for m in metrics.values() if m.get("loss/loss") is not None]
        row = [str(int(r["round"]) + 1), f"{sum(losses) / len(losses):.3f}" if losses else "-"]
        row += [f"{metrics[s]['cka_to_consensus']:.3f}" if "cka_to_consensus" in metrics.get(s, {}) else "-" for s in sites]
        row += [_recalls(r.get("eval", {}), d) for d in directions]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _recalls(metrics: Mapping[str, float], direction: str) -> str:
    return "/".join(f"{metrics.get(f'{direction}/recall@{k}', float('nan')):.3f}" for k in KS)
