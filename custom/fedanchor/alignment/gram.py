"""Centred, normalised Gram matrices over public anchors, CKA, and the consensus over sites.

For centred kernels scaled to unit Frobenius norm, linear CKA is a plain inner
product: CKA(K, K_k) = <K, K_k>_F. So the unit-norm K that maximises the weighted
CKA to a set of sites is the normalised weighted sum of their kernels, and the
consensus costs one pass over the uploads.
"""
from __future__ import annotations

from typing import Mapping

import torch


def centre(kernel: torch.Tensor) -> torch.Tensor:
    """H K H with H = I - 11^T / N, without forming H."""
    kernel = kernel - kernel.mean(0, keepdim=True)
    return kernel - kernel.mean(1, keepdim=True)


def normalise(kernel: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return kernel / kernel.norm().clamp_min(eps)


def centred_gram(z: torch.Tensor) -> torch.Tensor:
    """The centred Gram matrix of the rows of z, scaled to unit Frobenius norm."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"centred_gram needs an (N >= 2) x p matrix, got shape {tuple(z.shape)}")
    return normalise(centre(z @ z.T))


def cka(k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two kernels over the same items (centred and normalised here)."""
    if k1.shape != k2.shape or k1.ndim != 2 or k1.shape[0] != k1.shape[1]:
        raise ValueError(f"cka needs two square kernels of one shape, got {tuple(k1.shape)} and {tuple(k2.shape)}")
    return (normalise(centre(k1)) * normalise(centre(k2))).sum()


def feature_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between two representations of the same N items."""
    return cka(x @ x.T, y @ y.T)


def upper_triangle(kernel: torch.Tensor) -> torch.Tensor:
    """The upper triangle, diagonal included: what a site uploads (N (N + 1) / 2 values)."""
    n = kernel.shape[0]
    rows, cols = torch.triu_indices(n, n)
    return kernel[rows, cols]


def n_from_upper(length: int) -> int:
    n = int(round(((8 * length + 1) ** 0.5 - 1) / 2))
    if n * (n + 1) // 2 != length:
        raise ValueError(f"{length} values are not the upper triangle of a square matrix")
    return n


def from_upper_triangle(values: torch.Tensor) -> torch.Tensor:
    n = n_from_upper(values.numel())
    rows, cols = torch.triu_indices(n, n)
    kernel = torch.zeros(n, n, dtype=values.dtype, device=values.device)
    kernel[rows, cols] = values
    kernel[cols, rows] = values
    return kernel


def sub_kernel(kernel: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The consensus restricted to a batch of anchors, re-centred and re-normalised."""
    return centred_normalised(kernel[index][:, index])


def centred_normalised(kernel: torch.Tensor) -> torch.Tensor:
    return normalise(centre(kernel))


class GramConsensus:
    """K_bar = normalise(sum_m beta_m normalise(sum_{k in m} w_k K_k)), smoothed by an EMA over rounds.

    Kernels are added as they arrive (one running sum per modality), so the
    server never holds all sites' uploads at once.
    """

    def __init__(self, modality_weights: Mapping[str, float] | None = None, ema: float = 0.5):
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"consensus EMA {ema} must be in [0, 1)")
        self.modality_weights = dict(modality_weights or {})
        self.ema = ema
        self._sums: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, modality: str, kernel: torch.Tensor, weight: float = 1.0) -> None:
        if not weight > 0:
            raise ValueError(f"consensus weight {weight} of a {modality!r} kernel must be positive")
        kernel = centred_normalised(kernel.double())
        if modality in self._sums:
            if self._sums[modality].shape != kernel.shape:
                raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not match {tuple(self._sums[modality].shape)}")
            self._sums[modality] += weight * kernel
            self._weights[modality] += weight
        else:
            self._sums[modality] = weight * kernel
            self._weights[modality] = weight

    @property
    def modalities(self) -> list[str]:
        return list(self._sums)

    def per_modality(self) -> dict[str, torch.Tensor]:
        return {m: normalise(s) for m, s in self._sums.items()}

    def combine(self, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The consensus of what was added, blended with the previous round's consensus."""
        if not self._sums:
            raise ValueError("no kernels were added to the consensus")
        total = sum(self.modality_weights.get(m, 1.0) * k for m, k in self.per_modality().items())
        current = normalise(total)
        if previous is not None and self.ema > 0:
            current = normalise(self.ema * centred_normalised(previous.double()) + (1.0 - self.ema) * current)
        return current.float()

    def reset(self) -> None:
        self._sums.clear()
        self._weights.clear()


def consensus_agreement(gram: torch.Tensor, kernel: torch.Tensor) -> float:
    """<K, K_bar>: the agreement of a centred, normalised anchor Gram with the consensus (1 when they coincide, their
    CKA since both have unit norm); what a site, the server and a site's validation report as cka_to_consensus."""
    return float((gram.double().cpu() * kernel.double().cpu()).sum())
