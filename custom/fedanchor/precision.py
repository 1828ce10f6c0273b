"""Per-coefficient precision of a site's update, and the precision-weighted merge.

Default estimate: the inverse variance of the site's local iterates over its last
steps, taken on the step-to-step increments rather than on the raw iterates. A
short local round is far from stationary, so raw iterates mostly drift, and a
site whose gradients agree (clean data) drifts furthest: raw iterate variance
would down-weight the cleanest site. Increments remove the drift and keep the
jitter, which grows with the noise in the site's gradients (with SGD it is
lr^2 times the gradient variance; with Adam, near lr^2 for pure noise and near 0
for a steady direction). The option "fisher" is the diagonal empirical Fisher
(mean squared gradient), which can up-weight a noisy site; "uniform" is FedAvg.

The merge, for every shared coefficient:

    x_bar = sum_k pi_k Lambda_k x_k / sum_k pi_k Lambda_k

is exact in the shared GeoLoRA basis and is accumulated as sites arrive.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping

import numpy as np
import torch

from .alignment.codebook import squared_distances

PRECISION_METHODS = ("iterate_variance", "gradient_variance", "fisher", "uniform")


class PrecisionTracker:
    """Records the last ``window`` iterates (or gradients) of named parameters during local training."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], method: str = "iterate_variance", window: int = 8):
        if method not in PRECISION_METHODS:
            raise ValueError(f"precision method {method!r} is unknown; use one of {PRECISION_METHODS}")
        if window < 2:
            raise ValueError(f"precision window {window} must be at least 2")
        self.params = dict(params)
        self.method = method
        self.window = window
        self._history: dict[str, list[torch.Tensor]] = {k: [] for k in self.params}

    def record(self) -> None:
        """Call after each optimiser step (gradients are still in place)."""
        if self.method == "uniform":
            return
        for name, param in self.params.items():
            if self.method in ("fisher", "gradient_variance"):
                if param.grad is None:
                    continue
                value = param.grad.detach().double()
            else:
                value = param.detach().double().clone()
            history = self._history[name]
            history.append(value.cpu())
            # iterate variance needs window + 1 iterates for window increments
            if len(history) > self.window + 1:
                history.pop(0)

    def precision(self, eps: float = 1e-12) -> dict[str, torch.Tensor]:
        """Lambda per coefficient (float64), not yet scaled by the sample count."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.params.items():
            history = self._history[name]
            if self.method == "uniform":
                out[name] = torch.ones_like(param, dtype=torch.float64, device="cpu")
                continue
            if len(history) < 2:
                raise RuntimeError(f"precision of {name!r} needs at least 2 recorded steps, got {len(history)}; "
                                   "raise train.local_steps or lower precision.window")
            stacked = torch.stack(history)
            if self.method == "fisher":
                out[name] = (stacked ** 2).mean(0) + eps
            elif self.method == "gradient_variance":
                out[name] = 1.0 / (stacked.var(0, unbiased=True) + eps)
            else:
                increments = stacked[1:] - stacked[:-1]
                out[name] = 1.0 / (increments.var(0, unbiased=True) + eps)
        return out


class PrecisionWeightedMerge:
    """Accumulates sum_k w_k x_k and sum_k w_k per coefficient as contributions arrive."""

    def __init__(self) -> None:
        self._num: dict[str, torch.Tensor] = {}
        self._den: dict[str, torch.Tensor] = {}
        # Per site and tensor one number, the weight it put on that tensor: a site's share needs no weight tensor kept,
        # so the round's memory does not grow with the sites.
        self._site_mass: dict[str, dict[str, float]] = {}

    def add(self, site: str, values: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | float) -> None:
        if site in self._site_mass:
            raise ValueError(f"site {site!r} contributed twice to one merge")
        site_mass: dict[str, float] = {}
        for name, value in values.items():
            w = weights if isinstance(weights, (int, float)) else weights[name]
            w = torch.as_tensor(w, dtype=torch.float64).expand(value.shape) if not torch.is_tensor(w) or w.ndim == 0 else w.double()
            if w.shape != value.shape:
                raise ValueError(f"weight of {name!r} from {site!r} has shape {tuple(w.shape)}, value {tuple(value.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"weight of {name!r} from {site!r} is negative or not finite")
            v = value.detach().double().cpu()
            w = w.cpu()
            if name in self._num:
                if self._num[name].shape != v.shape:
                    raise ValueError(f"{name!r} from {site!r} has shape {tuple(v.shape)}, others {tuple(self._num[name].shape)}")
                self._num[name] += w * v
                self._den[name] += w
            else:
                self._num[name] = w * v
                self._den[name] = w.clone()
            site_mass[name] = float(w.sum())
        self._site_mass[site] = site_mass

    @property
    def sites(self) -> list[str]:
        return list(self._site_mass)

    def result(self) -> dict[str, torch.Tensor]:
        if not self._num:
            raise ValueError("nothing to merge: no contribution was added")
        out = {}
        for name, num in self._num.items():
            den = self._den[name]
            if bool((den <= 0).any()):
                raise ValueError(f"merge of {name!r} has zero total weight on some coefficients; no site informs them")
            out[name] = (num / den).float()
        return out

    def site_shares(self) -> dict[str, float]:
        """Each site's share of the weight: its fraction of the total weight on each shared tensor, averaged over the
        tensors (sums to 1 over sites)."""
        totals = {name: float(den.sum()) for name, den in self._den.items()}
        return {site: sum(m / totals[name] for name, m in mass.items()) / len(mass) if mass else 0.0
                for site, mass in self._site_mass.items()}


def sample_weight(n_samples: int, exponent: float) -> float:
    if n_samples < 1:
        raise ValueError(f"a site reported n_samples={n_samples}; it must have trained on at least one sample")
    return float(n_samples) ** exponent


def _sites_by_modality(sites: Mapping[str, float], modality_of: Mapping[str, str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for site in sites:
        groups.setdefault(modality_of[site], []).append(site)
    return list(groups.values())


def peer_factors(losses: Mapping[str, float], modality_of: Mapping[str, str], min_peers: int = 3,
                 relative_floor: float = 0.01) -> dict[str, float]:
    """A check's factor of each site: exp(-max(0, z - 1)), z the robust z-score of the site's score (the anchor
    check's two-view loss, the data check's distance; higher is worse) among the sites of its modality
    ((score - median) / (1.4826 MAD), the spread floored at ``relative_floor`` x |median|). A site within one robust
    spread of its peers keeps factor 1; one far worse loses its say quickly. A modality with fewer than ``min_peers``
    sites cannot tell the odd one out: factor 1. The server's floors (federation/server.py) are 1% for the anchor
    check and 10% for the data check.
    """
    out = {site: 1.0 for site in losses}
    for sites in _sites_by_modality(losses, modality_of):
        if len(sites) < min_peers:
            continue
        values = [losses[s] for s in sites]
        median = statistics.median(values)  # the mean of the middle two for an even count (torch's is the lower one)
        spread = max(1.4826 * statistics.median(abs(v - median) for v in values), relative_floor * abs(median), 1e-12)
        for site, value in zip(sites, values):
            out[site] = math.exp(-max(0.0, (value - median) / spread - 1.0))
    return out


def view_information(loss: float, batch: int) -> float:
    """The information, in nats, that two augmented views of a site's items share under the model, by the InfoNCE
    bound: log(2B - 1) - L, L the site's mean two-view loss over batches of B items (each view picks its partner
    among the 2B - 1 other views). About 0 when the views share nothing the model can use (random items, items
    drowned in noise); floored at 0."""
    if batch < 2:
        raise ValueError(f"view_information needs batches of at least 2 items, got {batch}")
    if not math.isfinite(loss):
        raise ValueError(f"view_information got a two-view loss of {loss}; a site's loss must be finite")
    return max(0.0, math.log(2 * batch - 1) - loss)


# A modality is judged by the information check only once its median site's views share at least this share of
# chance's nats (log(2B - 1)): below it, differences between sites are batch noise (digits pixel sites in a short
# round: 0.03-0.24 nats of 3.43, and the ratio rule took a clean site's say).
INFORMATION_MIN_SHARE = 0.1
# A site keeps its full say down to this share of its modality's median information. Clean motion sites fell to 0.69
# of the median in some rounds (5 rounds x 3 splits), which cost a clean federation 2-3 of 48 rankings against uniform
# weighting; random or noise-drowned sites share 0.05-0.6 of it.
INFORMATION_TOLERANCE = 0.5
# The kinds whose two views move an item (an image shifted by a pixel, a signal rolled in time): random items' views
# then share nothing, so little shared information marks a bad site. A text, codes or vector view keeps most of an item
# in place (words or codes dropped, columns masked), so random items stay easy to match: on xray random reports shared
# 1.15 nats against clean sites' 0.50 and 0.02, and the check took a clean site's say. Those kinds are not judged.
INFORMATION_CHECK_KINDS = ("image", "signal")


def information_factors(information: Mapping[str, float], chance: Mapping[str, float], modality_of: Mapping[str, str],
                        min_peers: int = 3, min_share: float = INFORMATION_MIN_SHARE,
                        tolerance: float = INFORMATION_TOLERANCE) -> dict[str, float]:
    """A site's say from the information its data carries: min(1, I_k / (tolerance x median I of its modality)), I the
    sites' view_information and ``chance`` their log(2B - 1). A site whose views share at least ``tolerance`` of what
    its median peer's do keeps its say (round-to-round spread among clean sites); below, its say falls in proportion.
    A modality keeps factor 1 for every site when it has fewer than ``min_peers`` sites (no peers to compare with) or
    when its median site shares less than ``min_share`` of its median chance (nobody has learned enough yet to be
    told apart from batch noise)."""
    if not 0 < tolerance <= 1:
        raise ValueError(f"information tolerance {tolerance} must lie in (0, 1]: the share of the median a site may fall to")
    out = {site: 1.0 for site in information}
    for sites in _sites_by_modality(information, modality_of):
        if len(sites) < min_peers:
            continue
        median = statistics.median(information[s] for s in sites)
        if median <= 0 or median < min_share * statistics.median(chance[s] for s in sites):
            continue
        for site in sites:
            out[site] = min(1.0, information[site] / (tolerance * median))
    return out


def data_distance(centroids: np.ndarray, counts: np.ndarray, anchor_projected: np.ndarray) -> float:
    """How far a site's private data lies from its modality's public anchors, from what the site already sent: the
    count-weighted mean squared distance of its codebook centroids to their nearest anchor, over the anchors' own
    median squared distance to their nearest other anchor (all in the public codebook projection). Centroids of
    real items sit among the anchors (below 1); noisy, shuffled, rescaled or random items sit apart from them."""
    centroids, counts = np.asarray(centroids, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    anchors = np.asarray(anchor_projected, dtype=np.float64)
    if centroids.ndim != 2 or len(centroids) == 0 or counts.shape != (len(centroids),) or not (counts > 0).all():
        raise ValueError(f"data_distance needs clusters x width centroids and one positive count each, got shapes "
                         f"{centroids.shape} and {counts.shape}")
    if anchors.ndim != 2 or len(anchors) < 2 or anchors.shape[1] != centroids.shape[1]:
        raise ValueError(f"data_distance needs at least 2 projected anchors of width {centroids.shape[1]}, got {anchors.shape}")
    between = squared_distances(anchors, anchors)
    np.fill_diagonal(between, np.inf)
    spacing = max(float(np.median(between.min(1))), 1e-12)
    return float(np.average(squared_distances(centroids, anchors).min(1), weights=counts)) / spacing
