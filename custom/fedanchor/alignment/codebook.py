"""The private codebook: what each modality's unpaired private data adds to the readout, as cluster centroids.

Linear statistics of private data (covariances, principal axes) add nothing that the
public anchors do not already give, but where the private data lie does: k-means
centroids of many private items trace the modality's manifold far more finely than
a hundred anchors can. So each site clusters the base features of its own private
items, sends the centroids of clusters of at least ``min_cluster`` items (each a mean
over that many records, never one record) with their sizes, the server pools every
site's centroids of a modality into one codebook of at most ``size`` centres, and
the readout reads a ``codebook`` block beside the base features and the model:

    p(x) = softmax(-|P(x) - c_j|^2 / s)     (soft assignment to the centres)
    codebook(x) = [p(x), p(x) C]  or  p(x)  (the assignment, with or without the point it denotes on the manifold)
    codebook(x) = k(x) K^(-1/2),  k_j(x) = exp(-|P(x) - c_j|^2 / s)   (the "kernel" form: Gaussian kernel features
                                            with the centres as landmarks, whitened by their own kernel matrix K)

where P standardises the base features on the anchors and keeps their leading
principal components (public: every party computes it from the anchors), and s is
``temperature`` times the median squared distance of the anchors to the centres.
The readout's cross-validation on the anchors picks the block's form (the temperature
and the map, ``FORMS``), weighs the block, and drops it where it does not help. The
kernel form is a Nystrom approximation of a Gaussian-kernel CCA; its whitening is a
symmetric matrix function of the centres, so every party computes the same one from
the centres and the scale alone.

The same block built from the anchors alone (k-means centres of them, or every anchor
as a centre: ``anchor_codebook``, its size and form chosen by ``choose_anchor_codebooks``
among ``ANCHOR_FORMS``, the kernel form too) is what a consortium gets without
federating: the bench's nonlinear anchors-only rival.
Everything here is numpy: no model, no FLARE.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .readout_choice import BlockStatistics

COMPONENTS = 40  # principal components of the anchors' base features the centres live in
SIZE = 160  # centres per modality after pooling
TEMPERATURE = 0.1  # of the soft assignment, relative to the anchors' median squared distance to the centres
TEMPERATURES = (0.1, 0.2, 0.3, 0.5, 1.0)  # what anchor cross-validation chooses from when the job fixes none
# The kernel form's widths: a kernel feature is not normalised over the centres, so it needs wider ones to overlap.
KERNEL_TEMPERATURES = (0.3, 1.0, 3.0, 10.0, 30.0)
KERNEL_RIDGE = 1e-3  # floor of the landmarks' kernel eigenvalues in the whitening (the kernel's diagonal is 1)
MIN_CLUSTER = 5  # private items a centroid must average before it may leave a site
# The block's maps, by the code that travels with the state (0 and 1 as the older with/without-position flag).
FORM_CODES = {"assignment": 0.0, "assignment+position": 1.0, "kernel": 2.0}
# (temperature, map) of the private codebook's block. The kernel form is left out: on motion's 16 anchors the
# cross-validation chose it on every split and lost held-out recall (docs/DECISIONS.md, "A kernel form").
FORMS = tuple(itertools.product(TEMPERATURES, ("assignment+position", "assignment")))
# The anchor codebook's: every form, the kernel too (every anchor as its landmark: the anchors-only kernel CCA), so
# that the rival is never denied a choice fedanchor has.
ANCHOR_FORMS = FORMS + tuple((t, "kernel") for t in KERNEL_TEMPERATURES)


def forms(temperature: float = 0.0) -> tuple[tuple[float, str], ...]:
    """The private codebook forms anchor cross-validation chooses from: ``FORMS``, or both soft maps at a fixed
    ``temperature`` (> 0)."""
    return FORMS if temperature <= 0 else ((temperature, "assignment+position"), (temperature, "assignment"))


def form_of_code(code: float) -> str:
    """The codebook map a state's form code names; an unknown code is refused (a state of a newer version)."""
    for form, value in FORM_CODES.items():
        if abs(code - value) < 1e-6:
            return form
    raise ValueError(f"codebook form code {code} is unknown (known: {FORM_CODES}); is the state from a newer fedanchor?")


