"""The typicality check's verdict on every corruption of the precision study, without training anything.

The check (typicality.py) is a function of the sites' raw items and the public anchors alone: what each site
sends and what factor the server gives it are known before the first local step. So its verdict on each corruption
of the precision study (``precision_study.STUDY_SITES``, the bench's split sizes, the noisy modes at their default
severities, the corruption seeded as a federated run seeds it) is read here directly, over many splits, in seconds
on motion and digits (minutes on xray, whose report features need the trunk):

    python -m fedanchor.bench.typicality_study --scenario motion --seeds 0 1 2 3 4 5 --out runs/typicality-motion

``--noisy-anchors`` puts each corruption in the bad site's pipeline, so its copy of the public anchors passes through
it too (as ``fedanchor bench --precision --noisy-anchors`` does).

Per split and case (the clean federation, then each corruption of the first site of the first modality with 3+
sites): the bad site's z and factor, and the largest z / smallest factor among the clean sites of its modality.
Written: typicality.json, typicality.md and typicality_z.png (every split's z per case, the allowed z marked).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..federation.loop import make_split, site_inputs
from ..model.base_features import base_features, base_features_and_coherence
from ..model.homogeneous import build_model
from ..plots import save_figure
from ..typicality import ALLOWED_Z, anchor_summary, site_summary, typicality_factors
from .noisy import NOISY_MODES, pick_noisy_site, resolve_modes
from .precision_study import STUDY_SITES
from .runner import bench_config

CLEAN = "clean"


def typicality_study(scenario: str, seeds: Sequence[int], modes: Sequence[str] | None = None,
                     say: Callable[[str], None] = print, anchors_corrupted: bool = False) -> dict[str, Any]:
    """{"scenario", "seeds", "bad_site", "modality", "allowed_z", "anchors_corrupted", "cases": {case: {"bad_z": [...],
    "bad_factor": [...], "clean_max_z": [...], "clean_min_factor": [...]}}}, one value per split; the clean case has no
    bad site. ``anchors_corrupted``: the bad site's copy of the anchors passes through its corruption too."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={list(seeds)}: give each split once, at least one")
    chosen = resolve_modes(modes)
    sites = STUDY_SITES[scenario]
    bad = pick_noisy_site(sites)
    modality = sites[bad]
    peers = sorted(s for s, m in sites.items() if m == modality)
    cases: dict[str, dict[str, list[float]]] = {c: {"bad_z": [], "bad_factor": [], "clean_max_z": [], "clean_min_factor": []}
                                               for c in (CLEAN, *chosen)}
    model = None
    for seed in seeds:
        config = bench_config(scenario, seed=seed, overrides={"data.sites": sites})
        split = make_split(config)
        spec = split.anchors[modality].spec
        if model is None:  # the trunk only matters for text; every kind's base features go through the model
            model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
        tokens = config.alignment.readout_text_tokens

        def summary_of(items, copy_base: np.ndarray):
            base, coherence = base_features_and_coherence(model, modality, items, tokens)
            return site_summary(spec.kind, items, base, copy_base, coherence)
        anchor_base, anchor_coherence = base_features_and_coherence(model, modality, split.anchors[modality].items, tokens)
        reference = anchor_summary(spec.kind, split.anchors[modality].items, anchor_base, anchor_coherence)
        clean = {s: summary_of(split.private[s].items, anchor_base) for s in peers}
        for case in cases:
            summaries = dict(clean)
            if case != CLEAN:
                corruption = {bad: (chosen[case].corruption, chosen[case].severity)}
                data, anchors = site_inputs(split, corruption, anchors_corrupted, config.data.seed)[bad]
                if len(data) < config.alignment.codebook_min_cluster:  # too few items: the site sends nothing
                    summaries.pop(bad)
                else:
                    copy_base = (anchor_base if anchors is split.anchors[modality]  # records only: the public anchors
                                 else base_features(model, modality, anchors.items, tokens))
                    summaries[bad] = summary_of(data.items, copy_base)
            factors, zs, _ = typicality_factors(summaries, dict.fromkeys(summaries, modality), lambda _: reference)
            judged_clean = [s for s in zs if s != bad or case == CLEAN]
            record = cases[case]
            record["bad_z"].append(zs.get(bad, math.nan) if case != CLEAN else math.nan)
            record["bad_factor"].append(factors.get(bad, 1.0) if case != CLEAN else math.nan)
            record["clean_max_z"].append(max((zs[s] for s in judged_clean), default=math.nan))
            record["clean_min_factor"].append(min((factors[s] for s in judged_clean), default=1.0))
        say(f"split {seed}: " + " | ".join(
            f"{c} {_fmt(r['bad_z'][-1])}/{_fmt(r['clean_max_z'][-1])}" for c, r in cases.items()) + " (bad z / clean max z)")
    return {"scenario": scenario, "seeds": list(seeds), "bad_site": bad, "modality": modality, "sites": sites,
            "allowed_z": ALLOWED_Z, "severities": {c: chosen[c].severity for c in chosen},
            "anchors_corrupted": anchors_corrupted, "cases": cases}


