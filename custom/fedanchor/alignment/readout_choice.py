"""Choose the anchor readout by cross-validation on the public anchors: no held-out pair takes part.

A modality's readout input is a concatenation of named feature blocks, row for row
over the same items:

- ``model``: the global model's embedding (what the federation trains);
- ``base``: the modality's training-free features (raw arrays, multi-hot code sets,
  the frozen trunk's mean-pooled text embedding; ``model/base_features.py``);
- ``codebook``: soft assignments to the private codebook's centres (``codebook.py``;
  the bench's anchors-only rival builds one from anchor centroids);
- any other block a caller adds.

Every block is standardised per feature on the anchors (a codebook block as a whole:
scaling each centre's column would blow up the centres few anchors fall near), optionally truncated to its
leading principal components (fitted on the anchors), scaled to unit total variance
and weighted; the ridge CCA of ``readout.py`` is fitted on the result. Standardising,
truncating and weighting are linear, so the chosen readout folds into one affine map
per modality over the concatenated raw blocks: what crosses the network and what a
site applies stays an ``AnchorReadout`` (a mean and a projection per modality).

The block weights, the truncation, the ridge and the number of directions are
picked by k-fold cross-validation over the anchors: fit on k-1 folds, retrieve the
held-out fold's partners among themselves, score the mean reciprocal rank of the
true partner (ties counted half, so identical items never look better than they
are). A readout that reads more than the first block is kept only when it beats the
best readout of the first block alone by more than ``MIN_GAIN_SE`` standard errors
of their paired difference over the same held-out anchors; otherwise the first
block alone is chosen, since a gain inside the noise of the folds is not one to bet
held-out pairs on (a weight grid without 0 has no first-block-only readout to compare
with, and so no such check). Anchors-only rivals use this same function with the base block
alone (or with an anchor codebook), so the rival and fedanchor are tuned the same way.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass, field
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .readout import AnchorReadout, fit_anchor_readout

REGS = (0.01, 0.03, 0.1, 0.3, 1.0)
DIMS = (2, 5, 10, 20, 40, 80)
TRUNCATIONS = (10, 20, 40, 80, 160, 0)  # leading principal components kept of a block; 0 keeps all
WEIGHTS = (0.0, 0.5, 1.0, 2.0)  # of every block after the first; 0 drops it
MIN_FOLD = 3  # anchors a held-out fold needs to rank anything
HELD_OUT_QUERIES = 200  # the k-fold split is repeated (reshuffled) until about this many held-out anchors were ranked
WHOLE_SCALE_BLOCKS = ("codebook",)  # blocks centred but not scaled per feature
# A readout that reads more than the first block must beat the best one on the first block alone by this many
# standard errors of the paired held-out difference (over the anchors): a gain inside the fold noise is not one to
# bet held-out pairs on, and picking the best of hundreds of candidates favours lucky ones.
MIN_GAIN_SE = 1.0


@dataclass
class ReadoutChoice:
    """What cross-validation picked, and how well it did on the held-out folds."""

    weights: dict[str, float]
    truncation: dict[str, int]  # per block: principal components kept (0: all)
    reg: float
    dims: int
    cv_mrr: float  # mean reciprocal rank of the true partner on held-out anchor folds, both directions
    folds: int
    repeats: int = 1  # reshuffled repetitions of the k-fold split
    candidates: int = 0
    # The best richer readout's held-out gain over the best on the first block alone (negative where it did worse),
    # and its standard error over the anchors; reported whether or not the richer one was kept (0, 0: no other block).
    gain: float = 0.0
    gain_se: float = 0.0
    table: list[dict[str, float]] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.pop("table")
        return out


class Candidate(NamedTuple):
    """One readout tried by the cross-validation, with its held-out scores (one per ranking)."""

    mrr: float
    weights: dict[str, float]
    truncation: dict[str, int]
    reg: float
    dims: int
    scores: list[float]


def principal_axes(centred: np.ndarray) -> np.ndarray:
    """features x components, ordered by variance. LAPACK's divide-and-conquer SVD can fail to converge on blocks
    with many repeated columns (soft assignments to near-identical centres); the covariance's eigenvectors, the
    same axes, are the fallback."""
    try:
        return np.linalg.svd(centred, full_matrices=False)[2].T
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(centred.T @ centred)
        keep = min(centred.shape)
        return vectors[:, np.argsort(values)[::-1][:keep]]


@dataclass
class BlockStatistics:
    """A block's anchor statistics: mean, per-feature scale, principal axes."""

    mean: np.ndarray
    scale: np.ndarray
    axes: np.ndarray  # features x components, ordered by variance

    @classmethod
    def fit(cls, x: np.ndarray, per_feature: bool = True) -> "BlockStatistics":
        mean = x.mean(0)
        scale = x.std(0) if per_feature else np.ones(x.shape[1])
        scale[scale < 1e-6] = 1.0  # a constant feature on the anchors carries nothing; keep it finite
        return cls(mean, scale, principal_axes((x - mean) / scale))

    def linear(self, truncation: int, weight: float, anchors: np.ndarray) -> np.ndarray:
        """The features x output map of standardise -> truncate -> unit total variance -> weight (no columns at 0:
        a zero-weight block must not dilute the ridge, which is relative to the mean variance)."""
        if weight == 0:
            return np.zeros((len(self.mean), 0))
        axes = self.axes if truncation <= 0 else self.axes[:, :truncation]
        lin = axes / self.scale[:, None]
        total = float((((anchors - self.mean) @ lin) ** 2).sum(1).mean())
        return lin * (weight / np.sqrt(max(total, 1e-12)))


