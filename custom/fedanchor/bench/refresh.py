"""Fixed against refreshed GeoLoRA bases, at equal bytes.

On one split and seed: fedanchor with a fixed basis at several ranks, and with a
basis refresh every T rounds (adapters/refresh.py) capped at the base rank. A
refresh costs bytes (the projected gradients up, a 2r core both ways for a
round, new bases down), so the fair comparison is with the fixed rank whose
total bytes over the run are closest: "at equal bytes" in the table.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import FedAnchorConfig, with_overrides
from ..federation.loop import make_split, run_in_process
from .runner import HEADLINE_K, mean_recall


def _run(config: FedAnchorConfig, split, label: str) -> dict[str, Any]:
    torch.manual_seed(config.train.seed)
    started = time.perf_counter()
    result = run_in_process(config, progress=None, split=split, evaluate_each_round=False)
    state = result.final_state
    ranks = [int(v.shape[0]) for k, v in state.tensors.items() if k.startswith("adapter/") and k.endswith("/S")]
    headline = HEADLINE_K[config.data.scenario]
    return {
        "method": label, "rank": config.adapter.rank, "refresh_every": config.adapter.refresh_every,
        "final_ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)},
        "bytes_up": int(sum(sum(r.bytes_up.values()) for r in result.rounds)),
        "bytes_down": int(sum(sum(r.bytes_down.values()) for r in result.rounds)),
        "instance": mean_recall(result.final_eval, "instance", headline["instance"]),
        "semantic": mean_recall(result.final_eval, "semantic", headline["semantic"]),
        "seconds": time.perf_counter() - started,
    }


def refresh_study(config: FedAnchorConfig, every: int = 3, tolerance: float = 0.1,
                  fixed_ranks: Sequence[int] | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the fixed ranks and the refreshed basis on one split; pair the refresh with the fixed rank of equal bytes."""
    if every < 2:
        raise ValueError(f"--refresh-every {every}: a refresh takes two rounds; use at least 2")
    if config.rounds < every:
        raise ValueError(f"rounds={config.rounds} < refresh every {every}: no refresh would complete; "
                         f"--set rounds={2 * every}")
    rank = config.adapter.rank
    ranks = sorted(set(fixed_ranks or (rank, math.ceil(1.5 * rank), 2 * rank)))
    split = make_split(config)
    rows = []
    for r in ranks:
        say(f"-- fixed basis, rank {r}")
        rows.append(_run(with_overrides(config, {"adapter.rank": r, "adapter.refresh_every": 0}), split, f"fixed rank {r}"))
    say(f"-- basis refreshed every {every} rounds, tolerance {tolerance}, at most rank {rank}")
    refreshed = _run(with_overrides(config, {"adapter.refresh_every": every, "adapter.refresh_tolerance": tolerance,
                                             "adapter.rank_max": rank}),
                     split, f"refreshed every {every} (rank <= {rank}, tau {tolerance})")
    rows.append(refreshed)
    equal = min(rows[:-1], key=lambda row: abs(row["bytes_up"] - refreshed["bytes_up"]))
    return {"scenario": config.data.scenario, "rounds": config.rounds, "headline_k": HEADLINE_K[config.data.scenario],
            "rows": rows, "equal_bytes": {"fixed": equal["method"], "refreshed": refreshed["method"],
                                          "bytes_ratio": refreshed["bytes_up"] / equal["bytes_up"],
                                          "instance_gain": refreshed["instance"] - equal["instance"],
                                          "semantic_gain": refreshed["semantic"] - equal["semantic"]}}


def refresh_markdown(study: Mapping[str, Any]) -> str:
    k = study["headline_k"]
    lines = [f"# Fixed against refreshed bases: {study['scenario']}, {study['rounds']} rounds", "",
             f"| method | final ranks (min/mean/max) | bytes up (all sites, all rounds) | bytes down | "
             f"instance R@{k['instance']} | semantic R@{k['semantic']} | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in study["rows"]:
        ranks = row["final_ranks"]
        lines.append(f"| {row['method']} | {ranks['min']}/{ranks['mean']:.1f}/{ranks['max']} | {row['bytes_up'] / 1024:.0f} KiB "
                     f"| {row['bytes_down'] / 1024:.0f} KiB | {row['instance']:.3f} | {row['semantic']:.3f} | {row['seconds']:.1f} |")
    eq = study["equal_bytes"]
    lines += ["", f"At equal bytes: {eq['refreshed']} against {eq['fixed']} (bytes up ratio {eq['bytes_ratio']:.2f}): "
                  f"instance {eq['instance_gain']:+.3f}, semantic {eq['semantic_gain']:+.3f}.", ""]
    return "\n".join(lines)
