"""The machine-readable bench summary: per scenario, every method's headline recalls over splits.

    {"<scenario>": {"splits": N, "methods": {"<method>": {"instance_recall@10": x, "semantic_recall": y,
                    "sd_instance": s1, "sd_semantic": s2, "signs": [...]}},
                    "best_anchors_only": "<method>", "ceiling": "<method>", "k": {...}}}

``signs`` (fedanchor only) holds, per split, the sign of fedanchor minus the best
anchors-only method at each level. A multi-seed bench writes its scenario's entry
to ``<out>/summary.json``; ``python -m fedanchor.bench.summary A.json B.json --out
S.json`` merges several scenarios into one file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .runner import ANCHORS_ONLY, CEILINGS, HEADLINE_K, BenchResult, mean_recall


def _sd(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def scenario_summary(benches: Sequence[BenchResult]) -> dict[str, Any]:
    """The summary entry of one scenario from its benches (one per split, same methods)."""
    scenario = benches[0].scenario
    k = HEADLINE_K[scenario]
    names = [n for n in benches[0].methods if all(n in b.methods for b in benches)]
    recalls = {n: {level: [mean_recall(b.methods[n].metrics, level, k[level]) for b in benches] for level in ("instance", "semantic")}
               for n in names}
    methods = {n: {"instance_recall@10" if k["instance"] == 10 else f"instance_recall@{k['instance']}": float(np.mean(r["instance"])),
                   "semantic_recall": float(np.mean(r["semantic"])), "sd_instance": _sd(r["instance"]),
                   "sd_semantic": _sd(r["semantic"]), "per_split": {"instance": r["instance"], "semantic": r["semantic"]}}
               for n, r in recalls.items()}
    rivals = [n for n in ANCHORS_ONLY if n in recalls]
    ceilings = [n for n in CEILINGS if n in recalls]

    def mean_of(n: str) -> float:
        return float(np.mean(recalls[n]["instance"]) + np.mean(recalls[n]["semantic"]))
    best = max(rivals, key=mean_of) if rivals else None
    out: dict[str, Any] = {"splits": len(benches), "seeds": [b.config.data.seed for b in benches], "k": dict(k),
                           "methods": methods, "best_anchors_only": best,
                           "ceiling": max(ceilings, key=mean_of) if ceilings else None}
    if best is not None and "fedanchor" in recalls:
        methods["fedanchor"]["signs"] = {level: [int(np.sign(a - b)) for a, b in zip(recalls["fedanchor"][level], recalls[best][level])]
                                         for level in ("instance", "semantic")}
    return {scenario: out}


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths:
        entry = json.loads(Path(path).read_text())
        clash = sorted(set(entry) & set(out))
        if clash:
            raise ValueError(f"{path} repeats scenario(s) {clash}; give each scenario's summary once")
        out.update(entry)
    return out


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """One table per scenario: mean +- sd over splits, fedanchor's per-split signs against the best anchors-only method,
    and the gap it closes towards the ceiling."""
    lines = []
    for scenario, entry in summary.items():
        k = entry["k"]
        inst_key = next(key for key in next(iter(entry["methods"].values())) if key.startswith("instance_recall@"))
        lines += [f"## {scenario}: {entry['splits']} splits (seeds {entry.get('seeds')})", "",
                  f"| method | instance R@{k['instance']} | semantic R@{k['semantic']} |", "|---|---|---|"]
        for name, m in entry["methods"].items():
            mark = "**" if name in ("fedanchor", entry["best_anchors_only"]) else ""
            lines.append(f"| {mark}{name}{mark} | {m[inst_key]:.3f} ± {m['sd_instance']:.3f} | "
                         f"{m['semantic_recall']:.3f} ± {m['sd_semantic']:.3f} |")
        ours, bar, top = (entry["methods"].get(n) for n in ("fedanchor", entry["best_anchors_only"], entry["ceiling"]))
        if ours and bar:
            lines += ["", f"Best anchors-only: {entry['best_anchors_only']}; ceiling: {entry['ceiling']}."]
            for level, key in (("instance", inst_key), ("semantic", "semantic_recall")):
                gap = (ours[key] - bar[key]) / (top[key] - bar[key]) if top and top[key] > bar[key] else float("nan")
                lines.append(f"- {level}: fedanchor {ours[key] - bar[key]:+.3f} over the best anchors-only method "
                             f"(per split: {ours['signs'][level]}), gap closed {gap:.2f}")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.bench.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", type=Path, nargs="+", help="summary.json files written by multi-seed benches")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    summary = merge(args.summaries)
    args.out.write_text(json.dumps(summary, indent=2))
    args.out.with_suffix(".md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