@dataclass
class CodebookProjection:
    """P: base features -> the anchors' standardised leading principal components (fitted on public anchors only)."""

    mean: np.ndarray  # features
    linear: np.ndarray  # features x components

    @classmethod
    def fit(cls, anchor_base: np.ndarray, components: int = COMPONENTS) -> "CodebookProjection":
        x = np.asarray(anchor_base, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"a codebook projection needs anchors x features base features, got shape {x.shape}")
        stats = BlockStatistics.fit(x)  # standardised on the anchors, principal axes: as the readout's blocks
        keep = max(1, min(components, len(x) - 1, stats.axes.shape[1]))
        return cls(stats.mean, stats.axes[:, :keep] / stats.scale[:, None])

    def __call__(self, base: np.ndarray) -> np.ndarray:
        return (np.asarray(base, dtype=np.float64) - self.mean) @ self.linear


def kmeans(points: np.ndarray, k: int, seed: int = 0, weights: np.ndarray | None = None,
           iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(centres, assignment) of Lloyd's k-means with k-means++ seeding, deterministic for a seed; ``weights``
    (one per point, e.g. the sizes of pooled centroids) weigh the means."""
    points = np.asarray(points, dtype=np.float64)
    w = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(points) == 0 or len(w) != len(points):
        raise ValueError(f"k-means needs points and one weight per point, got {len(points)} points, {len(w)} weights")
    rng = np.random.default_rng(seed)
    k = max(1, min(k, len(points)))
    centres = points[rng.choice(len(points), 1, p=w / w.sum())]
    for _ in range(1, k):
        d = squared_distances(points, centres).min(1) * w
        centres = np.vstack([centres, points[rng.choice(len(points), p=d / d.sum() if d.sum() > 0 else None)]])
    for _ in range(iterations):
        assign = squared_distances(points, centres).argmin(1)
        moved = np.array([np.average(points[assign == j], axis=0, weights=w[assign == j]) if (assign == j).any() else centres[j]
                          for j in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return centres, squared_distances(points, centres).argmin(1)


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a ** 2).sum(1)[:, None] - 2.0 * a @ b.T + (b ** 2).sum(1)[None], 0.0)


def site_centroids(projected: np.ndarray, size: int = SIZE, min_cluster: int = MIN_CLUSTER,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, counts) a site may send: k-means of its projected private base features into clusters of
    ``min_cluster`` items or more (at most ``size`` clusters). k-means leaves some clusters smaller: each of those,
    smallest first, is dissolved into the nearest remaining centres, so every item still counts in some centroid
    and none averages fewer than ``min_cluster`` items. Empty arrays when the site holds fewer than that."""
    if min_cluster < 2:
        raise ValueError(f"codebook min_cluster={min_cluster}: a centroid of fewer than 2 items is one record; use >= 2")
    projected = np.asarray(projected, dtype=np.float64)
    k = min(size, len(projected) // min_cluster)
    if k < 1:
        return np.zeros((0, projected.shape[1])), np.zeros(0)
    centres, assign = kmeans(projected, k, seed)
    alive = np.ones(len(centres), dtype=bool)
    while True:
        counts = np.bincount(assign, minlength=len(centres))
        small = np.flatnonzero(alive & (counts < min_cluster))
        if not len(small):
            break
        smallest = small[np.argmin(counts[small])]
        alive[smallest] = False
        moved = assign == smallest
        if moved.any():
            distances = squared_distances(projected[moved], centres)
            distances[:, ~alive] = np.inf
            assign[moved] = distances.argmin(1)
            for j in np.unique(assign[moved]):
                centres[j] = projected[assign == j].mean(0)
    counts = np.bincount(assign, minlength=len(centres)).astype(np.float64)
    return centres[alive], counts[alive]


def pool_centroids(parts: list[tuple[np.ndarray, np.ndarray]], size: int = SIZE, seed: int = 0) -> np.ndarray:
    """One modality's codebook from every site's (centroids, counts): all of them when they are at most ``size``,
    else their k-means weighted by the counts."""
    parts = [(np.asarray(c, dtype=np.float64), np.asarray(n, dtype=np.float64)) for c, n in parts if len(c)]
    if not parts:
        raise ValueError("no site sent codebook centroids for this modality")
    centres = np.concatenate([c for c, _ in parts])
    counts = np.concatenate([n for _, n in parts])
    if len(centres) <= size:
        return centres
    return kmeans(centres, size, seed, weights=counts)[0]


def soft_assignments(projected: np.ndarray, centres: np.ndarray, scale: float) -> np.ndarray:
    """items x centres: softmax of minus the squared distances over ``scale``."""
    logits = -squared_distances(np.asarray(projected, dtype=np.float64), centres) / max(scale, 1e-12)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def assignment_scale(anchor_projected: np.ndarray, centres: np.ndarray, temperature: float = TEMPERATURE) -> float:
    """s: ``temperature`` times the median squared distance of the (public) anchors to the centres."""
    return float(temperature * np.median(squared_distances(np.asarray(anchor_projected, dtype=np.float64), centres)))


def gaussian_kernel(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """exp(-|a_i - b_j|^2 / scale)."""
    return np.exp(-squared_distances(a, b) / max(scale, 1e-12))


def kernel_whitening(centres: np.ndarray, scale: float) -> np.ndarray:
    """K^(-1/2) of the centres' Gaussian kernel matrix, eigenvalues floored at ``KERNEL_RIDGE``: a symmetric matrix
    function, so independent of the eigenvectors' signs and order (a site and the server get the same map)."""
    kernel = gaussian_kernel(centres, centres, scale)
    values, vectors = np.linalg.eigh((kernel + kernel.T) / 2)
    return (vectors / np.sqrt(np.maximum(values, KERNEL_RIDGE))) @ vectors.T


@dataclass
class Codebook:
    """One modality's codebook: the projection, the centres, the scale and the map (``FORM_CODES``); maps base
    features to the readout's ``codebook`` block."""

    projection: CodebookProjection
    centres: np.ndarray  # centres x components
    scale: float
    form: str = "assignment+position"  # "assignment+position": [p, p C]; "assignment": p; "kernel": k K^(-1/2)

    def __post_init__(self) -> None:
        if self.form not in FORM_CODES:
            raise ValueError(f"codebook form {self.form!r} is unknown; use one of {sorted(FORM_CODES)}")
        self._whitening = kernel_whitening(self.centres, self.scale) if self.form == "kernel" else None

    def __call__(self, base: np.ndarray) -> np.ndarray:
        projected = self.projection(base)
        if self._whitening is not None:
            return gaussian_kernel(projected, self.centres, self.scale) @ self._whitening
        p = soft_assignments(projected, self.centres, self.scale)
        return np.hstack([p, p @ self.centres]) if self.form == "assignment+position" else p


def anchor_codebook(projection: CodebookProjection, anchor_base: np.ndarray, centroids: int, temperature: float,
                    form: str, seed: int = 0) -> Codebook:
    """A codebook of the anchors alone: k-means centres of the anchors' projected base features (public), or every
    distinct anchor as a centre when ``centroids`` is the number of anchors (repeated items, such as identical code
    sets, would only repeat a column)."""
    points = projection(anchor_base)
    if centroids >= len(points):
        centres = points[np.sort(np.unique(points, axis=0, return_index=True)[1])]
    else:
        centres = kmeans(points, centroids, seed)[0]
    return Codebook(projection, centres, assignment_scale(points, centres, temperature), form)


# codebooks per modality -> anchor cross-validation score, compared as a tuple (higher: better; readout_choice.form_score)
Score = Callable[[Mapping[str, Codebook]], tuple[float, float]]


def choose_anchor_codebooks(projections: Mapping[str, CodebookProjection], anchor_base: Mapping[str, np.ndarray],
                            score: Score, seed: int = 0) -> tuple[dict[str, Codebook], dict[str, float]]:
    """Every modality's anchor codebook, its number of centres (N/10, N/5, or all N anchors) and form (``ANCHOR_FORMS``)
    chosen by ``score``: (codebooks, what was chosen with its score)."""
    n = len(next(iter(anchor_base.values())))
    best: tuple[float, dict[str, Codebook], dict[str, float]] | None = None
    for centroids, (temperature, form) in itertools.product(sorted({max(2, n // 10), max(2, n // 5), n}), ANCHOR_FORMS):
        books = {m: anchor_codebook(projections[m], x, centroids, temperature, form, seed) for m, x in anchor_base.items()}
        value = score(books)
        if best is None or value > best[0]:
            best = (value, books, {"centroids": centroids, "temperature": temperature,
                                   "form": FORM_CODES[form], "cv_mrr": value[0]})
    assert best is not None  # the grid is never empty
    return best[1], best[2]
