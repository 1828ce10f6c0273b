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


def anchor_info_nce(z: torch.Tensor, targets: torch.Tensor, temperature: float, target_mean: torch.Tensor | None = None,
                    same_input: torch.Tensor | None = None, duplicate_cos: float = 0.999) -> torch.Tensor:
    """Symmetric InfoNCE between a site's anchor embeddings and fixed targets of the same anchors.

    Both sides are centred before the cosine (the batch mean for the site, the
    mean over all anchors for the targets): a pretrained trunk's embeddings share
    one dominant direction (pairwise cosine about 0.7 for MiniLM), which leaves
    the raw logits almost flat. Anchors whose targets coincide (two reports with
    the same code set) are all positives, not false negatives; so are anchors
    whose inputs at this site are identical (``same_input``), which no model
    could tell apart.
    """
    if z.shape != targets.shape:
        raise ValueError(f"anchor embeddings {tuple(z.shape)} and targets {tuple(targets.shape)} differ in shape")
    targets = targets.detach()
    positives = (F.normalize(targets, dim=-1) @ F.normalize(targets, dim=-1).T) > duplicate_cos
    positives |= torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    if same_input is not None:
        positives |= same_input.to(z.device)
    mean = targets.mean(0) if target_mean is None else target_mean.detach()
    return paired_info_nce(z - z.mean(0, keepdim=True), targets - mean, temperature, positives)


def paired_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on the cosine of rows of a and b; ``positives[i, j]`` marks every pair that matches."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    return 0.5 * (_multi_positive(logits, positives) + _multi_positive(logits.T, positives.T))


def _multi_positive(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def two_view_contrastive(z1: torch.Tensor, z2: torch.Tensor, temperature: float, same_input: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent (SimCLR): each item's two views are positives, all other views in the batch negatives.

    Items that are identical (``same_input``: many reports share the code set
    "normal") are positives of each other too; as negatives they would ask the
    model to tell identical inputs apart, which only dropout noise can do.
    """
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    same = same_input.to(z.device) if same_input is not None else torch.eye(n, dtype=torch.bool, device=z.device)
    positives = same.repeat(2, 2) & ~self_mask
    return _multi_positive(logits, positives)
