"""The terms of the local objective that touch anchors, and the private two-view term.

    L = L_private + lambda_a (1 - CKA(K_site, K_bar)) + lambda_x L_cross + lambda_d ||delta||^2

CKA cannot see rotations, so the cross-modal InfoNCE term pins coordinates: a
site pulls its anchor embeddings towards the global model's embeddings of the
same anchors in the other modalities (broadcast by the server, fixed during the
round).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .gram import centred_gram, sub_kernel


def cka_loss(z: torch.Tensor, consensus: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """1 - CKA between the batch's Gram and the consensus restricted to the same anchors."""
    return 1.0 - (centred_gram(z) * sub_kernel(consensus.to(z.dtype), index)).sum()


def anchor_info_nce(z: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between a site's anchor embeddings and fixed targets of the same anchors."""
    if z.shape != targets.shape:
        raise ValueError(f"anchor embeddings {tuple(z.shape)} and targets {tuple(targets.shape)} differ in shape")
    logits = z @ targets.detach().T / temperature
    labels = torch.arange(z.shape[0], device=z.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def two_view_contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR): each item's two views are positives, all other views in the batch negatives."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, labels)