def _as_numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def check_blocks(blocks: Mapping[str, Mapping[str, object]]) -> tuple[list[str], list[str], int]:
    """(modalities, block names, anchors); every modality must have the same blocks and rows."""
    if len(blocks) < 2:
        raise ValueError(f"a cross-modal readout needs at least two modalities, got {sorted(blocks)}")
    names = [list(b) for b in blocks.values()]
    if any(n != names[0] for n in names) or not names[0]:
        raise ValueError(f"every modality needs the same non-empty feature blocks in the same order, got "
                         f"{ {m: list(b) for m, b in blocks.items()} }")
    rows = {(m, k): int(np.shape(x)[0]) for m, b in blocks.items() for k, x in b.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"every block must hold one row per anchor, got rows {rows}")
    return list(blocks), names[0], next(iter(rows.values()))


def compose(blocks: Mapping[str, Mapping[str, np.ndarray]], stats: Mapping[str, Mapping[str, BlockStatistics]],
            weights: Mapping[str, float], truncation: Mapping[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per modality: (mean, linear map) from the concatenated raw blocks to the weighted CCA input."""
    out = {}
    for m, b in blocks.items():
        means, maps = [], []
        for name, x in b.items():
            s = stats[m][name]
            lin = s.linear(truncation[name], weights[name], x)
            means.append(s.mean)
            maps.append(lin)
        rows = sum(x.shape[0] for x in maps)
        cols = sum(x.shape[1] for x in maps)
        full = np.zeros((rows, cols))
        r = c = 0
        for lin in maps:
            full[r:r + lin.shape[0], c:c + lin.shape[1]] = lin
            r, c = r + lin.shape[0], c + lin.shape[1]
        out[m] = (np.concatenate(means), full)
    return out


def concatenated(blocks: Mapping[str, Mapping[str, object]]) -> dict[str, np.ndarray]:
    """Each modality's blocks side by side: the readout's input."""
    return {m: np.concatenate([_as_numpy(x) for x in b.values()], axis=1) for m, b in blocks.items()}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mean_reciprocal_rank(z: Mapping[str, np.ndarray]) -> list[float]:
    """Per direction and held-out item, 1 / (1 + the rank of its true partner) among the other modality's items."""
    out: list[float] = []
    for a, b in itertools.permutations(z, 2):
        sims = z[a] @ z[b].T
        own = sims.diagonal()[:, None]
        rank = (sims > own + 1e-9).sum(1) + 0.5 * ((np.abs(sims - own) <= 1e-9).sum(1) - 1)
        out += (1.0 / (1.0 + rank)).tolist()
    return out


def _fit(inputs: Mapping[str, np.ndarray], maps: Mapping[str, tuple[np.ndarray, np.ndarray]], rows: np.ndarray,
         reg: float, dims: int) -> AnchorReadout:
    features = {m: torch.from_numpy((inputs[m][rows] - maps[m][0]) @ maps[m][1]) for m in inputs}
    return fit_anchor_readout(features, reg, dims)


class _FoldSpectra(NamedTuple):
    """One fold's training anchors, decomposed once for every ridge: per modality the eigenpairs of the centred
    Gram matrix and the held-out items' kernel against the training anchors, and the trace behind the ridge."""

    values: dict[str, np.ndarray]  # train
    vectors: dict[str, np.ndarray]  # train x train
    test_kernel: dict[str, np.ndarray]  # test x train
    ridge_scale: dict[str, float]  # what ``fit_anchor_readout`` multiplies its reg by


def _fold_spectra(inputs, maps, train, test) -> _FoldSpectra:
    values, vectors, kernels, scales = {}, {}, {}, {}
    for m in inputs:
        x = (inputs[m][train] - maps[m][0]) @ maps[m][1]
        mean = x.mean(0)
        xc = x - mean
        n, p = xc.shape
        gram = xc @ xc.T / n
        values[m], vectors[m] = np.linalg.eigh(gram)
        kernels[m] = ((inputs[m][test] - maps[m][0]) @ maps[m][1] - mean) @ xc.T / n
        # fit_anchor_readout scales its ridge by the mean eigenvalue of the smaller of covariance and Gram.
        scales[m] = max(float(np.trace(gram)) / min(p, n), 1e-12)
    return _FoldSpectra(values, vectors, kernels, scales)


def _score_regs(spectra: _FoldSpectra, regs: Sequence[float], dims: Sequence[int]) -> dict[float, dict[int, list[float]]]:
    """Held-out scores of ``fit_anchor_readout`` for every ridge in ``regs`` and every number of directions in
    ``dims``, from one decomposition per modality: the ridge hat matrix is V diag(s / (s + r)) V^T on the Gram's
    eigenpairs (s, V), and a held-out item's projection is its kernel row times V diag(1 / (s + r)) V^T, so no
    ridge needs a solve of its own."""
    modalities = list(spectra.values)
    n = len(next(iter(spectra.values.values())))
    k = len(modalities)
    d = int(min(max(dims), n - 1))
    out = {}
    for reg in regs:
        hat = np.zeros((n, n))
        inverse = {}
        for m in modalities:
            s, v = spectra.values[m], spectra.vectors[m]
            shrink = 1.0 / (s + reg * spectra.ridge_scale[m])
            inverse[m] = (v * shrink) @ v.T
            hat += (v * (s * shrink)) @ v.T
        values, vectors = np.linalg.eigh((hat + hat.T) / 2)
        order = np.argsort(-values, kind="stable")[:d]
        weight = np.sqrt(np.clip((values[order] - 1) / (k - 1), 0.0, None))
        full = {m: spectra.test_kernel[m] @ inverse[m] @ vectors[:, order] * weight for m in modalities}
        out[reg] = {dd: _mean_reciprocal_rank({m: _unit_rows(x[:, :dd]) for m, x in full.items()}) for dd in dims}
    return out


@contextlib.contextmanager
def _one_thread():
    """The search fits hundreds of small (anchors x anchors) problems: one thread is faster than several, which
    only contend with the training threads beside them (torch's and numpy's BLAS alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def choose_readout(blocks: Mapping[str, Mapping[str, object]], folds: int = 5, seed: int = 0,
                   fixed_reg: float = 0.0, fixed_dims: int = 0, weights: Sequence[float] = WEIGHTS,
                   truncations: Sequence[int] = TRUNCATIONS, regs: Sequence[float] = REGS, repeats: int = 0) -> tuple[AnchorReadout, ReadoutChoice]:
    """The readout over ``blocks`` (modality -> block name -> anchors x features) picked by k-fold CV on the anchors.

    The first block is always kept at weight 1; every later block is weighed from
    ``weights`` (0 drops it). ``fixed_reg`` / ``fixed_dims`` > 0 fix those instead of
    searching them; ``repeats`` > 0 fixes the reshuffled repetitions of the k-fold
    split (0: enough to rank about HELD_OUT_QUERIES held-out anchors). The returned readout maps the concatenated raw blocks
    (``concatenated``) of any item into the shared space.
    """
    with _one_thread():
        return _choose(blocks, folds, seed, fixed_reg, fixed_dims, weights, truncations, regs, repeats)


def _choose(blocks, folds, seed, fixed_reg, fixed_dims, weights, truncations, regs, repeats) -> tuple[AnchorReadout, ReadoutChoice]:
    modalities, names, n = check_blocks(blocks)
    if folds < 2:
        raise ValueError(f"readout cross-validation needs at least 2 folds, got {folds}")
    data = {m: {k: _as_numpy(x) for k, x in blocks[m].items()} for m in modalities}
    for m, b in data.items():
        for k, x in b.items():
            if not np.isfinite(x).all():
                raise ValueError(f"readout block {k!r} of modality {m!r} holds NaN or Inf; a readout needs finite features")
    folds = min(folds, n // MIN_FOLD)
    if folds < 2:
        raise ValueError(f"{n} anchors are too few to cross-validate a readout (at least {2 * MIN_FOLD} are needed)")
    stats = {m: {k: BlockStatistics.fit(x, per_feature=k not in WHOLE_SCALE_BLOCKS) for k, x in b.items()}
             for m, b in data.items()}
    inputs = concatenated(data)
    # Few anchors make folds of a handful of items whose ranks are coarse: repeat the split on fresh shuffles so the
    # choice rests on about HELD_OUT_QUERIES held-out anchors, not on one lucky partition.
    rng = np.random.default_rng(seed)
    splits = []
    repeats = repeats or max(1, -(-HELD_OUT_QUERIES // n))
    for _ in range(repeats):
        order = rng.permutation(n)
        splits += [(np.sort(np.setdiff1d(order, order[f::folds])), np.sort(order[f::folds])) for f in range(folds)]
    n_train = min(len(tr) for tr, _ in splits)
    # The anchor behind each held-out score, in the order the scores are listed (every direction ranks each fold).
    directions = len(modalities) * (len(modalities) - 1)
    queried = np.concatenate([np.tile(test, directions) for _, test in splits])
    regs = (fixed_reg,) if fixed_reg > 0 else tuple(regs)
    dims_grid = (fixed_dims,) if fixed_dims > 0 else tuple(d for d in DIMS if d <= max(1, int(0.8 * n_train))) or (1,)
    # Only the first block is truncated: the others are already compact (an embedding) or small (a codebook).
    widest = max(stats[m][names[0]].axes.shape[1] for m in modalities)
    block_truncations = {k: sorted({t for t in truncations if t == 0 or t < widest}) if k == names[0] else [0] for k in names}
    weight_options = [[1.0]] + [list(weights)] * (len(names) - 1)
    # The best candidate reading the first block alone, and the best reading more: the richer one has to beat the
    # first by more than the noise (MIN_GAIN_SE).
    alone: Candidate | None = None
    richer: Candidate | None = None
    table: list[dict[str, float]] = []
    for ws in itertools.product(*weight_options):
        w = dict(zip(names, ws))
        for ts in itertools.product(*(block_truncations[k] if w[k] > 0 else [0] for k in names)):
            t = dict(zip(names, ts))
            maps = compose(data, stats, w, t)
            by_reg: dict[float, dict[int, list[float]]] = {reg: {d: [] for d in dims_grid} for reg in regs}
            for train, test in splits:
                for reg, per_dims in _score_regs(_fold_spectra(inputs, maps, train, test), regs, dims_grid).items():
                    for d, s in per_dims.items():
                        by_reg[reg][d] += s
            for reg, scores in by_reg.items():
                for d, s in scores.items():
                    mrr = float(np.mean(s))
                    table.append({**{f"weight/{k}": v for k, v in w.items()}, **{f"truncation/{k}": v for k, v in t.items()},
                                  "reg": reg, "dims": d, "cv_mrr": mrr})
                    candidate = Candidate(mrr, w, t, reg, d, s)
                    if all(v == 0 for v in ws[1:]):
                        alone = candidate if alone is None or mrr > alone.mrr + 1e-12 else alone
                    else:
                        richer = candidate if richer is None or mrr > richer.mrr + 1e-12 else richer
    if alone is None and richer is None:
        raise ValueError("readout cross-validation had no candidate to try; check the weight and truncation grids")
    gain, gain_se = (_paired_gain(richer.scores, alone.scores, queried) if alone is not None and richer is not None
                     else (0.0, 0.0))
    best = richer if alone is None or (richer is not None and gain > MIN_GAIN_SE * gain_se) else alone
    mrr, w, t, reg, d = best.mrr, best.weights, best.truncation, best.reg, best.dims
    maps = compose(data, stats, w, t)
    core = _fit(inputs, maps, np.arange(n), reg, d)
    # The weighted features of the anchors have mean zero, so the core's own means vanish: the anchor means of the
    # raw blocks are the whole shift.
    readout = AnchorReadout(
        {m: torch.from_numpy(maps[m][0]).float() for m in modalities},
        {m: torch.from_numpy(maps[m][1] @ core.projections[m].double().numpy()).float() for m in modalities},
        core.correlations)
    choice = ReadoutChoice({k: float(v) for k, v in w.items()}, {k: int(v) for k, v in t.items()}, float(reg), int(d), mrr,
                           folds, repeats, len(table), gain, gain_se, table)
    return readout, choice


def form_score(choice: ReadoutChoice) -> tuple[float, float]:
    """How well a readout did when comparing forms of one block (a codebook's): its cross-validated score, then, to
    break the tie when the block was dropped for every form (each then scores as the first block alone), how close
    it came to being kept: its gain less the gain it needed."""
    return choice.cv_mrr, choice.gain - MIN_GAIN_SE * choice.gain_se


def _paired_gain(scores: Sequence[float], baseline: Sequence[float], anchors: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``scores`` - ``baseline`` (held-out scores listed in the same order, ``anchors``
    naming the anchor behind each). An anchor is ranked once per reshuffle and direction, and those rankings move
    together, so the error is taken over the anchors' mean differences, not over the rankings."""
    diff = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if diff.shape != anchors.shape:
        raise ValueError(f"paired scores need one anchor each: {diff.shape} differences, {anchors.shape} anchors")
    counts = np.bincount(anchors)
    per_anchor = np.bincount(anchors, weights=diff)[counts > 0] / counts[counts > 0]
    if len(per_anchor) < 2:
        return float(diff.mean()) if len(diff) else 0.0, 0.0
    return float(per_anchor.mean()), float(per_anchor.std(ddof=1) / np.sqrt(len(per_anchor)))
