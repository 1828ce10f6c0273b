"""Cross-modal retrieval on held-out pairs, at instance and semantic level, with chance beside each."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .alignment.gram import feature_cka

KS = (1, 5, 10)


def retrieval(queries: torch.Tensor, gallery: torch.Tensor, query_labels: np.ndarray, gallery_labels: np.ndarray,
              ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@k of row i of ``queries`` finding row i of ``gallery`` (instance) or any same-label row (semantic)."""
    if queries.shape[0] != gallery.shape[0]:
        raise ValueError(f"held-out pairs must align: {queries.shape[0]} queries vs {gallery.shape[0]} gallery items")
    n = queries.shape[0]
    sims = queries.float() @ gallery.float().T
    top = sims.topk(min(max(ks), n), dim=1).indices.numpy()
    truth = np.arange(n)[:, None]
    same = np.asarray(gallery_labels)[top] == np.asarray(query_labels)[:, None]
    hit = top == truth
    out: dict[str, float] = {}
    label_freq = _label_frequency(query_labels, gallery_labels)
    for k in ks:
        k_eff = min(k, n)
        out[f"recall@{k}"] = float(hit[:, :k_eff].any(1).mean())
        out[f"semantic_recall@{k}"] = float(same[:, :k_eff].any(1).mean())
        out[f"chance_recall@{k}"] = k_eff / n
        out[f"chance_semantic_recall@{k}"] = float(np.mean(1.0 - (1.0 - label_freq) ** k_eff))
    return out


def _label_frequency(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    values, counts = np.unique(np.asarray(gallery_labels), return_counts=True)
    freq = dict(zip(values.tolist(), (counts / len(gallery_labels)).tolist()))
    return np.array([freq.get(label, 0.0) for label in np.asarray(query_labels).tolist()])


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean overlap of each item's k nearest neighbours in two representations."""
    k = min(k, x.shape[0] - 1)
    def neighbours(z: torch.Tensor) -> torch.Tensor:
        sims = z.float() @ z.float().T
        sims.fill_diagonal_(float("-inf"))
        return sims.topk(k, dim=1).indices
    nx, ny = neighbours(x), neighbours(y)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nx, ny)]
    return float(np.mean(overlap))


def cross_modal_metrics(embeddings: dict[str, torch.Tensor], labels: dict[str, np.ndarray], ks: Sequence[int] = KS) -> dict[str, float]:
    """Retrieval both ways, CKA and mutual kNN for every pair of modalities."""
    out: dict[str, float] = {}
    names = list(embeddings)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for q, g in ((a, b), (b, a)):
                for key, value in retrieval(embeddings[q], embeddings[g], labels[q], labels[g], ks).items():
                    out[f"{q}->{g}/{key}"] = value
            out[f"{a}~{b}/cka"] = float(feature_cka(embeddings[a].double(), embeddings[b].double()))
            out[f"{a}~{b}/mutual_knn@10"] = mutual_knn(embeddings[a], embeddings[b])
    return out
