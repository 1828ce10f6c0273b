"""The server's side of a round: check, accumulate, merge by precision, form the consensus, broadcast.

``FederatedServer`` is what the FLARE Aggregator and the in-process loop both
call. Contributions are folded into running sums as they arrive; nothing is
averaged silently: an update that does not fit is rejected with its reason, and
a round without enough valid sites fails loudly instead of writing a zero model.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import numpy as np
import torch

from ..alignment.codebook import Codebook, CodebookProjection, assignment_scale, pool_centroids
from ..alignment.codebook import FORM_CODES, forms as codebook_forms
from ..alignment.gram import GramConsensus, centred_gram, consensus_agreement, from_upper_triangle, upper_triangle
from ..alignment.losses import two_view_contrastive
from ..alignment.readout import AnchorReadout
from ..alignment.readout_choice import ReadoutChoice, choose_readout, form_score
from ..config import FedAnchorConfig
from ..data.augment import augment
from ..data.scenario import ModalityData, ModalitySpec
from ..evaluation import cross_modal_metrics
from ..model.base_features import base_features_and_coherence
from ..model.homogeneous import HomogeneousTransformer, build_model, take_items
from ..precision import (INFORMATION_CHECK_KINDS, PrecisionWeightedMerge, data_distance, information_factors,
                         peer_factors, sample_weight, view_information)
from ..typicality import Summary, anchor_summary, statistics_of, typicality_factors
from ..adapters.refresh import augment_basis, refresh_phase, truncate
from .messages import (CODEBOOK_PREFIX, CONSENSUS_KEY, READOUT_PREFIX, TARGET_PREFIX, WIRE_STATISTICS, GlobalState, SiteUpdate,
                       adapter_key, is_core_or_magnitude)
from .site import resolve_device, same_items
from .state import core_params, load_shared, projector_params, shared_tensors

log = logging.getLogger(__name__)


class ContributionRejected(ValueError):
    """A site's update failed a check; the round goes on without it."""

    def __init__(self, site: str, reason: str):
        super().__init__(f"update from site {site!r} rejected: {reason}")
        self.site = site
        self.reason = reason


class RoundFailed(RuntimeError):
    """Too few valid contributions to form a global model."""


@dataclass
class RoundReport:
    round: int
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    site_weights: dict[str, float] = field(default_factory=dict)  # share of the precision-weighted merge
    site_uncertainty: dict[str, float] = field(default_factory=dict)
    site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    basis: dict[str, object] = field(default_factory=dict)  # a refresh's phase, each layer's rank, what truncation discarded


def centre_on_anchors(z: torch.Tensor, anchor_z: torch.Tensor) -> torch.Tensor:
    """Embeddings with their modality's anchor mean removed, renormalised: the space retrieval is scored in."""
    return torch.nn.functional.normalize(z - anchor_z.mean(0), dim=-1)


def readout_input(blocks: tuple[str, ...], model_z: torch.Tensor, base: np.ndarray | torch.Tensor | None,
                  codebook: Codebook | None = None) -> torch.Tensor:
    """A modality's readout input: its feature blocks side by side, in the job's order (``alignment.readout_blocks``)."""
    if {"base", "codebook"} & set(blocks) and base is None:
        raise ValueError("this readout reads the base or codebook block: pass the items' base features (model/base_features.py)")
    if "codebook" in blocks and codebook is None:
        raise ValueError("this readout reads the codebook block: pass the modality's codebook (GlobalState.codebooks)")
    parts = {"model": lambda: model_z.double().cpu(), "base": lambda: torch.as_tensor(np.asarray(base), dtype=torch.float64),
             "codebook": lambda: torch.from_numpy(codebook(np.asarray(base)))}
    return torch.cat([parts[k]() for k in blocks], dim=1)


def fit_readout(config: FedAnchorConfig, anchor_z: Mapping[str, torch.Tensor | None],
                anchor_base: Mapping[str, np.ndarray] | None, blocks: tuple[str, ...] | None = None,
                codebooks: Mapping[str, Codebook] | None = None) -> tuple[AnchorReadout, ReadoutChoice]:
    """The anchor readout of a model, chosen by cross-validation on the anchors (alignment/readout_choice.py), over
    ``blocks`` (default: the job's ``alignment.readout_blocks``; the codebook block needs ``codebooks``)."""
    cfg = config.alignment
    sources = {"base": lambda m, z: anchor_base[m], "model": lambda m, z: z,
               "codebook": lambda m, z: codebooks[m](anchor_base[m])}
    parts = {m: {k: sources[k](m, z) for k in blocks or cfg.readout_blocks} for m, z in anchor_z.items()}
    return choose_readout(parts, folds=cfg.readout_folds, seed=config.adapter.seed, fixed_reg=cfg.readout_reg,
                          fixed_dims=cfg.readout_dims, repeats=cfg.readout_repeats)


def to_scoring_space(embeddings: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor],
                     readout: AnchorReadout | None, base: Mapping[str, np.ndarray] | None = None,
                     blocks: tuple[str, ...] = ("model",), codebooks: Mapping[str, Codebook] | None = None) -> dict[str, torch.Tensor]:
    """Embeddings in the space held-out retrieval is scored in: the anchor readout's when the job fits one (over
    ``blocks``: the model's embeddings and, for "base" and "codebook", the items' ``base`` features), else each
    modality's anchor mean removed (the space the cross-modal term trains)."""
    if readout is None:
        return {m: centre_on_anchors(z, anchors[m]) for m, z in embeddings.items()}
    return {m: readout.apply(m, readout_input(blocks, z, (base or {}).get(m), (codebooks or {}).get(m))).float()
            for m, z in embeddings.items()}


FACTOR_FLOOR = 1e-6  # the checks never take a site's weight to 0: the merge stays a weighted mean of positive weights
# A site the data check or the information check left less than half its say adds no centres to the codebook: the
# codebook is built once, so centres of garbage would stay in every later readout.
CODEBOOK_FACTOR_FLOOR = 0.5
# The data check judges a site by at least this many centroids (25 private items at the default cluster floor): one or
# two centroids are means of nearly all a site's items and sit near the anchors' mean whatever the items hold.
DATA_CHECK_MIN_CENTROIDS = 5
# The robust spread's floor, as a share of the peers' median. Anchor check: 1% took a garbage motion site's say on 2
# splits of 3 on older code; on today's code neither 1% nor 10% does (docs/results/README.md, "Precision"). Data
# check: clean digits sites lie within 0.58-0.85 anchor spacings of each other, bad ones at 0.95+.
ANCHOR_CHECK_SPREAD_FLOOR = 0.01
DATA_CHECK_SPREAD_FLOOR = 0.1
# A site one check leaves less than this of its say is left out of the round: its update is not merged and its
# numbers no longer set its peers' median and spread, so the federation is the one without it, to the last bit. The
# typicality check reaches it at z = 4, twice its allowed z: no clean site of the studies came near (largest 2.6). One
# check, not the product of all: two mild doubts about a clean site do not add up to a verdict.
SILENCED_BELOW = math.exp(-2.0)
LEFT_OUT = "checks/left_out"  # the site metric (1) that says the checks left a site out of the round
VOUCHED = "checks/vouched"  # the site metric (1) that says the site keeps its say whatever the checks read (precision.vouched_sites)


