"""Rank-adaptive basis refresh of GeoLoRA layers (DESIGN.md section 2), in three steps over two rounds.

A fixed basis limits every site to the r x r directions U and V span. Every
``adapter.refresh_every`` (T) rounds the federation moves the basis toward where
the loss wants to go, without ever averaging factors:

1. *gradient round* (round T-2 mod T): besides training S as usual, each site
   accumulates G, the gradient of its loss with respect to the low-rank update
   U S V^T, and sends the projections G V (d_out x r) and G^T U (d_in x r): sums
   over its local steps and samples, never a sample's own.
2. the server averages them and *augments* each layer: U_hat = [U, Q_U] with Q_U an
   orthonormal basis of (I - U U^T) G V, likewise V_hat, and embeds the merged core
   as S_hat = [[S, 0], [0, 0]]. Because U_hat and V_hat start with U and V exactly,
   U_hat S_hat V_hat^T = U S V^T: the function does not change.
3. *augmented round* (round T-1 mod T): sites train the 2r x 2r core in the shared
   augmented basis, so the merge stays exact; the server then *truncates* each
   layer by the SVD S_hat = P diag(sigma) Q^T, keeping the fewest r' singular
   values whose discarded tail has Frobenius norm at most ``tolerance`` x
   ||sigma|| (at most ``rank_max``): U = U_hat P_r', V = V_hat Q_r', S = diag(sigma_r').

Step 3 changes the low-rank update by at most ``tolerance`` of its norm; steps 1
and 2 change nothing. [GeoLoRA, Schotthoefer et al. 2024; FeDLRT, federated
dynamical low-rank training]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PHASES = ("fixed", "gradients", "augmented")


def refresh_phase(round_: int, every: int) -> str:
    """What round ``round_`` does to the basis when it is refreshed every ``every`` rounds (0: never)."""
    if every == 0:
        return "fixed"
    if every < 2:
        raise ValueError(f"adapter.refresh_every={every}: a refresh takes two rounds (gradients, then the augmented core); "
                         "use 0 (fixed basis) or at least 2")
    position = round_ % every
    return "gradients" if position == every - 2 else "augmented" if position == every - 1 else "fixed"


def _extend(basis: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """[basis, Q] with Q orthonormal, orthogonal to ``basis`` and spanning what ``direction`` adds to it."""
    d, r = basis.shape
    extra = min(direction.shape[1], d - r)
    if extra <= 0:
        return basis.clone()
    b, g = basis.double(), direction.double()
    residual = g - b @ (b.T @ g)
    residual = residual - b @ (b.T @ residual)  # twice is enough (Kahan-Parlett)
    # Householder QR of [basis, residual]: its Q is orthonormal even where the residual is zero, and its first r
    # columns span the basis, so the rest is orthogonal to it.
    q, _ = torch.linalg.qr(torch.cat([b, residual[:, :extra]], dim=1))
    return torch.cat([basis, q[:, r:r + extra].to(basis.dtype)], dim=1)


def augment_basis(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, grad_u: torch.Tensor,
                  grad_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_hat, V_hat, S_hat): the bases extended by the projected gradients G V and G^T U, the core embedded.

    U_hat[:, :r] is U and V_hat[:, :r] is V exactly, so U_hat S_hat V_hat^T = U S V^T.
    The augmented rank is min(2r, d_out, d_in): both sides get the same number of new columns.
    """
    r = s.shape[0]
    if u.shape[1] != r or v.shape[1] != r or grad_u.shape != u.shape or grad_v.shape != v.shape:
        raise ValueError(f"augment_basis: U{tuple(u.shape)}, V{tuple(v.shape)}, S{tuple(s.shape)}, G V{tuple(grad_u.shape)}, "
                         f"G^T U{tuple(grad_v.shape)} do not fit together")
    extra = min(r, u.shape[0] - r, v.shape[0] - r)
    u_hat, v_hat = _extend(u, grad_u[:, :extra]), _extend(v, grad_v[:, :extra])
    s_hat = torch.zeros(r + extra, r + extra, dtype=s.dtype)
    s_hat[:r, :r] = s
    return u_hat, v_hat, s_hat


@dataclass(frozen=True)
class Truncation:
    u: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    rank: int
    discarded: float  # ||discarded singular values|| / ||all of them||: the relative change of U S V^T


def truncate(u_hat: torch.Tensor, v_hat: torch.Tensor, s_hat: torch.Tensor, tolerance: float, rank_max: int) -> Truncation:
    """The smallest rank (1..rank_max) whose discarded singular values of S_hat are within ``tolerance`` of its norm."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"adapter.refresh_tolerance={tolerance} must be in [0, 1)")
    if rank_max < 1:
        raise ValueError(f"rank_max={rank_max} must be at least 1")
    p, sigma, qh = torch.linalg.svd(s_hat.double())
    total = float(sigma.square().sum())
    limit = min(rank_max, sigma.numel())
    if total == 0.0:  # nothing trained in the augmented basis: keep its leading columns
        return Truncation(u_hat[:, :limit].clone(), v_hat[:, :limit].clone(), s_hat.new_zeros(limit, limit), limit, 0.0)
    # tail[k] = ||sigma[k:]||^2 for k = 0..n; keep the fewest k with tail[k] <= tolerance^2 * total
    tail = torch.cat([sigma.square().flip(0).cumsum(0).flip(0), sigma.new_zeros(1)])
    rank = int((tail > tolerance ** 2 * total).sum())
    rank = max(1, min(rank, limit))
    dtype = u_hat.dtype
    return Truncation(
        u=(u_hat.double() @ p[:, :rank]).to(dtype).contiguous(),
        v=(v_hat.double() @ qh[:rank].T).to(dtype).contiguous(),
        s=torch.diag(sigma[:rank]).to(s_hat.dtype),
        rank=rank,
        discarded=float(tail[rank].sqrt() / (total ** 0.5)),
    )
