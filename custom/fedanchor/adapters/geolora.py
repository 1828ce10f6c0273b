"""GeoLoRA: a low-rank direction update in a shared basis, with a decoupled magnitude.

For a frozen linear layer W0 (d_out x d_in):

    W_site = diag(m * exp(delta)) . (W0 + U S V^T) / rownorm(W0 + U S V^T)

U and V are orthonormal and global; S (r x r) is the only direction parameter that
sites train, so a weighted mean of cores is exact: U (sum w_k S_k) V^T =
sum w_k U S_k V^T. m is the global per-row magnitude (DoRA); delta is the site's
own log-gain and never leaves the site.

The forward pass never forms W: the row norms of W0 + U S V^T come from W0 V and
U S in O(d_out r^2), so an adapted layer costs one extra rank-r product.
"""
from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F


def orthonormal_basis(weight: torch.Tensor, rank: int, init: str, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """U (d_out x r), V (d_in x r) with orthonormal columns."""
    d_out, d_in = weight.shape
    if rank > min(d_out, d_in):
        raise ValueError(f"GeoLoRA rank {rank} exceeds min(d_out={d_out}, d_in={d_in}); lower adapter.rank")
    if init == "svd":
        u, _, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
        return u[:, :rank].float().contiguous(), vh[:rank].T.float().contiguous()
    if init == "random":
        a = torch.randn(d_out, rank, generator=generator, dtype=torch.float64)
        b = torch.randn(d_in, rank, generator=generator, dtype=torch.float64)
        return torch.linalg.qr(a)[0].float().contiguous(), torch.linalg.qr(b)[0].float().contiguous()
    raise ValueError(f"unknown basis init {init!r}; use 'svd' or 'random'")


class GeoLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` adapted by a shared-basis core S, magnitude m and local log-gain delta."""

    def __init__(self, base: nn.Linear, rank: int, basis_init: str = "svd", generator: torch.Generator | None = None):
        super().__init__()
        weight = base.weight.detach().clone()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        u, v = orthonormal_basis(weight, rank, basis_init, generator)
        self.register_buffer("U", u)
        self.register_buffer("V", v)
        self.register_buffer("row_norm0_sq", (weight.double() ** 2).sum(1).float())
        self.register_buffer("W0V", weight @ v)
        self.register_buffer("VtV", v.T @ v)
        self.S = nn.Parameter(torch.zeros(rank, rank))
        self.m = nn.Parameter(self.row_norm0_sq.sqrt().clone())
        self.delta = nn.Parameter(torch.zeros(self.out_features))
        self.grad_probe: torch.Tensor | None = None
        self.bypass = False  # True: the frozen layer alone (W0), for training-free features

    def set_basis(self, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None = None) -> None:
        """Install a shared basis (after a server-side refresh), of this rank or another; ``s`` is the core in it.

        A new rank replaces S by a new Parameter (an optimiser built before holds the old one); without ``s``
        the core becomes zero, which changes the function unless the caller installs the matching core.
        """
        rank = u.shape[1] if u.ndim == 2 else -1
        if u.shape != (self.out_features, rank) or v.shape != (self.in_features, rank) or rank < 1:
            raise ValueError(f"basis shapes U{tuple(u.shape)}, V{tuple(v.shape)} do not fit this layer: U is "
                             f"{self.out_features} x r and V {self.in_features} x r with the same r >= 1")
        if s is not None and tuple(s.shape) != (rank, rank):
            raise ValueError(f"core shape {tuple(s.shape)} does not match the basis rank {rank}")
        device, dtype = self.weight.device, self.weight.dtype
        u, v = u.to(device, dtype), v.to(device, dtype)
        if rank != self.rank:
            self.U, self.V = u.clone(), v.clone()  # buffers: assigning a tensor to a registered buffer name replaces it
            self.S = nn.Parameter(torch.zeros(rank, rank, device=device, dtype=dtype))
            self.rank = rank
        else:
            self.U.copy_(u)
            self.V.copy_(v)
        self.W0V = self.weight @ self.V
        self.VtV = self.V.T @ self.V
        with torch.no_grad():
            self.S.copy_(s.to(device, dtype) if s is not None else torch.zeros_like(self.S))

    # -- projected basis gradients (DESIGN.md section 2, basis refresh) ----
    def start_gradient_probe(self) -> None:
        """Route the forward through a dense zero matrix P added to the direction, so that after backward
        P.grad is the loss's gradient G with respect to the low-rank update U S V^T (summed over steps)."""
        self.grad_probe = torch.zeros(self.out_features, self.in_features, device=self.weight.device,
                                      dtype=self.weight.dtype, requires_grad=True)

    def stop_gradient_probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G V, G^T U): the projected gradients the server augments the basis with; ends the probe."""
        probe, self.grad_probe = self.grad_probe, None
        if probe is None:
            raise RuntimeError("stop_gradient_probe() without start_gradient_probe()")
        g = probe.grad if probe.grad is not None else torch.zeros_like(probe)
        return (g @ self.V).detach(), (g.T @ self.U).detach()

    def row_norm(self) -> torch.Tensor:
        p = self.U @ self.S  # rows of U S
        sq = self.row_norm0_sq + 2.0 * (self.W0V * p).sum(1) + ((p @ self.VtV) * p).sum(1)
        return sq.clamp_min(1e-12).sqrt()

    def row_scale(self) -> torch.Tensor:
        return self.m * torch.exp(self.delta) / self.row_norm()

    def dense_weight(self) -> torch.Tensor:
        """The effective weight matrix (for export and tests; the forward pass does not need it)."""
        direction = self.weight + self.U @ self.S @ self.V.T
        return self.row_scale()[:, None] * direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return F.linear(x, self.weight, self.bias)
        if self.grad_probe is not None:  # refresh rounds only: the same function, formed densely
            direction = self.weight + self.U @ self.S @ self.V.T + self.grad_probe
            scale = self.m * torch.exp(self.delta) / direction.norm(dim=1).clamp_min(1e-6)
            out = F.linear(x, direction) * scale
            return out if self.bias is None else out + self.bias
        base = F.linear(x, self.weight)
        low_rank = F.linear(F.linear(x, self.V.T), self.U @ self.S)
        out = (base + low_rank) * self.row_scale()
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _matches(name: str, targets: Iterable[str]) -> bool:
    for target in targets:
        if any(ch in target for ch in "*?["):
            if fnmatch.fnmatch(name, target):
                return True
        elif name == target or name.endswith("." + target):
            return True
    return False


def inject_geolora(module: nn.Module, targets: Iterable[str], rank: int, basis_init: str = "svd", seed: int = 0) -> dict[str, GeoLoRALinear]:
    """Replace every ``nn.Linear`` whose qualified name ends with a target by a GeoLoRA layer.

    Returns the adapted layers by qualified name, in module order. Raises if no
    layer matches, since a silently unadapted trunk trains nothing.
    """
    targets = tuple(targets)
    generator = torch.Generator().manual_seed(seed)
    names = [n for n, sub in module.named_modules() if isinstance(sub, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = [n for n, sub in module.named_modules() if isinstance(sub, nn.Linear)][:8]
        raise ValueError(f"adapter.targets {list(targets)} match no linear layer; some linear layers are: {linear}")
    adapted: dict[str, GeoLoRALinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = GeoLoRALinear(getattr(parent, child), rank, basis_init, generator)
        setattr(parent, child, layer)
        adapted[name] = layer
    return adapted


def geolora_layers(module: nn.Module) -> dict[str, GeoLoRALinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, GeoLoRALinear)}


@contextlib.contextmanager
def frozen_base(module: nn.Module) -> Iterator[None]:
    """Within the block, every GeoLoRA layer of ``module`` computes its frozen base layer only."""
    layers = list(geolora_layers(module).values())
    for layer in layers:
        layer.bypass = True
    try:
        yield
    finally:
        for layer in layers:
            layer.bypass = False
