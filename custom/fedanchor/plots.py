"""Pictures of a run: held-out recall, each site's CKA to the consensus and its merge weight, over rounds; and a
2-D map of the held-out embeddings, coloured by modality, with true pairs joined."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write as a 110-dpi PNG (making the folder) and close a matplotlib figure; every picture goes this way."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    return save_figure(fig, path)


def plot_embedding_map(embeddings: Mapping[str, Any], path: Path, title: str = "held-out embeddings",
                       max_pairs: int = 40) -> Path:
    """PCA of every modality's held-out embeddings together (row i of each modality is one true pair).

    Modalities that occupy one region, with short grey lines between partners, are aligned; two separate clouds
    are not, whatever the recall says about a few items.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(embeddings)
    arrays = [np.asarray(embeddings[m].detach().cpu() if hasattr(embeddings[m], "detach") else embeddings[m], dtype=np.float64)
              for m in names]
    if not arrays or any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"embedding map needs one (n, p) array per modality of one width, got {[a.shape for a in arrays]}")
    stacked = np.concatenate(arrays)
    centred = stacked - stacked.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    explained = (s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-300)
    parts = np.split(xy, np.cumsum([len(a) for a in arrays])[:-1])
    fig, ax = plt.subplots(figsize=(6.5, 6))
    n_pairs = min(max_pairs, *(len(a) for a in arrays)) if len(arrays) > 1 else 0
    for i in range(n_pairs):
        ax.plot([p[i, 0] for p in parts], [p[i, 1] for p in parts], color="grey", alpha=0.35, linewidth=0.7, zorder=1)
    for name, part in zip(names, parts):
        ax.scatter(part[:, 0], part[:, 1], s=9, alpha=0.6, label=f"{name} ({len(part)})", zorder=2)
    ax.set(title=f"{title}\nPCA of all modalities together ({explained:.0%} of the variance); "
                 f"grey: {n_pairs} true pairs", xlabel="PC 1", ylabel="PC 2")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
