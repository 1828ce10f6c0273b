"""Differential privacy of a site's upload: clip, add Gaussian noise, account the budget.

What a site uploads (docs/DESIGN.md, "What crosses the network") is a function of its private data: the
change it made to the shared cores, magnitudes and its projector, and its Gram
matrix on the anchors (computed by a model trained on private data). With
``privacy.dp`` each round releases both through the Gaussian mechanism:

    change  -> clip to L2 norm C_u, + N(0, (z C_u)^2) per coordinate
    Gram    -> clip to L2 norm C_g, + N(0, (z C_g)^2) per coordinate

and sends nothing else that depends on private data: precisions become uniform,
the site scalar 1, and the loss metrics stay at the site (n_k is sent, as before).

The guarantee is site-level: (epsilon, delta) for the replacement of the site's
whole private data set, the strongest unit a hospital can name. Replacing the data
can move a clipped vector from one side of the ball to the other, so the L2
sensitivity is 2C and each release is a Gaussian mechanism with noise multiplier
z / 2; two releases per round compose over the rounds. The accounting is done by
Google's maintained ``dp-accounting`` library (Renyi DP accountant), not here.
The noise comes from the operating system's entropy, never from the job's seeds:
noise an attacker can regenerate protects nothing.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Mapping

import torch

RELEASES_PER_ROUND = 2  # the parameter change and the Gram


def clip(vector: torch.Tensor, bound: float) -> torch.Tensor:
    norm = float(vector.double().norm())
    return vector * min(1.0, bound / norm) if norm > 0 else vector


def gaussian_release(vector: torch.Tensor, bound: float, noise_multiplier: float, generator: torch.Generator) -> torch.Tensor:
    """clip(vector, bound) + N(0, (noise_multiplier * bound)^2) on every coordinate."""
    noise = torch.randn(vector.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * bound)
    return (clip(vector.double(), bound) + noise).to(vector.dtype)


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def privatize_change(params: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], bound: float,
                     noise_multiplier: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """received + Gaussian release of (params - received), the change flattened into one vector over all keys."""
    keys = sorted(params)
    missing = [k for k in keys if k not in received]
    if missing:
        raise KeyError(f"no received value to measure the change of {missing[:3]} against")
    change = torch.cat([(params[k].double() - received[k].double()).reshape(-1) for k in keys])
    released = gaussian_release(change, bound, noise_multiplier, generator)
    out, start = {}, 0
    for k in keys:
        n = params[k].numel()
        out[k] = (received[k].double() + released[start:start + n].reshape(params[k].shape)).to(params[k].dtype)
        start += n
    return out


@dataclass
class PrivacySpent:
    epsilon: float
    delta: float
    releases: int
    noise_multiplier: float  # per release, relative to the L2 sensitivity (z / 2)


def privacy_spent(noise_multiplier: float, rounds: int, delta: float) -> PrivacySpent:
    """(epsilon, delta) after ``rounds`` rounds of site-level releases, from dp-accounting's RDP accountant."""
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
    try:
        from dp_accounting import dp_event
        from dp_accounting.rdp import rdp_privacy_accountant
    except ModuleNotFoundError as err:  # pragma: no cover - a dependency of the package
        raise ModuleNotFoundError("privacy.dp needs dp-accounting: pip install 'dp-accounting>=0.4'") from err
    effective = noise_multiplier / 2.0  # sensitivity 2C under replacement of the whole data set
    accountant = rdp_privacy_accountant.RdpAccountant()
    releases = RELEASES_PER_ROUND * rounds
    if releases:
        accountant.compose(dp_event.GaussianDpEvent(effective), count=releases)
    return PrivacySpent(float(accountant.get_epsilon(delta)), delta, releases, effective)