def _unit_mean(precision: torch.Tensor) -> torch.Tensor:
    return precision / precision.mean().clamp_min(1e-300)


# What each check says of a site: its factor, then the figures behind it that the round report shows.
_VERDICTS = (("anchor_factors",), ("data_factors",), ("information_factors",),
             ("typicality_factors", "typicality_z", "typicality_z_by_statistic"))


def _judged(factors: Mapping[str, float], modality_of: Mapping[str, str], least: int) -> dict[str, float]:
    """The factors of the sites a check judged: those of modalities with at least ``least`` sites."""
    sites_of = Counter(modality_of[s] for s in factors)
    return {s: f for s, f in factors.items() if sites_of[modality_of[s]] >= least}


class FederatedServer:
    def __init__(self, config: FedAnchorConfig, modalities: Mapping[str, ModalitySpec], anchors: Mapping[str, ModalityData],
                 anchor_fingerprint: str, feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 test: Mapping[str, ModalityData] | None = None, model: HomogeneousTransformer | None = None,
                 device: str | None = None):
        missing = [m for m in modalities if m not in anchors]
        if missing:
            raise ValueError(f"the server needs public anchors in every modality; missing: {missing}")
        self.config = config
        self.modalities = dict(modalities)
        self.anchors = dict(anchors)
        self.n_anchors = len(next(iter(anchors.values())))
        self.anchor_fingerprint = anchor_fingerprint
        self.test = dict(test or {})
        self.device = resolve_device(device or config.train.device)
        self.model = (model or build_model(config, modalities, feature_stats)).to(self.device)
        self.model.eval()
        self._shapes: dict[str, tuple[int, ...]] = {}  # of the shared tensors, from the state each round (ranks may change)
        self._core_keys = set(core_params(self.model))
        self._projector_keys = {m: set(projector_params(self.model, m)) for m in self.modalities}
        self.state: GlobalState | None = None
        self.report: RoundReport | None = None
        self._previous_changes: list[float] = []  # accepted update sizes of the last round: the outlier reference
        self._changes: dict[str, float] = {}  # this round's, by site
        self._left_out: list[str] = []  # the round's accepted sites whose updates _fold left out (silenced)
        self.last_embeddings: dict[str, torch.Tensor] = {}  # the scored held-out embeddings of the last evaluate()
        self.site_bases: dict[str, str] = {}  # site -> digest of the bases its last accepted update trained on
        self.bytes_down: dict[str, int] = {}  # what state_for sent each site in the round it last sent
        self._digest_of: tuple[int, str | None] = (-1, None)  # (round, basis digest) of the state state_for sends
        self._base: dict[str, dict[str, np.ndarray]] = {}  # "anchors"/"test" -> modality -> base features (fixed)
        self._coherence: dict[str, dict[str, np.ndarray | None]] = {}  # the same, each text's coherence (text only)
        self.readout_choice: ReadoutChoice | None = None  # what anchor cross-validation picked for the latest state
        self._choice_round = -1  # the round of the state readout_choice was made for
        self._anchors_only: dict[str, float] | None = None  # anchors_only_eval(), made once
        self._codebook_parts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # modality -> site -> (centroids, counts)
        self.codebook_temperature: float | None = None  # the assignment temperature, once the codebook is built
        self.codebook_form: str | None = None  # the block's map (alignment/codebook.py, FORM_CODES)
        # The anchor check (precision.anchor_check): each site's factor from this round's losses; it weighs this round
        # when the server holds the round's updates (holds_round), else the next.
        self.anchor_factors: dict[str, float] = {}
        # The data check (precision.data_check): each site's factor from the round its centroids arrived on.
        self.data_factors: dict[str, float] = {}
        self.data_distances: dict[str, float] = {}
        self.data_modality: dict[str, str] = {}  # site -> modality of the sites the data check has measured
        # The information check (precision.information_check): each site's factor for this round (held to its end).
        self.information_factors: dict[str, float] = {}
        # The typicality check (precision.typicality_check): every site's latest report (its data do not change, so
        # neither do its numbers: a site that misses a round keeps its place among its peers), and the factors of
        # every site of a modality with enough reporting sites, judged again at each round's end.
        self.typicality_reports: dict[str, tuple[str, Summary]] = {}  # site -> (modality, summary)
        self.typicality_factors: dict[str, float] = {}
        self.typicality_z: dict[str, float] = {}
        self.typicality_z_by_statistic: dict[str, dict[str, float]] = {}  # site -> statistic -> z: what drove its z
        self._typicality_checked: dict[str, Summary] = {}  # what check() read, for accept() to keep
        self._typicality_references: dict[str, Summary] = {}  # modality -> the anchors as a peer, made once
        # Sites the checks left out of the latest judgement (SILENCED_BELOW), with the checks' figures that did it; when
        # the round is not held, they stay out of the next round's merge too.
        self.silenced: dict[str, dict[str, float]] = {}
        self._anchor_losses: dict[str, tuple[str, float]] = {}  # this round's anchor check: site -> (modality, loss)
        self._information: dict[str, tuple[str, float, float]] = {}  # this round's: site -> (modality, nats, chance)

    # -- where the server is ---------------------------------------------------
    def _open_round(self) -> tuple[GlobalState, RoundReport]:
        """The state and report of the round in progress; a call out of order raises (python -O keeps the check)."""
        if self.state is None or self.report is None:
            raise RuntimeError("no round is open: call initial_state() or resume(), then start_round(), before "
                               "accepting or merging updates")
        return self.state, self.report

    # -- round 0 -------------------------------------------------------------
    def initial_state(self) -> GlobalState:
        """The frozen model's state: S = 0, m = rownorm(W0); consensus and targets from the frozen model."""
        embeddings = self._anchor_embeddings()
        consensus = GramConsensus(self.config.alignment.modality_weights, ema=0.0)
        for modality, z in embeddings.items():
            consensus.add(modality, centred_gram(z.double()))
        tensors = shared_tensors(self.model)
        tensors[CONSENSUS_KEY] = upper_triangle(consensus.combine()).to(WIRE_STATISTICS)
        tensors.update(self._codebook_projections())
        tensors.update(self._targets_and_readout(embeddings, 0, {}))
        self.state = GlobalState(round=0, anchor_fingerprint=self.anchor_fingerprint, tensors=tensors)
        return self.state

    def resume(self, state: GlobalState) -> None:
        """Continue from a saved global state (after a server restart)."""
        if state.anchor_fingerprint != self.anchor_fingerprint:
            raise ValueError(f"checkpoint was made with anchor set {state.anchor_fingerprint[:12]}, this job uses "
                             f"{self.anchor_fingerprint[:12]}; resume only with the job that wrote it")
        load_shared(self.model, state.shared_params())
        self.state = state

    def state_for(self, site: str, state: GlobalState | None = None) -> GlobalState:
        """The state to send ``site``: without U and V when its last accepted update trained on these very bases.

        The record is dropped on sending, so a site that fails this round (it lost its bases) gets them whole next
        round; an update it sends re-records them.
        """
        state = state or self.state
        if state is None:
            raise RuntimeError("call initial_state() or resume() before state_for()")
        held = self.site_bases.pop(site, None)
        if self._digest_of[0] != state.round:  # a new round: one digest for it, not one per site, and fresh counts
            self._digest_of = (state.round, state.basis_digest())
            self.bytes_down = {}
        sent = state.without_basis() if held is not None and held == self._digest_of[1] else state
        self.bytes_down[site] = sent.nbytes()
        return sent

    # -- one round -----------------------------------------------------------
    def start_round(self) -> None:
        if self.state is None:
            raise RuntimeError("call initial_state() or resume() before start_round()")
        if self.report is not None and self.report.round == self.state.round - 1:
            self._previous_changes = self.outlier_reference()
        self.report = RoundReport(round=self.state.round)
        self._shapes = {k: tuple(v.shape) for k, v in self.state.shared_params().items()}
        self._phase = refresh_phase(self.state.round, self.config.adapter.refresh_every)
        self._gradient_merge = PrecisionWeightedMerge()  # a refresh's projected gradients, by sample mass
        self._changes = {}
        self._anchor_losses, self._information = {}, {}
        self._merges: dict[str, PrecisionWeightedMerge] = {}  # one per modality: sums, not sites, are held
        self._modality_mass: dict[str, float] = {}
        self._projector_merges: dict[str, PrecisionWeightedMerge] = {}
        self._consensus = GramConsensus(self.config.alignment.modality_weights, ema=self.config.alignment.consensus_ema)
        self._checked_updates: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # site -> (modality, shared params)
        self._anchor_views: dict[str, tuple] = {}  # modality -> (items, view 1, view 2): the same for every site
        self._held: list[SiteUpdate] = []  # accepted, folded at the round's end (holds_round)
        self._left_out = []

    def check(self, update: SiteUpdate) -> float:
        """Raise ContributionRejected with a reason, or return the update's change (``update_change``) if it may count."""
        site = update.site
        _, report = self._open_round()

        def refuse(reason: str) -> None:
            raise ContributionRejected(site, reason)
        if site in report.accepted:
            refuse("it already contributed to this round")
        if update.round != self.state.round:
            refuse(f"it is for round {update.round}, the server is in round {self.state.round}")
        if update.anchor_fingerprint != self.anchor_fingerprint:
            refuse(f"anchor fingerprint {update.anchor_fingerprint[:12]} differs from the job's {self.anchor_fingerprint[:12]}")
        if update.modality not in self.modalities:
            refuse(f"modality {update.modality!r} is not one of {list(self.modalities)}")
        expected = self._core_keys | self._projector_keys[update.modality]
        got = set(update.params)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            refuse(f"parameter keys differ from the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                   f"extra {extra[:3]}{'...' if len(extra) > 3 else ''}")
        if set(update.precision) != self._core_keys:
            refuse("precision keys must be exactly the S and m keys")
        for key, value in list(update.params.items()) + [("precision/" + k, v) for k, v in update.precision.items()]:
            shape = self._shapes[key.removeprefix("precision/")]
            if tuple(value.shape) != shape:
                refuse(f"{key!r} has shape {tuple(value.shape)}, expected {shape}")
            if not value.is_floating_point():
                refuse(f"{key!r} has dtype {value.dtype}, expected a floating type")
            if not bool(torch.isfinite(value).all()):
                refuse(f"{key!r} holds NaN or Inf")
        if any(bool((v <= 0).any()) for v in update.precision.values()):
            refuse("a precision is zero or negative")
        self._check_basis_gradients(update, refuse)
        self._check_codebook(update, refuse)
        if update.gram_upper.numel() != self.n_anchors * (self.n_anchors + 1) // 2:
            refuse(f"Gram upper triangle has {update.gram_upper.numel()} values, expected {self.n_anchors * (self.n_anchors + 1) // 2} "
                   f"for {self.n_anchors} anchors")
        if not bool(torch.isfinite(update.gram_upper).all()):
            refuse("Gram matrix holds NaN or Inf")
        if update.n_samples < 1:
            refuse(f"n_samples={update.n_samples}")
        if not (math.isfinite(update.uncertainty) and update.uncertainty > 0):
            refuse(f"uncertainty scalar {update.uncertainty} is not a positive finite number")
        if self.information_check_enabled() and not math.isfinite(update.metrics.get(self.information_metric(), 0.0)):
            refuse(f"its reported private loss is {update.metrics[self.information_metric()]}; the information check weighs a site "
                   "by it, so it must be finite")
        self._check_typicality(update, refuse)
        self._check_merge_weights(update, refuse)
        cfg = self.config.server
        change = self.update_change(update)
        projector_change = self.update_change(update, projector=True)
        for what, value in (("cores and magnitudes", change), ("projector", projector_change)):
            if value > cfg.max_change:
                refuse(f"its {what} move by {value:.3g} times the global model's norm (limit server.max_change="
                       f"{cfg.max_change:g}): values that no training step produces")
        reference = self._previous_changes + [c for s, c in self._changes.items() if s not in self.silenced]
        if len(reference) >= cfg.outlier_min_reference:
            median = float(np.median(reference))
            if change > cfg.outlier_factor * max(median, 1e-12):
                refuse(f"its change of the cores and magnitudes ({change:.3g}, relative to the global model) is "
                       f"{change / max(median, 1e-12):.1f}x the median of {len(reference)} accepted updates ({median:.3g}); "
                       f"the limit is server.outlier_factor={cfg.outlier_factor:g}")
        return change

    def _check_basis_gradients(self, update: SiteUpdate, refuse) -> None:
        expected = ({adapter_key(k.split("/")[1], side) for k in self._core_keys for side in ("U", "V")}
                    if self._phase == "gradients" else set())
        got = set(update.basis_gradients)
        if got != expected:
            refuse(f"round {self.state.round} is a basis refresh's gradient round: G V and G^T U of every layer are "
                   f"needed (missing {sorted(expected - got)[:2]})" if expected else
                   f"it sends basis gradients in round {self.state.round}, which is not a refresh's gradient round "
                   f"(adapter.refresh_every={self.config.adapter.refresh_every}); is the site's job config the server's?")
        for key, value in update.basis_gradients.items():
            if tuple(value.shape) != self._shapes[key]:
                refuse(f"basis gradient {key!r} has shape {tuple(value.shape)}, expected {self._shapes[key]}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                refuse(f"basis gradient {key!r} is not a finite floating-point array")

    def _check_codebook(self, update: SiteUpdate, refuse) -> None:
        centroids, counts = update.codebook_centroids, update.codebook_counts
        if not counts.numel():
            return
        projections = self.state.codebook_projections()
        if update.modality not in projections:
            refuse("it sends codebook centroids, but this job builds no codebook (alignment.codebook_size=0 or no "
                   "'codebook' in alignment.readout_blocks); is the site's job config the server's?")
        width = projections[update.modality].linear.shape[1]
        if centroids.ndim != 2 or tuple(centroids.shape) != (counts.numel(), width) or counts.ndim != 1:
            refuse(f"codebook centroids have shape {tuple(centroids.shape)} and counts {tuple(counts.shape)}; expected "
                   f"(clusters, {width}) and (clusters,)")
        if not (bool(torch.isfinite(centroids).all()) and bool(torch.isfinite(counts).all())):
            refuse("codebook centroids or counts hold NaN or Inf")
        least = self.config.alignment.codebook_min_cluster
        if bool((counts < least).any()) or bool((counts != counts.round()).any()):
            refuse(f"codebook counts must be whole numbers of at least alignment.codebook_min_cluster={least} items "
                   f"(got {counts.min().item():g}): a smaller cluster's centroid is too close to one record to leave a site")

    def update_change(self, update: SiteUpdate, projector: bool = False) -> float:
        """||update - global|| / ||global|| over the cores and magnitudes (comparable across sites and modalities),
        or over the site's projector."""
        if self.state is None:
            raise RuntimeError("call initial_state() or resume() before update_change()")
        diff = total = 0.0
        for key, value in update.params.items():
            if is_core_or_magnitude(key) != projector:
                base = self.state.tensors[key].double()
                diff += float(((value.double() - base) ** 2).sum())
                total += float((base ** 2).sum())
        return math.sqrt(diff / max(total, 1e-300))

    def _merge_weights(self, update: SiteUpdate) -> tuple[float, float, dict[str, torch.Tensor]]:
        """(a_k n_k ** gamma, a_k pi_k n_k ** gamma, the weight of every core and magnitude coefficient): what accept
        folds in; a_k is the product of the site's checks' factors (1 without them). a_k n_k ** gamma is the site's part
        of its modality's mass: a site the checks take say from counts that much less in its modality's share too, so
        with its say gone the federation is the one without it.

        Lambda's absolute scale follows the optimiser's step size, not the data, so it is not comparable across
        sites: it only distributes a site's weight over its coefficients. pi_k is comparable only between sites of
        one modality (same augmentations, same objective), so it weighs sites within a modality, and the modalities
        are then combined by their mass a_k n_k ** gamma.
        """
        mass = sample_weight(update.n_samples, self.config.precision.sample_exponent) * self.check_factor(update.site)
        scale = update.uncertainty * mass
        weights = {k: scale * _unit_mean(update.precision[k].double()) for k in update.params if is_core_or_magnitude(k)}
        return mass, scale, weights

    def _check_merge_weights(self, update: SiteUpdate, refuse) -> None:
        """Finite, positive values can still weigh to Inf or 0 in float64 (a precision of 1e300, an uncertainty of
        1e-320): the merge would then fail or divide by zero at the end of the round, so such an update is refused."""
        try:
            _, scale, weights = self._merge_weights(update)
        except OverflowError:
            refuse(f"n_samples, a number of {len(str(update.n_samples))} digits, is too large to weigh")
        if not (math.isfinite(scale) and scale > 0):
            refuse(f"its merge weight, uncertainty x n_samples**{self.config.precision.sample_exponent:g} = {scale:.3g}, "
                   "is not a positive finite float64")
        for key, value in update.params.items():
            w = weights.get(key, torch.tensor(scale, dtype=torch.float64))  # a projector weighs by the scale alone
            if not (bool(torch.isfinite(w * value.double()).all()) and bool((w > 0).all())):
                refuse(f"the merge weights of {key!r} overflow or underflow float64 (its precisions or its weight are "
                       "too extreme to weigh)")

    def record_rejection(self, site: str, reason: str) -> None:
        """Record and log a contribution that does not count, also one that never became a SiteUpdate."""
        if self.report is not None:
            self.report.rejected[site] = reason
        log.warning("update from site %r rejected: %s", site, reason)

    def accept(self, update: SiteUpdate) -> None:
        """Check one update and fold it into the running sums, or, while the information check is on, hold it until
        the round's end (its factor comes from the round's own reports)."""
        self._open_round()
        try:
            change = self.check(update)
        except ContributionRejected as err:
            self.record_rejection(update.site, err.reason)
            raise
        self.report.accepted.append(update.site)
        self._changes[update.site] = change
        self.report.site_uncertainty[update.site] = update.uncertainty
        self.report.site_metrics[update.site] = dict(update.metrics)
        if self.holds_round():
            self._held.append(update)
        else:
            self._fold(update)
        if self.anchor_check_enabled():  # scored at the end of the round, once the sites of each modality are known
            self._checked_updates[update.site] = (update.modality, {k: v for k, v in update.params.items() if k in self._shapes})
        self.report.bytes_up[update.site] = update.nbytes()
        if update.basis_digest:
            self.site_bases[update.site] = update.basis_digest
        summary = self._typicality_checked.pop(update.site, None)
        if summary is not None and self.typicality_check_enabled():
            self.typicality_reports[update.site] = (update.modality, summary)
        if update.codebook_counts.numel() and not self.state.has_codebook():
            # Keyed by site: a site sends again each round until the codebook is built, and counts once.
            self._codebook_parts.setdefault(update.modality, {})[update.site] = (
                update.codebook_centroids.double().numpy(), update.codebook_counts.double().numpy())

    def holds_round(self) -> bool:
        """Whether the round's updates wait for its end before they are folded: the information and typicality checks
        judge a site by what it reports with its update, and a check that only weighed the next round would leave a
        garbage site a full say in the first (on motion that round alone cost 0.29 instance R@10 on one split of six)."""
        return self.information_check_enabled() or self.typicality_check_enabled()

    def outlier_reference(self) -> list[float]:
        """The change sizes of the latest round's merged updates: what the next round's outlier check compares with."""
        return [c for site, c in self._changes.items() if site not in self._left_out]

    def _fold(self, update: SiteUpdate) -> None:
        """Add an accepted update to the round's running sums, weighed by the checks' factors as they stand; an update of
        a silenced site is left out."""
        if update.site in self.silenced:
            self.report.site_metrics[update.site].update(self._factor_metrics(update.site))
            self._left_out.append(update.site)
            return
        mass, scale, weights = self._merge_weights(update)
        cores = {k: v for k, v in update.params.items() if is_core_or_magnitude(k)}
        self._merges.setdefault(update.modality, PrecisionWeightedMerge()).add(update.site, cores, weights)
        self._modality_mass[update.modality] = self._modality_mass.get(update.modality, 0.0) + mass
        projector = {k: v for k, v in update.params.items() if not is_core_or_magnitude(k)}
        if projector:
            self._projector_merges.setdefault(update.modality, PrecisionWeightedMerge()).add(update.site, projector, scale)
        self._consensus.add(update.modality, from_upper_triangle(update.gram_upper.double()), scale)
        if update.basis_gradients:
            self._gradient_merge.add(update.site, update.basis_gradients, mass)
        self.report.site_metrics[update.site].update(self._factor_metrics(update.site))

    def finish_round(self, min_sites: int = 1) -> GlobalState:
        """Merge what was accepted into the next global state."""
        self._open_round()
        accepted = len(self.report.accepted)
        if accepted < max(1, min_sites):
            reasons = "; ".join(f"{s}: {r}" for s, r in self.report.rejected.items()) or "no site reported"
            raise RoundFailed(f"round {self.state.round}: {accepted} valid contribution(s), at least {max(1, min_sites)} needed "
                              f"({reasons}); the global model is left unchanged")
        self._judge_sites()
        held, self._held = self._held, []
        for update in held:
            self._fold(update)
        if len(self._left_out) == accepted:  # min_sites counts the sites heard from, as FLARE's min_clients does
            raise RoundFailed(f"round {self.state.round}: the checks left out every site that contributed "
                              f"({self._left_out}; their figures are in the log above), so nothing is left to merge; the "
                              "global model is left unchanged")
        tensors = dict(self.state.tensors)
        total_mass = sum(self._modality_mass.values())
        merged: dict[str, torch.Tensor] = {}
        for modality, merge in self._merges.items():
            share = self._modality_mass[modality] / total_mass
            for key, value in merge.result().items():
                merged[key] = merged.get(key, 0.0) + share * value.double()
            for site, site_share in merge.site_shares().items():
                self.report.site_weights[site] = share * site_share
        self.report.site_weights.update(dict.fromkeys(self._left_out, 0.0))
        tensors.update({k: v.float() for k, v in merged.items()})
        for merge in self._projector_merges.values():
            tensors.update(merge.result())
        tensors.update(self._refresh_basis(tensors))
        load_shared(self.model, {k: v for k, v in tensors.items() if k.startswith(("adapter/", "projector/"))})
        anchors = self._anchor_embeddings()
        broken = [m for m, z in anchors.items() if not bool(torch.isfinite(z).all())]
        if broken:
            load_shared(self.model, self.state.shared_params())  # keep serving the last good model
            raise RoundFailed(f"round {self.state.round}: the merged model embeds the {broken} anchors as NaN/Inf "
                              f"(contributions of {self.report.accepted}); the global model is left unchanged")
        previous = from_upper_triangle(self.state.tensors[CONSENSUS_KEY].double()) if CONSENSUS_KEY in self.state.tensors else None
        tensors[CONSENSUS_KEY] = upper_triangle(self._consensus.combine(previous)).to(WIRE_STATISTICS)
        tensors.update(self._build_codebooks())
        codebooks = GlobalState(self.state.round + 1, self.anchor_fingerprint, tensors).codebooks()
        tensors.update(self._targets_and_readout(anchors, self.state.round + 1, codebooks))
        self.state = GlobalState(round=self.state.round + 1, anchor_fingerprint=self.anchor_fingerprint, tensors=tensors)
        log.info("round %d merged from %s (weights %s)", self.report.round, self.report.accepted,
                 {s: round(w, 3) for s, w in self.report.site_weights.items()})
        return self.state

    def _refresh_basis(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Augment the bases after a gradient round, truncate them after an augmented one (adapters/refresh.py)."""
        self._open_round()
        if self._phase == "fixed":
            return {}
        cfg = self.config.adapter
        layers = sorted({k.split("/")[1] for k in self._core_keys})
        out: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        discarded: dict[str, float] = {}
        gradients = self._gradient_merge.result() if self._phase == "gradients" else {}
        for layer in layers:
            u, v, s = (tensors[adapter_key(layer, part)] for part in ("U", "V", "S"))
            if self._phase == "gradients":
                u, v, s = augment_basis(u, v, s, gradients[adapter_key(layer, "U")], gradients[adapter_key(layer, "V")])
            else:
                cut = truncate(u, v, s, cfg.refresh_tolerance, cfg.rank_max or cfg.rank)
                u, v, s = cut.u, cut.v, cut.s
                discarded[layer] = cut.discarded
            out.update({adapter_key(layer, "U"): u, adapter_key(layer, "V"): v, adapter_key(layer, "S"): s})
            ranks[layer] = int(s.shape[0])
        self.report.basis = {"phase": self._phase, "ranks": ranks}
        if discarded:
            self.report.basis["discarded"] = discarded
        log.info("round %d: basis %s, ranks %s%s", self.report.round,
                 "augmented by the sites' projected gradients" if self._phase == "gradients" else "truncated",
                 sorted(set(ranks.values())),
                 f", at most {max(discarded.values()):.3f} of a core's norm discarded" if discarded else "")
        return out

    # -- the checks that weigh sites against their peers ---------------------------
    def check_factor(self, site: str) -> float:
        """What the anchor, data, information and typicality checks leave of a site's say (1: all of it, and always for a
        site the consortium vouches for)."""
        if site in self.config.precision.vouched_sites:
            return 1.0
        return max(FACTOR_FLOOR, self.anchor_factors.get(site, 1.0) * self.data_factors.get(site, 1.0)
                   * self.information_factors.get(site, 1.0) * self.typicality_factors.get(site, 1.0))

    def _factor_metrics(self, site: str) -> dict[str, float]:
        """The checks' figures behind a site's weight this round, for the round report and the trackers; for a silenced
        site, those that left it out, and LEFT_OUT = 1."""
        if site in self.silenced:
            return {**self.silenced[site], LEFT_OUT: 1.0}
        out = {VOUCHED: 1.0} if site in self.config.precision.vouched_sites else {}
        if self.anchor_check_enabled():
            out["anchor_check/factor"] = self.anchor_factors.get(site, 1.0)
        if site in self.data_distances:
            out.update({"data_check/distance": self.data_distances[site], "data_check/factor": self.data_factors.get(site, 1.0)})
        if site in self.information_factors:
            out["information_check/factor"] = self.information_factors[site]
        if site in self.typicality_factors:
            out.update({"typicality_check/z": self.typicality_z[site], "typicality_check/factor": self.typicality_factors[site],
                        **{f"typicality_check/z/{name}": z for name, z in self.typicality_z_by_statistic[site].items()}})
        return out

    def anchor_check_enabled(self) -> bool:
        return self.config.precision.anchor_check and self.config.precision.method != "uniform"

    def information_check_enabled(self) -> bool:
        return self.config.precision.information_check and self.config.precision.method != "uniform"

    def information_metric(self) -> str:
        """The site metric the information check reads (precision.information_reading)."""
        return "loss/private_received" if self.config.precision.information_reading == "received" else "loss/private"

    def typicality_check_enabled(self) -> bool:
        return self.config.precision.typicality_check and self.config.precision.method != "uniform"

    def data_check_enabled(self) -> bool:
        return self.config.precision.data_check and self.config.precision.method != "uniform" and self.codebook_enabled()

    def _judge_sites(self) -> None:
        """The round's checks: measure what this round brought (anchor losses, data distances, view information), then
        weigh every site against the peers of its modality. A site one check leaves under SILENCED_BELOW of its say is
        silenced, the worst first and one at a time, and the others are weighed again without it: its numbers no
        longer set its peers' median and spread. Every check needs anchor_check_min_sites sites, so each judged
        modality keeps at least that many less one; a site a check had already left under SILENCED_BELOW keeps that
        verdict when its peers are now too few to judge it again, since a check that cannot judge has not cleared it
        (else a clean peer silenced first by one check would free a bad site another check had found). A site in
        precision.vouched_sites is measured and judged like any other, but never silenced."""
        self._measure_anchor_check()
        self._measure_data_check()
        self._measure_information()
        self.silenced = {}
        earlier: dict[str, dict] | None = None
        while True:
            self._weigh_sites(exclude=self.silenced)
            if earlier is not None:
                self._keep_verdicts_of_the_unjudged(earlier)
            earlier = {name: dict(getattr(self, name)) for check in _VERDICTS for name in check}
            checks = [getattr(self, name) for name, *_ in _VERDICTS]
            factors = {s: min(c.get(s, 1.0) for c in checks) for s in sorted(set().union(*checks))
                       if s not in self.silenced and s not in self.config.precision.vouched_sites}
            worst = min(factors, key=factors.get, default=None)
            if worst is None or factors[worst] >= SILENCED_BELOW:
                break
            self.silenced[worst] = self._factor_metrics(worst)
        self._log_checks()

    def _keep_verdicts_of_the_unjudged(self, earlier: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back each check's verdict of the pass before on a site it left under SILENCED_BELOW and could not judge
        again (its modality fell under anchor_check_min_sites once a peer was silenced). A milder verdict is not kept:
        it was read beside the silenced peer, whose numbers may have set it."""
        for factors, *figures in _VERDICTS:
            now = getattr(self, factors)
            for site, factor in earlier[factors].items():
                if factor < SILENCED_BELOW and site not in now and site not in self.silenced:
                    now[site] = factor
                    for name in figures:
                        getattr(self, name)[site] = earlier[name][site]

    def _weigh_sites(self, exclude: Collection[str] = ()) -> None:
        """Every check's factors over the sites not in ``exclude``: the anchor and information checks from this round's
        measurements (none: nobody is judged by them), the data and typicality checks from every site they ever
        measured (its data do not change). A modality left with fewer than anchor_check_min_sites sites is not judged."""
        least = self.config.precision.anchor_check_min_sites
        if self.anchor_check_enabled():
            kept = {s: v for s, v in self._anchor_losses.items() if s not in exclude}
            modality_of = {s: m for s, (m, _) in kept.items()}
            self.anchor_factors = _judged(peer_factors({s: loss for s, (_, loss) in kept.items()}, modality_of, least,
                                                       relative_floor=ANCHOR_CHECK_SPREAD_FLOOR), modality_of, least)
        kept = {s: d for s, d in self.data_distances.items() if s not in exclude}
        self.data_factors = _judged(peer_factors(kept, self.data_modality, least, relative_floor=DATA_CHECK_SPREAD_FLOOR),
                                    self.data_modality, least)
        kept = {s: v for s, v in self._information.items() if s not in exclude}
        modality_of = {s: m for s, (m, _, _) in kept.items()}
        self.information_factors = _judged(information_factors({s: nats for s, (_, nats, _) in kept.items()},
                                                               {s: chance for s, (_, _, chance) in kept.items()},
                                                               modality_of, least), modality_of, least)
        self.judge_typicality(exclude)

    def _log_checks(self) -> None:
        round_ = self.report.round
        if self._anchor_losses:
            log.info("round %d anchor check: two-view loss on the anchors %s -> factors %s", round_,
                     {s: round(v, 3) for s, (_, v) in self._anchor_losses.items()},
                     {s: round(f, 3) for s, f in self.anchor_factors.items()})
        if self.data_factors:
            log.info("round %d data check: distance of the sites' centroids from the anchors %s -> factors %s", round_,
                     {s: round(v, 3) for s, v in self.data_distances.items()}, {s: round(f, 3) for s, f in self.data_factors.items()})
        if self._information:
            log.info("round %d information check: nats the two views of each site's items share %s -> this round's "
                     "factors %s", round_, {s: round(v, 3) for s, (_, v, _) in self._information.items()},
                     {s: round(f, 3) for s, f in self.information_factors.items()})
        if self.typicality_z:
            log.info("round %d typicality check: how far each site's data lie from its peers' and the anchors' (robust "
                     "z) %s -> factors %s", round_, {s: round(z, 2) for s, z in self.typicality_z.items()},
                     {s: round(f, 3) for s, f in self.typicality_factors.items()})
        for site in self.config.precision.vouched_sites:
            if site not in self.report.accepted:
                log.warning("round %d: precision.vouched_sites names %r, which sent no accepted update this round (heard "
                            "from: %s); if the name is misspelt, the voucher does nothing", round_, site,
                            ", ".join(self.report.accepted))
                continue
            doubts = {k: round(v, 3) for k, v in self._factor_metrics(site).items() if k.endswith("/factor") and v < 1.0}
            if doubts:
                log.info("round %d: site %r keeps its whole say, vouched for by precision.vouched_sites, though the "
                         "checks read %s", round_, site, doubts)
        for site, figures in self.silenced.items():
            log.warning("round %d: site %r is left out of the round, its update not merged: a check left it under %.3f "
                        "of its say (%s); its peers were judged again without it", round_, site, SILENCED_BELOW,
                        ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))

    def _measure_anchor_check(self) -> None:
        """Score the round's updates of every modality with enough sites on its anchors: the anchor check's losses,
        which weigh this round when its updates are held (holds_round), else the next. A modality with fewer sites is
        not scored: no odd one out can be told there."""
        if not self._checked_updates:
            return
        sites_of = Counter(modality for modality, _ in self._checked_updates.values())
        least = self.config.precision.anchor_check_min_sites
        self._anchor_losses = {site: (modality, self.anchor_check(modality, params))
                               for site, (modality, params) in self._checked_updates.items() if sites_of[modality] >= least}
        self._checked_updates = {}
        for site, (_, loss) in self._anchor_losses.items():
            self.report.site_metrics[site]["anchor_check/loss"] = loss

    @torch.no_grad()
    def anchor_check(self, modality: str, params: Mapping[str, torch.Tensor]) -> float:
        """A site's two-view loss on public anchors of its modality, with its shared ``params`` applied to the global
        model: the same anchors and augmentations for every site of the round, so that the sites' losses compare."""
        items, *views = self._anchor_check_views(modality)
        load_shared(self.model, params)
        try:
            z1, z2 = (self.model.embed_all(modality, v).float() for v in views)
            return float(two_view_contrastive(z1, z2, self.config.private.temperature, same_items(items)))
        finally:
            load_shared(self.model, self.state.shared_params())

    def _measure_data_check(self) -> None:
        """While sites send codebook centroids: how far each site's data lies from its modality's public anchors
        (precision.data_distance), weighed against the other sites of the modality by the same robust z-score as the
        anchor check. The data do not change, so neither does the distance: it weighs every later round. A site with
        fewer than DATA_CHECK_MIN_CENTROIDS centroids is not judged (its sample mass already keeps its say small)."""
        if not (self.data_check_enabled() and self._codebook_parts):
            return
        projections = self.state.codebook_projections()
        anchors = self.base_of("anchors")
        for modality, parts in self._codebook_parts.items():
            projected = projections[modality](anchors[modality])
            for site, (centroids, counts) in parts.items():
                if len(counts) >= DATA_CHECK_MIN_CENTROIDS:
                    self.data_distances[site] = data_distance(centroids, counts, projected)
                    self.data_modality[site] = modality
        for site in self.report.accepted:
            if site in self.data_distances:
                self.report.site_metrics[site]["data_check/distance"] = self.data_distances[site]

    def _check_typicality(self, update: SiteUpdate, refuse) -> None:
        """A site's typicality numbers, when it sends them: never under DP, over at least
        alignment.codebook_min_cluster items, the statistics its modality's kind has, in mean/sd pairs of finite numbers
        (sd >= 0). What passes is kept for accept()."""
        self._typicality_checked.pop(update.site, None)
        try:
            summary = Summary.from_metrics(update.metrics, update.n_samples)
        except ValueError as err:
            refuse(str(err))
        if summary is None:
            return
        if self.config.privacy.dp:
            refuse("it sends typicality numbers under differential privacy, which releases no statistic of private data")
        floor = self.config.alignment.codebook_min_cluster
        if summary.items < floor:
            refuse(f"it sends typicality numbers over {summary.items} private items; a site sends them only with at "
                   f"least alignment.codebook_min_cluster={floor}")
        spec = self.modalities[update.modality]
        expected = sorted(statistics_of(spec.kind, tuple(spec.shape)))
        if sorted(summary.mean) != expected:
            refuse(f"it sends the typicality statistics {sorted(summary.mean)}; a {spec.kind} site sends {expected}")
        values = list(summary.mean.values()) + list(summary.sd.values())
        if not all(math.isfinite(v) for v in values) or min(summary.sd.values()) < 0:
            refuse(f"its typicality numbers {summary.metrics()} must be finite, with spreads >= 0")
        self._typicality_checked[update.site] = summary

    def judge_typicality(self, exclude: Collection[str] = ()) -> None:
        """The typicality factors of the reports held, over the sites not in ``exclude`` (also what a resumed server
        does with the reports and the silenced sites it kept). Every site that ever reported is judged against the other
        sites of its modality and the modality's anchors; a modality with fewer than anchor_check_min_sites reporting
        sites is not judged."""
        kept = {s: report for s, report in self.typicality_reports.items() if s not in exclude}
        factors, zs, parts = typicality_factors({s: summary for s, (_, summary) in kept.items()},
                                                {s: m for s, (m, _) in kept.items()}, self._typicality_reference,
                                                self.config.precision.anchor_check_min_sites)
        self.typicality_factors = factors
        self.typicality_z = zs
        self.typicality_z_by_statistic = parts

    def _typicality_reference(self, modality: str) -> Summary:
        """The modality's anchors as one more peer of the typicality check: public, so computed here, once."""
        if modality not in self._typicality_references:
            self._typicality_references[modality] = anchor_summary(
                self.modalities[modality].kind, self.anchors[modality].items, self.base_of("anchors")[modality],
                self._coherence["anchors"][modality])
        return self._typicality_references[modality]

    def _measure_information(self) -> None:
        """From the private losses the round's held updates report: how much each site's two views share
        (precision.view_information), weighed against the median of its modality (precision.information_factors) in
        this very round (holds_round). A site that sent no private loss (under DP), whose batches hold fewer than 2
        items, alone with fewer than anchor_check_min_sites sites of its modality, or of a kind whose views keep an item
        in place (text, codes, vectors: INFORMATION_CHECK_KINDS), is not judged and keeps its say."""
        if not self.information_check_enabled():  # the round may be held for the typicality check alone
            return
        reading = self.information_metric()
        reported = [u for u in self._held if reading in u.metrics and u.n_samples >= 2
                    and self.modalities[u.modality].kind in INFORMATION_CHECK_KINDS]
        sites_of = Counter(u.modality for u in reported)
        for update in reported:
            if sites_of[update.modality] >= self.config.precision.anchor_check_min_sites:
                batch = min(self.config.train.batch_size, update.n_samples)
                nats = view_information(update.metrics[reading], batch)
                self._information[update.site] = (update.modality, nats, math.log(2 * batch - 1))
                self.report.site_metrics[update.site]["information_check/nats"] = nats

    def _anchor_check_views(self, modality: str) -> tuple:
        """(anchors, view 1, view 2) the round's anchor check embeds for ``modality``: drawn once per round."""
        if modality not in self._anchor_views:
            cfg = self.config
            anchors, spec = self.anchors[modality], self.modalities[modality]
            rng = np.random.default_rng([cfg.train.seed, self.state.round, 17])
            index = rng.choice(len(anchors), size=min(cfg.precision.anchor_check_items, len(anchors)), replace=False)
            items = take_items(anchors.items, index)
            self._anchor_views[modality] = (items, *(augment(spec, items, rng, cfg.private.augment_strength) for _ in range(2)))
        return self._anchor_views[modality]

    # -- the private codebook --------------------------------------------------
    def codebook_enabled(self) -> bool:
        cfg = self.config.alignment
        return cfg.readout == "cca" and cfg.codebook_size > 0 and "codebook" in cfg.readout_blocks

    def _codebook_projections(self) -> dict[str, torch.Tensor]:
        """Each modality's public codebook projection (fitted on its anchors' base features): sites cluster their
        private items in it."""
        if not self.codebook_enabled():
            return {}
        out = {}
        for m, base in self.base_of("anchors").items():
            projection = CodebookProjection.fit(base, self.config.alignment.codebook_components)
            out[f"{CODEBOOK_PREFIX}{m}/mean"] = torch.from_numpy(projection.mean).float()
            out[f"{CODEBOOK_PREFIX}{m}/linear"] = torch.from_numpy(projection.linear).float()
        return out

    def _build_codebooks(self) -> dict[str, torch.Tensor]:
        """Once every modality has centroids from at least one site: pool them into each modality's codebook (its
        centres, and the assignment scale from the public anchors). Until then the readout goes without it."""
        for parts in self._codebook_parts.values():  # a silenced site's centroids never enter it
            for site in self.silenced:
                parts.pop(site, None)
        self._codebook_parts = {m: parts for m, parts in self._codebook_parts.items() if parts}
        if not self._codebook_parts or self.state.has_codebook():
            return {}
        missing = [m for m in self.modalities if m not in self._codebook_parts]
        if missing:
            log.info("round %d: the private codebook waits for centroids of %s (sites of that modality sent none: "
                     "too few private items, or differential privacy)", self.report.round, missing)
            return {}
        cfg = self.config.alignment
        projections = self.state.codebook_projections()  # sent from round 0 on, unchanged
        anchors = self.base_of("anchors")
        projected = {m: projections[m](anchors[m]) for m in self._codebook_parts}
        judged = {"data check": self.data_factors, "information check": self.information_factors,
                  "typicality check": self.typicality_factors}
        reasons = {s: [check for check, factors in judged.items() if factors.get(s, 1.0) < CODEBOOK_FACTOR_FLOOR]
                   for parts in self._codebook_parts.values() for s in parts if s not in self.config.precision.vouched_sites}
        left_out = sorted(s for s, checks in reasons.items() if checks)
        if left_out:
            log.info("round %d: the codebook leaves out the centroids of %s (%s: their data far from their peers', or "
                     "their views sharing far less than their peers')", self.report.round, left_out,
                     "; ".join(f"{s}: {', '.join(reasons[s])}" for s in left_out))
        # In the sites' order, not their updates' arrival order: a run then builds the same codebook every time.
        centres = {m: pool_centroids([parts[site] for site in sorted(parts) if site not in left_out], cfg.codebook_size,
                                     seed=self.config.adapter.seed)
                   for m, parts in self._codebook_parts.items()}

        def codebooks(temperature: float, form: str) -> dict[str, Codebook]:
            return {m: Codebook(projections[m], c, assignment_scale(projected[m], c, temperature), form)
                    for m, c in centres.items()}
        # Chosen once, on the base features and the codebook alone (the model changes every round, the codebook does
        # not), by the readout's own anchor cross-validation; the anchors-only rival chooses its form the same way.
        scores = {form: form_score(fit_readout(self.config, dict.fromkeys(anchors), anchors, ("base", "codebook"), codebooks(*form))[1])
                  for form in codebook_forms(cfg.codebook_temperature)}
        temperature, form = max(scores, key=scores.get)
        out = {}
        for m, book in codebooks(temperature, form).items():
            out[f"{CODEBOOK_PREFIX}{m}/centres"] = torch.from_numpy(book.centres).float()
            out[f"{CODEBOOK_PREFIX}{m}/scale"] = torch.tensor([book.scale], dtype=torch.float32)  # 1-d: checkpoints hash bytes
            out[f"{CODEBOOK_PREFIX}{m}/form"] = torch.tensor([FORM_CODES[form]], dtype=torch.float32)
            parts = [n for site, (_, n) in self._codebook_parts[m].items() if site not in left_out]
            log.info("round %d: private codebook of %s: %d centres from %d site(s), %d private items", self.report.round,
                     m, len(book.centres), len(parts), int(sum(n.sum() for n in parts)))
        log.info("round %d: codebook block: temperature %g, %s (anchor cross-validation over %d forms, MRR %.3f)",
                 self.report.round, temperature, form, len(scores), scores[(temperature, form)][0])
        self.codebook_temperature, self.codebook_form = temperature, form
        self._codebook_parts = {}
        return out

    # -- views of the model --------------------------------------------------
    def _targets_and_readout(self, embeddings: Mapping[str, torch.Tensor], round_: int,
                             codebooks: Mapping[str, Codebook]) -> dict[str, torch.Tensor]:
        """The anchor targets of the cross-modal term, and the anchor readout chosen on them by cross-validation
        (public data only), with every modality's anchors in the readout's space (what a site validates against)."""
        out = {TARGET_PREFIX + m: z.to(WIRE_STATISTICS) for m, z in embeddings.items()}
        cfg = self.config.alignment
        if cfg.readout == "cca" and len(embeddings) >= 2:
            blocks = tuple(b for b in cfg.readout_blocks if b != "codebook" or codebooks)
            base = self.base_of("anchors") if {"base", "codebook"} & set(blocks) else None
            readout, self.readout_choice = fit_readout(self.config, embeddings, base, blocks, codebooks)
            self._choice_round = round_
            scored = to_scoring_space(embeddings, embeddings, readout, base, blocks, codebooks)
            for m in embeddings:
                out[f"{READOUT_PREFIX}{m}/mean"] = readout.means[m]
                out[f"{READOUT_PREFIX}{m}/proj"] = readout.projections[m]
                out[f"{READOUT_PREFIX}{m}/anchors"] = scored[m].to(WIRE_STATISTICS)
            out[READOUT_PREFIX + "correlations"] = readout.correlations
        return out

    def base_of(self, which: str) -> dict[str, np.ndarray]:
        """Base features (model/base_features.py) of the anchors or the held-out pairs, computed once: they are fixed."""
        if which not in self._base:
            items = self.anchors if which == "anchors" else self.test
            tokens = self.config.alignment.readout_text_tokens
            features = {m: base_features_and_coherence(self.model, m, d.items, tokens) for m, d in items.items()}
            self._base[which] = {m: base for m, (base, _) in features.items()}
            self._coherence[which] = {m: coherence for m, (_, coherence) in features.items()}
        return self._base[which]

    def _anchor_embeddings(self) -> dict[str, torch.Tensor]:
        return {m: self.model.embed_all(m, self.anchors[m].items) for m in self.modalities}

    def anchors_only_eval(self) -> dict[str, float]:
        """What a consortium gets without federating: the readout chosen the same way on the base block of the same
        anchors alone (no model), scored on the same held-out pairs. Computed once: it does not change."""
        if not self.test:
            return {}
        if self._anchors_only is None:
            base = self.base_of("anchors")
            readout, choice = fit_readout(self.config, dict.fromkeys(base), base, blocks=("base",))
            test = self.base_of("test")
            scored = {m: readout.apply(m, torch.from_numpy(test[m])).float() for m in test}
            labels = {m: np.asarray(d.semantic_labels) for m, d in self.test.items()}
            self._anchors_only = {**cross_modal_metrics(scored, labels), "anchor_cv/mrr": choice.cv_mrr}
        return self._anchors_only

    def readout_metrics(self, state: GlobalState | None = None) -> dict[str, float]:
        """What anchor cross-validation chose for ``state``'s readout and how well it ranked held-out anchors
        (``anchor_cv/mrr``: the model-selection metric; no held-out pair takes part)."""
        source = state if state is not None else self.state
        choice = self.readout_choice
        if choice is None or source is None or source.round != self._choice_round:
            return {}
        out = {"anchor_cv/mrr": choice.cv_mrr, "readout/reg": choice.reg, "readout/dims": float(choice.dims),
               "readout/gain": choice.gain, "readout/gain_se": choice.gain_se}
        out.update({f"readout/weight/{k}": v for k, v in choice.weights.items()})
        out.update({f"readout/truncation/{k}": float(v) for k, v in choice.truncation.items()})
        if self.codebook_temperature is not None:
            out["codebook/temperature"] = self.codebook_temperature
        if self.codebook_form is not None:
            out["codebook/form"] = FORM_CODES[self.codebook_form]
        return out

    def evaluate(self, state: GlobalState | None = None) -> dict[str, float]:
        """The readout's anchor cross-validation, and held-out cross-modal retrieval of the global model when the
        job has held-out pairs (site deltas excluded: they never leave sites)."""
        if not self.test:
            return self.readout_metrics(state)
        if state is not None:
            load_shared(self.model, state.shared_params())
        # The state's anchor targets are this model's anchor embeddings (made when the state was), so reuse them.
        source = state if state is not None else self.state
        targets = source.targets() if source is not None else {}
        anchors = targets if set(targets) >= set(self.modalities) else self._anchor_embeddings()
        readout = source.readout() if source is not None else None
        codebooks = source.codebooks() if source is not None else {}
        blocks = source.readout_blocks(self.config.alignment.readout_blocks) if source is not None else ()
        base = self.base_of("test") if readout is not None and {"base", "codebook"} & set(blocks) else None
        embeddings = to_scoring_space({m: self.model.embed_all(m, d.items) for m, d in self.test.items()}, anchors, readout,
                                      base, blocks, codebooks)
        labels = {m: np.asarray(d.semantic_labels) for m, d in self.test.items()}
        self.last_embeddings = embeddings  # held-out pairs, row i of every modality is one pair: for the map
        metrics = {**cross_modal_metrics(embeddings, labels), **self.readout_metrics(source)}
        kernel = self.state.consensus() if self.state is not None else None
        if kernel is not None:
            k = from_upper_triangle(kernel.double())
            for m, z in anchors.items():
                metrics[f"{m}/anchor_cka_to_consensus"] = consensus_agreement(centred_gram(z.double()), k)
        return metrics