def typicality_markdown(study: dict[str, Any], command: str = "") -> str:
    lines = [f"# The typicality check on {study['scenario']}: {len(study['seeds'])} splits (seeds {study['seeds']})", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Sites of {study['modality']}: {sorted(s for s, m in study['sites'].items() if m == study['modality'])}; "
              f"the bad site {study['bad_site']}, the anchors one more peer. A site keeps all its say up to z = "
              f"{study['allowed_z']:g}, then exp(-(z - {study['allowed_z']:g})). No training: these are the numbers a "
              "federated run's server computes from the sites' first reports."
              + (" Each corruption sat in the bad site's pipeline: its copy of the public anchors passed through it too."
                 if study.get("anchors_corrupted") else ""), "",
              "| case | bad site's z (per split) | its factor, mean | clean sites' largest z | clean sites' smallest factor |",
              "|---|---|---|---|---|"]
    for case, r in study["cases"].items():
        if case != CLEAN and all(math.isnan(z) for z in r["bad_z"]):
            bad, factor = "not judged: it holds too few items to report", "1.00"
        else:
            bad = "-" if case == CLEAN else f"{_fmt(_mean(r['bad_z']))} ({', '.join(_fmt(z) for z in r['bad_z'])})"
            factor = "-" if case == CLEAN else _fmt(_mean(r["bad_factor"]))
        lines.append(f"| {case} | {bad} | {factor} | {_fmt(_nan_extreme(np.nanmax, r['clean_max_z']))} | "
                     f"{_fmt(_nan_extreme(np.nanmin, r['clean_min_factor']))} |")
    return "\n".join(lines) + "\n"


def plot_typicality(study: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(study["cases"])
    for i, case in enumerate(names):
        r = study["cases"][case]
        ax.scatter(np.full(len(r["clean_max_z"]), i - 0.12), r["clean_max_z"], color="tab:blue", s=18,
                   label="clean sites (largest z)" if i == 0 else None)
        if case != CLEAN:
            ax.scatter(np.full(len(r["bad_z"]), i + 0.12), r["bad_z"], color="tab:red", s=18,
                       label="bad site" if i == 1 else None)
    ax.axhline(study["allowed_z"], color="grey", linestyle="--", linewidth=1, label=f"allowed z = {study['allowed_z']:g}")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("robust z (symlog)")
    ax.set_title(f"typicality check, {study['scenario']}, {len(study['seeds'])} splits", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_typicality(study: dict[str, Any], out: Path, command: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "typicality.json", "md": out / "typicality.md", "png": out / "typicality_z.png"}
    paths["json"].write_text(json.dumps(study, indent=2, allow_nan=True) + "\n")
    paths["md"].write_text(typicality_markdown(study, command))
    plot_typicality(study, paths["png"])
    return paths


def _nan_extreme(extreme, values: Sequence[float]) -> float:
    """np.nanmax / np.nanmin of ``values``, nan when every one is nan (no split judged the case)."""
    finite = [v for v in values if not math.isnan(v)]
    return float(extreme(finite)) if finite else math.nan


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _fmt(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.bench.typicality_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=sorted(STUDY_SITES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED")
    parser.add_argument("--noisy-mode", action="append", choices=sorted(NOISY_MODES),
                        help="a corruption to read (repeat; default: all of them)")
    parser.add_argument("--noisy-anchors", action="store_true",
                        help="the corruption sits in the bad site's pipeline: its copy of the public anchors too")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    study = typicality_study(args.scenario, args.seeds, args.noisy_mode, anchors_corrupted=args.noisy_anchors)
    command = "python -m fedanchor.bench.typicality_study " + " ".join(argv if argv is not None else sys.argv[1:])
    for path in write_typicality(study, args.out, command).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
