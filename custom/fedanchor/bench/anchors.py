"""The anchor budget: recall against the number of public anchor pairs, for the anchors-only rivals and for fedanchor.

fedanchor's value is stated as effective anchors: how many anchor pairs the best
anchors-only rival needs (interpolated on its curve, in log anchors) to reach
fedanchor's recall at the job's own anchor count. The best rival at each count is
the better of the anchors-only CCA and the same with the anchor codebook on the
held-out pairs themselves: a choice no consortium could make, so the curve flatters
the rival, never fedanchor. Both methods run on the same
split at each count; the split is redrawn per count (its held-out pairs follow the
anchors in the seeded permutation), so each point pairs the two methods on one
split and the curve's steps carry split noise as well.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..config import FedAnchorConfig, with_overrides
from ..plots import save_figure
from .runner import HEADLINE_K, mean_recall, run_bench

RIVALS = ("anchors-only CCA", "anchors-only CCA + anchor codebook")
RIVAL = "best anchors-only"  # per count and level, the better of RIVALS
OURS = "fedanchor"
LEVELS = ("instance", "semantic")


def anchor_budget(config: FedAnchorConfig, counts: Sequence[int], say=print) -> dict[str, Any]:
    """Per anchor count: the headline recalls of the rival and of fedanchor; then effective anchors per level."""
    counts = sorted(set(int(c) for c in counts))
    if len(counts) < 2 or counts[0] < 8:
        raise ValueError(f"--anchors {counts}: give at least two counts, each of at least 8 anchors (cross-validation "
                         "needs folds of 3 or more)")
    headline = HEADLINE_K[config.data.scenario]
    points = []
    for n in counts:
        say(f"== {n} anchors ==")
        bench = run_bench(with_overrides(config, {"data.n_anchors": n}), [*RIVALS, OURS], say=say)
        point = {f"{m}/{level}": mean_recall(bench.methods[m].metrics, level, headline[level])
                 for m in (*RIVALS, OURS) for level in LEVELS}
        point.update({f"{RIVAL}/{level}": max(point[f"{m}/{level}"] for m in RIVALS) for level in LEVELS})
        points.append({"anchors": n, **point})
    return {"scenario": config.data.scenario, "seed": config.data.seed, "k": dict(headline), "points": points,
            "effective_anchors": {level: effective_anchors(points, level) for level in LEVELS}}


def effective_anchors(points: Sequence[Mapping[str, float]], level: str) -> dict[str, Any]:
    """At each count: the anchor count at which the rival's curve reaches fedanchor's recall (log-linear between
    measured counts; below the first or above the last count it is reported as a bound)."""
    counts = np.array([p["anchors"] for p in points], dtype=float)
    rival = np.maximum.accumulate(np.array([p[f"{RIVAL}/{level}"] for p in points]))  # the rival with more anchors is never worse
    out = {}
    for p in points:
        ours = p[f"{OURS}/{level}"]
        if ours <= rival[0]:
            out[str(p["anchors"])] = f"<= {int(counts[0])}"
        elif ours > rival[-1]:
            out[str(p["anchors"])] = f"> {int(counts[-1])}"
        else:
            i = int(np.searchsorted(rival, ours))
            lo, hi = rival[i - 1], rival[i]
            frac = 0.0 if hi <= lo else (ours - lo) / (hi - lo)
            out[str(p["anchors"])] = float(np.exp(np.log(counts[i - 1]) + frac * (np.log(counts[i]) - np.log(counts[i - 1]))))
    return out


def anchors_markdown(study: Mapping[str, Any]) -> str:
    k = study["k"]
    lines = [f"# Anchor budget: {study['scenario']} (split seed {study['seed']})", "",
             f"Mean of both directions; instance R@{k['instance']}, semantic R@{k['semantic']}. Effective anchors: the "
             f"anchor count at which {RIVAL} reaches fedanchor's recall.", "",
             "| anchors | best anchors-only inst | fedanchor inst | effective (inst) | best anchors-only sem | fedanchor sem | effective (sem) |",
             "|---|---|---|---|---|---|---|"]
    eff = study["effective_anchors"]

    def show(v: Any) -> str:
        return f"{v:.0f}" if isinstance(v, float) else str(v)
    for p in study["points"]:
        n = str(p["anchors"])
        lines.append(f"| {n} | {p[f'{RIVAL}/instance']:.3f} | {p[f'{OURS}/instance']:.3f} | {show(eff['instance'][n])} | "
                     f"{p[f'{RIVAL}/semantic']:.3f} | {p[f'{OURS}/semantic']:.3f} | {show(eff['semantic'][n])} |")
    return "\n".join(lines) + "\n"


def plot_anchor_budget(study: Mapping[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [p["anchors"] for p in study["points"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for level, style in (("instance", "-"), ("semantic", "--")):
        for method, marker in ((RIVAL, "o"), (OURS, "s")):
            ax.plot(counts, [p[f"{method}/{level}"] for p in study["points"]], style, marker=marker,
                    label=f"{method}, {level} R@{study['k'][level]}")
    ax.set(xscale="log", xlabel="public anchor pairs", ylabel="recall (mean of both directions)", ylim=(0, 1),
           title=f"anchor budget: {study['scenario']}")
    ax.minorticks_off()  # log-scale minor labels (2x10^1, ...) collide with the anchor counts
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.legend(fontsize=8)
    save_figure(fig, path)
