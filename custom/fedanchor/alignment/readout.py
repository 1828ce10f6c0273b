"""Anchor CCA readout: a linear map per modality, fitted on the public anchors only, into one shared space.

The trained encoders give each modality a good geometry (private self-supervision,
the CKA term) but not the same coordinates; the cross-modal anchor term pins
coordinates only as far as its few anchor steps reach. Generalised CCA on the
anchor embeddings (MAXVAR form) finds, for every modality m, the map W_m whose
anchor images best agree with one shared N x d configuration G:

    G = top-d eigenvectors of  sum_m H_m,   H_m = X_m (X_m^T X_m + r I)^-1 X_m^T   (ridge hat matrix)
    W_m = (X_m^T X_m + r I)^-1 X_m^T G, columns weighted by sqrt of the mean correlation

With two modalities this is regularised CCA: the eigenvalues of H_1 + H_2 are
1 + rho. It touches public anchors only (the server already embeds them with the
global model to make the anchor targets), so it crosses the network as part of
the global state (docs/DESIGN.md, "What crosses the network", "anchor targets"), costs M x p x d floats
down and nothing up. The same function fits the anchors-only CCA rival of the
bench on raw features, so the rival and the method use one CCA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch


@dataclass
class AnchorReadout:
    """Per modality: the anchor mean (p) and the projection (p x d)."""

    means: dict[str, torch.Tensor]
    projections: dict[str, torch.Tensor]
    correlations: torch.Tensor  # per kept dimension: the mean pairwise correlation of the modalities

    def apply(self, modality: str, z: torch.Tensor) -> torch.Tensor:
        """Items of ``modality`` in the shared space, unit length (the space retrieval is scored in)."""
        if modality not in self.projections:
            raise KeyError(f"the readout was fitted for {sorted(self.projections)}, not {modality!r}")
        proj = self.projections[modality].to(z.device, z.dtype)
        return torch.nn.functional.normalize((z - self.means[modality].to(z.device, z.dtype)) @ proj, dim=-1)


def fit_anchor_readout(anchors: Mapping[str, torch.Tensor], reg: float = 0.1, dims: int | None = None) -> AnchorReadout:
    """Generalised CCA over the modalities' anchor features (rows are the same N anchors in every modality).

    ``reg`` is the ridge on each covariance, relative to its mean eigenvalue; ``dims``
    defaults to N // 2 (at most N - 1).
    """
    if len(anchors) < 2:
        raise ValueError(f"a cross-modal readout needs at least two modalities, got {sorted(anchors)}")
    rows = {m: int(x.shape[0]) for m, x in anchors.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"anchor features must have one row per anchor in every modality, got {rows}")
    if not reg > 0:
        raise ValueError(f"readout ridge reg={reg} must be > 0: with N anchors and p features the covariance is singular when p >= N")
    bad = [m for m, x in anchors.items() if not bool(torch.isfinite(x).all())]
    if bad:
        raise ValueError(f"anchor features of {bad} hold NaN or Inf; a readout needs finite features")
    n = next(iter(rows.values()))
    if n < 3:
        raise ValueError(f"{n} anchors are too few to fit a readout; use at least 3")
    d = int(min(dims or n // 2, n - 1))
    means, solves = {}, {}
    hat = torch.zeros(n, n, dtype=torch.float64)
    for m, x in anchors.items():
        x = x.detach().double().cpu()
        means[m] = x.mean(0)
        xc = x - means[m]
        if xc.shape[1] <= n:
            cov = xc.T @ xc / n
            ridge = reg * cov.diagonal().mean().clamp_min(1e-12)
            solve = torch.linalg.solve(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype), xc.T / n)  # p x N
        else:
            # Wide features (p > N): the same ridge solution in its N x N dual form.
            gram = xc @ xc.T / n
            ridge = reg * gram.diagonal().mean().clamp_min(1e-12)
            solve = xc.T @ torch.linalg.solve(gram + ridge * torch.eye(n, dtype=gram.dtype), torch.eye(n, dtype=gram.dtype)) / n
        solves[m] = solve
        hat += xc @ solve
    values, vectors = torch.linalg.eigh((hat + hat.T) / 2)
    order = torch.argsort(values, descending=True)[:d]
    values, vectors = values[order], vectors[:, order]
    k = len(anchors)
    # Eigenvalue of sum_m H_m = 1 + (k - 1) * mean correlation for whitened blocks; weight each direction by it.
    correlation = ((values - 1) / (k - 1)).clamp_min(0.0)
    weight = correlation.sqrt()
    projections = {m: solves[m] @ vectors * weight for m in anchors}
    return AnchorReadout({m: v.float() for m, v in means.items()}, {m: v.float() for m, v in projections.items()}, correlation.float())
