"""The typicality check: is a site's data as typical of its modality as its peers' data are?

Every estimate a site builds from its own training fades as its self-supervision
learns its noise. What a site's raw items look like does not fade. Each site
computes, once, statistics of every private item and of its own copy of the public
anchors, and sends their means and standard deviations (six or eight numbers; only
with at least ``alignment.codebook_min_cluster`` items, never under differential
privacy):

- **energy**, log of the item's mean squared deviation from its modality's public
  anchors, feature by feature in the anchors' own units (standardised on the
  anchors' mean and spread, base features as the readout sees them). Noise, a gain
  or offset shift, random items move it or its spread over items.
- **roughness**, for images and signals: log of the von Neumann ratio along the last
  axis, the mean squared difference of neighbouring values over their variance. It
  tells structure from its absence: shuffled, noisy or random values are rough,
  blurred ones smooth; no rescaling moves it.
- **coherence**, for text: the mean cosine of neighbouring tokens' contextual states
  through the frozen trunk (model/base_features.py). Words in their order make
  neighbouring states alike; a loader that shuffles words leaves a mean-pooled
  embedding, and so energy, nearly where it was, and lowers coherence.
- **anchor level** and **anchor dispersion**, per anchor of the site's own copy of
  the anchors: log of its mean square, and of its mean squared deviation from the
  copy's mean, base features unstandardised. Energy is read in the site's anchors'
  units, so a corruption in the site's pipeline (a wrong unit, gain or scanner
  setting, a loader that mangles text) that its copy of the anchors passes through
  too moves items and units alike and leaves energy alone. Through a clean pipeline
  the anchors are the server's to the last bit, and so are these two; the level sees
  offsets and gains, the dispersion also what a mean-pooled text embedding shows of
  replaced words. Their standard errors are over the anchors. Public data only:
  they tell nothing of the site's records.

The server weighs each site against the other sites of its modality and against the
public anchors themselves (one more peer, each anchor's energy taken against the
other anchors): a robust z-score of every mean (its spread at least the standard
error of a mean of that many items, or of as many as there are anchors where they
are fewer: the median a site is weighed against is known no better) and of every
log standard deviation (at least its own standard error, counted alike), the
largest of them is the site's z, and its factor is
exp(-max(0, z - ``ALLOWED_Z``)). On motion (3 accelerometer sites of 10 recordings, 6
splits) clean sites reached z 1.1-1.9; noisy, shuffled, blurred and random sites
4.4-11.7, gain-shifted ones 2.4-4.7, and 4.7-5.7 with the gain in their pipeline.

Pure numpy: no model, no FLARE.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

ROUGH_KINDS = ("image", "signal")  # kinds whose items have an ordered last axis
COHERENT_KINDS = ("text",)  # kinds whose items are read in order by the trunk
# Statistics of the site's copy of the anchors (anchor_view), not of its items: their standard errors are over anchors.
ANCHOR_STATISTICS = ("anchor_dispersion", "anchor_level")
# The anchors through a clean pipeline are the server's to the last bit on one machine; a text trunk on another device
# moves their level by far less. A difference under 1% of the level (0.01 in log units), in its mean or its spread over
# the anchors, is none worth a site's say (anchors all of one level, whose spread is 0, would make any bit count).
ANCHOR_TOLERANCE = 0.01
# Clean sites' largest z per split: 1.1-1.9 on motion, up to 1.6 on xray, 0.7-2.6 on digits (188 items a site; a
# clean site there keeps 0.56 of its say at worst); every corruption but a gain shift on motion (2.4-4.7) lies past 4.4.
ALLOWED_Z = 2.0
METRIC_PREFIX = "typicality/"
SCALE_FLOOR = 1e-6  # a feature the anchors hold constant carries nothing: unit scale, as the readout's blocks
LOG_FLOOR = 1e-12
SPREAD_FLOOR = 1e-12  # of a robust spread when every value and floor is 0: identical sites are not apart
_REFERENCE = "\0anchors"  # the reference's key among the peers: no site can be named so


@dataclass(frozen=True)
class Summary:
    """One site's (or the anchors') statistics: mean and standard deviation over items, by statistic name."""

    mean: Mapping[str, float]
    sd: Mapping[str, float]
    items: int

    def metrics(self) -> dict[str, float]:
        """The numbers a site sends, as site metrics."""
        out = {}
        for name in sorted(self.mean):
            out[f"{METRIC_PREFIX}{name}/mean"] = float(self.mean[name])
            out[f"{METRIC_PREFIX}{name}/sd"] = float(self.sd[name])
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], items: int) -> "Summary | None":
        """A site's summary back from its reported metrics; None when it sent none."""
        names = sorted({k[len(METRIC_PREFIX):].rsplit("/", 1)[0] for k in metrics if k.startswith(METRIC_PREFIX)})
        if not names:
            return None
        missing = [f"{METRIC_PREFIX}{n}/{part}" for n in names for part in ("mean", "sd")
                   if f"{METRIC_PREFIX}{n}/{part}" not in metrics]
        if missing:
            raise ValueError(f"typicality metrics come in mean/sd pairs; missing {missing}")
        return cls({n: float(metrics[f"{METRIC_PREFIX}{n}/mean"]) for n in names},
                   {n: float(metrics[f"{METRIC_PREFIX}{n}/sd"]) for n in names}, items)


