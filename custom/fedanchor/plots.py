"""Pictures of a run: held-out recall, each site's CKA to the consensus and its merge weight, over rounds."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def _directions(evals: Sequence[Mapping[str, float]]) -> list[str]:
    return sorted({k.split("/")[0] for e in evals for k in e if "->" in k.split("/")[0]})


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: Path, title: str = "fedanchor",
                initial_eval: Mapping[str, float] | None = None) -> Path:
    """Write a PNG with three panels; rounds are RoundRecord dicts (in-process results or the FLARE summary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [int(r["round"]) + 1 for r in rounds]
    evals = [r.get("eval", {}) for r in rounds]
    if initial_eval:
        xs, evals = [0] + xs, [dict(initial_eval)] + evals
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for direction in _directions(evals):
        for level, style in (("recall", "-"), ("semantic_recall", "--")):
            for k, marker in ((1, "o"), (10, "s")):
                key = f"{direction}/{level}@{k}"
                ys = [e.get(key, float("nan")) for e in evals]
                ax.plot(xs, ys, style, marker=marker, ms=4, label=f"{direction} {'sem ' if level != 'recall' else ''}R@{k}")
    ax.set(title="held-out recall", xlabel="round", ylabel="recall", ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2)
    sites = sorted({s for r in rounds for s in r.get("site_metrics", {})})
    for site in sites:
        ys = [r.get("site_metrics", {}).get(site, {}).get("cka_to_consensus", float("nan")) for r in rounds]
        axes[1].plot([int(r["round"]) + 1 for r in rounds], ys, marker="o", ms=4, label=site)
        ws = [r.get("site_weights", {}).get(site, float("nan")) for r in rounds]
        axes[2].plot([int(r["round"]) + 1 for r in rounds], ws, marker="o", ms=4, label=site)
    axes[1].set(title="each site's anchor CKA to the consensus", xlabel="round", ylabel="CKA")
    axes[2].set(title="each site's share of the merge", xlabel="round", ylabel="weight", ylim=(0, 1))
    for ax in axes[1:]:
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