def anchor_units(anchor_base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the anchors' base features, feature by feature."""
    anchors = _matrix(anchor_base, "anchor base features")
    scale = anchors.std(0)
    scale[scale < SCALE_FLOOR] = 1.0
    return anchors.mean(0), scale


def energy(base: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Per item: log of its mean squared deviation from ``mean`` in units of ``scale``."""
    z = (_matrix(base, "base features") - mean) / scale
    return np.log(np.maximum((z ** 2).mean(1), LOG_FLOOR))


def roughness(items: np.ndarray) -> np.ndarray:
    """Per item: log of the von Neumann ratio along the last axis (mean squared successive difference over the
    variance about the item's own mean along that axis), averaged over the other axes."""
    x = np.asarray(items, dtype=np.float64)
    if x.ndim < 2 or x.shape[-1] < 2:
        raise ValueError(f"roughness needs items with a last axis of 2+ values, got shape {x.shape}")
    steps = (np.diff(x, axis=-1) ** 2).reshape(len(x), -1).mean(1)
    spread = ((x - x.mean(-1, keepdims=True)) ** 2).reshape(len(x), -1).mean(1)
    return np.log(np.maximum(steps, LOG_FLOOR) / np.maximum(spread, LOG_FLOOR))


def anchor_view(anchor_base: np.ndarray) -> dict[str, np.ndarray]:
    """Per anchor of a copy of the anchors: its level, log of its mean square, and its dispersion, log of its mean
    squared deviation from the copy's mean; base features as they are (no standardising: the units are the point)."""
    anchors = _matrix(anchor_base, "anchor base features")
    return {"anchor_level": np.log(np.maximum((anchors ** 2).mean(1), LOG_FLOOR)),
            "anchor_dispersion": np.log(np.maximum(((anchors - anchors.mean(0)) ** 2).mean(1), LOG_FLOOR))}


def statistics_of(kind: str, item_shape: tuple[int, ...]) -> tuple[str, ...]:
    """The statistics a site of ``kind`` with items of ``item_shape`` reports: roughness needs a last axis of 2+,
    coherence a text."""
    rough = kind in ROUGH_KINDS and len(item_shape) >= 1 and item_shape[-1] >= 2
    ordered = ("roughness",) if rough else ("coherence",) if kind in COHERENT_KINDS else ()
    return ("energy", *ordered, *ANCHOR_STATISTICS)


def item_statistics(kind: str, items, base: np.ndarray, anchor_base: np.ndarray,
                    coherence: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every per-item statistic that applies to ``kind`` (``statistics_of`` less the anchors' own), per item;
    ``coherence``: a text's per-item coherence (model/base_features.base_features_and_coherence), which needs the trunk."""
    out = {"energy": energy(base, *anchor_units(anchor_base))}
    names = statistics_of(kind, _item_shape(kind, items))
    if "roughness" in names:
        out["roughness"] = roughness(items)
    if "coherence" in names:
        out["coherence"] = _per_item_coherence(kind, coherence, len(out["energy"]))
    return out


def summarize(per_item: Mapping[str, np.ndarray], per_anchor: Mapping[str, np.ndarray] | None = None) -> Summary:
    """Mean and standard deviation of each statistic; ``items`` counts the items (the anchors' statistics are
    summarised over the anchors, and their count is the server's to know)."""
    sizes = {len(v) for v in per_item.values()}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"a typicality summary needs the same 2+ items under every statistic, got sizes {sorted(sizes)}")
    values = {**per_item, **(per_anchor or {})}
    if min(len(v) for v in values.values()) < 2:
        raise ValueError("a typicality summary needs 2+ anchors under the anchors' statistics")
    return Summary({k: float(np.mean(v)) for k, v in values.items()},
                   {k: float(np.std(v, ddof=1)) for k, v in values.items()}, sizes.pop())


def site_summary(kind: str, items, base: np.ndarray, anchor_base: np.ndarray,
                 coherence: np.ndarray | None = None) -> Summary:
    """What a site sends: its items' statistics against its modality's anchors, and those of its own copy of the
    anchors (``anchor_view``), summarised; ``coherence`` as for ``item_statistics``."""
    return summarize(item_statistics(kind, items, base, anchor_base, coherence), anchor_view(anchor_base))


def anchor_summary(kind: str, anchor_items, anchor_base: np.ndarray, coherence: np.ndarray | None = None) -> Summary:
    """The anchors as one more peer: each anchor's energy against the other anchors' units (an anchor is not
    measured by the units it helped set), its roughness and coherence as any item's."""
    anchors = _matrix(anchor_base, "anchor base features")
    n = len(anchors)
    if n < 3:
        raise ValueError(f"the typicality reference needs at least 3 anchors, got {n}")
    centred = anchors - anchors.mean(0)  # sums of squares about the mean: no precision lost to a large offset
    total, squares = centred.sum(0), (centred ** 2).sum(0)
    mean_without = (total - centred) / (n - 1)
    scale_without = np.sqrt(np.maximum((squares - centred ** 2) / (n - 1) - mean_without ** 2, 0.0))
    scale_without[scale_without < SCALE_FLOOR] = 1.0
    per_item = {"energy": energy(centred, mean_without, scale_without)}  # row i against the other anchors' units
    names = statistics_of(kind, _item_shape(kind, anchor_items))
    if "roughness" in names:
        per_item["roughness"] = roughness(anchor_items)
    if "coherence" in names:
        per_item["coherence"] = _per_item_coherence(kind, coherence, n)
    return summarize(per_item, anchor_view(anchors))


def typicality_z_by_statistic(sites: Mapping[str, Summary], reference: Summary) -> dict[str, dict[str, float]]:
    """Each site's robust z-score per statistic (the larger of its mean's and its spread's), among the sites and the
    reference (every one of them must report the same statistics: the server refuses a site that does not)."""
    peers = {**sites, _REFERENCE: reference}
    names = sorted(reference.mean)
    odd = sorted(site for site, s in sites.items() if sorted(s.mean) != names)
    if odd:
        raise ValueError(f"sites {odd} report other typicality statistics than the anchors' {names}")
    typical_sd = {n: statistics.median(s.sd[n] for s in peers.values()) for n in names}
    z: dict[str, dict[str, float]] = {site: {} for site in sites}
    for name in names:
        of_anchors = name in ANCHOR_STATISTICS
        # A site is weighed against a median the reference helps set, known to the anchors' count only: no site's mean
        # or spread is read more finely than that (a site of 800 reports beside 200 anchors would otherwise be judged
        # at half the reference's own standard error).
        count = {p: reference.items if of_anchors else min(s.items, reference.items) for p, s in peers.items()}
        tolerance = ANCHOR_TOLERANCE if of_anchors else 0.0
        means = _robust_z({p: s.mean[name] for p, s in peers.items()},
                          {p: max(typical_sd[name] / math.sqrt(count[p]), tolerance) for p in peers})
        spreads = _robust_z({p: math.log(max(s.sd[name], tolerance, LOG_FLOOR)) for p, s in peers.items()},
                            {p: 1.0 / math.sqrt(2 * (count[p] - 1)) for p in peers})
        for site in sites:
            z[site][name] = max(means[site], spreads[site])
    return z


def typicality_z(sites: Mapping[str, Summary], reference: Summary) -> dict[str, float]:
    """Each site's largest robust z-score over its statistics (``typicality_z_by_statistic``)."""
    return {site: max(parts.values()) for site, parts in typicality_z_by_statistic(sites, reference).items()}


def typicality_factors(summaries: Mapping[str, Summary], modality_of: Mapping[str, str],
                       reference_of: Callable[[str], Summary], min_sites: int = 3, allowed: float = ALLOWED_Z
                       ) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """(factor, z, z per statistic) of every site of a modality with at least ``min_sites`` reporting sites, judged
    against ``reference_of(modality)`` (asked for those modalities only); sites of other modalities are left out (they
    keep their say)."""
    factors, zs, parts = {}, {}, {}
    for modality in sorted(set(modality_of[s] for s in summaries)):
        sites = {s: summaries[s] for s in sorted(summaries) if modality_of[s] == modality}
        if len(sites) < min_sites:
            continue
        for site, by_statistic in typicality_z_by_statistic(sites, reference_of(modality)).items():
            parts[site] = by_statistic
            zs[site] = max(by_statistic.values())
            factors[site] = math.exp(-max(0.0, zs[site] - allowed))
    return factors, zs, parts


def _robust_z(values: Mapping[str, float], floors: Mapping[str, float]) -> dict[str, float]:
    median = statistics.median(values.values())
    spread = 1.4826 * statistics.median(abs(v - median) for v in values.values())
    return {p: abs(v - median) / max(spread, floors[p], SPREAD_FLOOR) for p, v in values.items()}


def _per_item_coherence(kind: str, coherence: np.ndarray | None, items: int) -> np.ndarray:
    if coherence is None or len(coherence) != items:
        raise ValueError(f"the typicality of {kind} items needs the coherence of each of its {items} items "
                         f"(model/base_features.base_features_and_coherence), got {'none' if coherence is None else len(coherence)}")
    return np.asarray(coherence, dtype=np.float64)


def _item_shape(kind: str, items) -> tuple[int, ...]:
    return tuple(np.shape(items)[1:]) if kind in ROUGH_KINDS else ()


def _matrix(x: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(x, dtype=np.float64)
    if out.ndim != 2 or not len(out):
        raise ValueError(f"{what} must be items x features, got shape {out.shape}")
    return out
