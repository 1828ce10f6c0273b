"""One site's local round: the function that the FLARE Executor and the in-process loop both call.

The site trains the shared cores S and magnitudes m of every GeoLoRA layer, its
own log-gains delta (kept on its disk), and the projector of its modality, on

    L = L_private + lambda_a (1 - CKA(K_site, K_bar)) + lambda_x L_cross + lambda_d ||delta||^2

and returns a :class:`SiteUpdate` holding only what docs/DESIGN.md, "What crosses the network" lists.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from ..alignment.codebook import site_centroids
from ..alignment.gram import centred_gram, consensus_agreement, from_upper_triangle, upper_triangle
from ..alignment.losses import anchor_info_nce, cka_loss, two_view_contrastive
from ..config import FedAnchorConfig
from ..data.augment import augment
from ..data.scenario import ModalityData, ModalitySpec
from ..model.base_features import base_features, base_features_and_coherence
from ..model.homogeneous import HomogeneousTransformer, build_model, take_items
from ..dp import fresh_generator, gaussian_release, privacy_spent, privatize_change
from ..precision import PrecisionTracker
from ..typicality import site_summary
from .messages import GlobalState, SiteUpdate, adapter_key, basis_digest, is_basis, is_core_or_magnitude
from ..adapters.refresh import refresh_phase
from .state import (core_params, load_local, load_shared, local_tensors, projected_gradients, projector_params,
                    set_gradient_probes, shared_tensors)

log = logging.getLogger(__name__)


def trainable_params(model: HomogeneousTransformer, modality: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(adapter parameters: S, m and delta of every layer; the modality's projector): what a site trains."""
    adapters = [p for layer in model.adapters().values() for p in (layer.S, layer.m, layer.delta)]
    return adapters, list(projector_params(model, modality).values())


def round_optimizer(config: FedAnchorConfig, adapters: list[torch.nn.Parameter], projector: list[torch.nn.Parameter]):
    """(optimizer, scheduler) of one round: a fresh Adam, ``train.lr`` for the adapters and ``train.projector_lr`` for
    the projector, with a linear warm-up over ``train.warmup_fraction`` of the local steps. A fresh Adam's first steps
    move every parameter by about lr whatever its gradient; warming the rate up keeps the code table and the cores
    from jumping at the start of each round."""
    cfg = config.train
    optimizer = torch.optim.Adam([{"params": adapters, "lr": cfg.lr}, {"params": projector, "lr": cfg.projector_lr}],
                                 weight_decay=cfg.weight_decay)
    warmup = max(1, round(cfg.local_steps * cfg.warmup_fraction))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def cross_modal_anchor_loss(za: torch.Tensor, anchor_index: np.ndarray, targets: Mapping[str, torch.Tensor],
                            target_means: Mapping[str, torch.Tensor], anchor_same: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_cross: the anchor InfoNCE of the batch's anchor embeddings against each other modality's anchor targets
    (identical anchors not counted as negatives), averaged over those modalities."""
    index = torch.as_tensor(anchor_index)
    same = anchor_same[index][:, index]
    rows = index.to(za.device)
    return sum(anchor_info_nce(za, t[rows], temperature, target_means[m], same) for m, t in targets.items()) / len(targets)


@dataclass
class LocalRound:
    """What one round's local steps share (``SiteTrainer.start_round``)."""

    round: int
    kernel: torch.Tensor | None  # the consensus Gram on the site's device
    targets: dict[str, torch.Tensor]  # the other modalities' anchor targets
    target_means: dict[str, torch.Tensor]
    use_cka: bool
    use_cross: bool
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: PrecisionTracker
    rng: np.random.Generator
    collect_gradients: bool
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "private": 0.0, "cka": 0.0, "cross": 0.0})


class BasisNotHeld(ValueError):
    """A state without U and V reached a site that does not hold the bases it names."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but no CUDA GPU is visible here; set train.device to 'auto' or 'cpu'")
    return device


def autocast_dtype(device: torch.device, setting: str) -> torch.dtype | None:
    """The dtype local steps autocast to: bf16 where the GPU has it (Ampere and newer) or where asked, else None."""
    if setting == "off":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if setting == "bf16":
            raise RuntimeError(f"train.autocast='bf16' but {torch.cuda.get_device_name(device)} has no bfloat16; "
                               "set train.autocast to 'auto' or 'off'")
        return None
    return torch.bfloat16 if setting == "bf16" else None  # on a CPU only when asked: slow without AMX


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a local step's forward: ``dtype`` from autocast_dtype, None for none."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


class SiteTrainer:
    """A site's model, private data and own anchors; trains one round at a time."""

    def __init__(self, config: FedAnchorConfig, site: str, private: ModalityData, anchors: ModalityData,
                 anchor_fingerprint: str, modalities: Mapping[str, ModalitySpec],
                 feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 model: HomogeneousTransformer | None = None, device: str | None = None):
        self.config = config
        self.site = site
        self.spec = private.spec
        self.modality = private.spec.name
        if self.modality not in modalities:
            raise ValueError(f"site {site!r} holds modality {self.modality!r}, which the job does not know; it knows {list(modalities)}")
        if anchors.spec.name != self.modality:
            raise ValueError(f"site {site!r} holds {self.modality!r} but was given anchors of {anchors.spec.name!r}")
        if len(private) < 2:
            raise ValueError(f"site {site!r} has {len(private)} private samples; it needs at least 2 for the two-view objective")
        self.private = private
        self.anchors = anchors
        self.anchor_fingerprint = anchor_fingerprint
        self.device = resolve_device(device or config.train.device)
        self.autocast = autocast_dtype(self.device, config.train.autocast)
        self.model = (model or build_model(config, modalities, feature_stats)).to(self.device)
        self._seed = zlib.crc32(site.encode()) ^ config.train.seed
        self._anchor_same = same_items(anchors.items)  # fixed for the run: which anchors are identical inputs here
        self._dp_rounds = 0  # rounds released under differential privacy, for the accountant
        self.basis_digest: str | None = None  # the shared bases installed in the model: a state may leave them out
        self._anchor_base: np.ndarray | None = None  # base features of the anchors, made on first use
        self._codebook_upload: tuple[torch.Tensor, torch.Tensor] | None = None  # (centroids, counts), made on first use
        self._private_base: np.ndarray | None = None  # base features of the private items, made on first use
        self._private_coherence: np.ndarray | None = None  # each private text's coherence, made with them (text only)
        self._typicality: dict[str, float] | None = None  # the typicality check's numbers, made on first use

    def anchor_base_features(self) -> np.ndarray:
        """Base features (model/base_features.py) of this site's anchors: fixed, so computed once."""
        if self._anchor_base is None:
            self._anchor_base = base_features(self.model, self.modality, self.anchors.items,
                                              self.config.alignment.readout_text_tokens)
        return self._anchor_base

    def private_base_features(self) -> np.ndarray:
        """Base features of this site's private items: fixed, so computed once (the codebook and the typicality
        check both read them)."""
        if self._private_base is None:
            self._private_base, self._private_coherence = base_features_and_coherence(
                self.model, self.modality, self.private.items, self.config.alignment.readout_text_tokens)
        return self._private_base

    def typicality_metrics(self) -> dict[str, float]:
        """The typicality check's numbers (typicality.py): the mean and spread over this site's private items of each
        statistic, against its anchors. Empty under DP, with the check off, or with fewer private items than
        alignment.codebook_min_cluster (a mean over fewer items says too much about each)."""
        cfg = self.config
        if not (cfg.precision.typicality_check and cfg.precision.method != "uniform" and not cfg.privacy.dp
                and len(self.private) >= cfg.alignment.codebook_min_cluster):
            return {}
        if self._typicality is None:  # the items and the anchors are fixed: measure once
            base = self.private_base_features()  # with the texts' coherence, from the same pass
            summary = site_summary(self.spec.kind, self.private.items, base, self.anchor_base_features(),
                                   self._private_coherence)
            self._typicality = summary.metrics()
            log.info("site %s: typicality of its %d private items against the anchors %s", self.site, summary.items,
                     {k: round(v, 3) for k, v in self._typicality.items()})
        return dict(self._typicality)

    def local_state(self) -> dict[str, torch.Tensor]:
        return local_tensors(self.model)

    def load_local_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        load_local(self.model, tensors)

    def _check_state(self, state: GlobalState) -> None:
        if state.anchor_fingerprint != self.anchor_fingerprint:
            raise ValueError(
                f"site {self.site!r}: the job's anchor set {state.anchor_fingerprint[:12]} differs from this site's "
                f"{self.anchor_fingerprint[:12]}; install the anchor file that the job names"
            )
        named = state.basis_digest()
        if not state.has_basis() and (named is None or named != self.basis_digest):
            raise BasisNotHeld(
                f"site {self.site!r}: round {state.round} came without its bases U, V (digest "
                f"{str(named)[:12]}), which this site does not hold (it holds {str(self.basis_digest)[:12]}); "
                "the server sends them whole again after a round without this site's update")

    def held_bases(self) -> dict[str, torch.Tensor]:
        """The shared bases U, V the model runs on (to keep on the site's disk beside delta_site)."""
        return {k: v for k, v in shared_tensors(self.model).items() if is_basis(k)}

    def hold_bases(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Install bases kept on disk (a restarted site), so that a state sent without them finds them here.
        The cores become zero until the next state, which always carries them."""
        adapters = self.model.adapters()
        for name, layer in adapters.items():
            u, v = tensors.get(adapter_key(name, "U")), tensors.get(adapter_key(name, "V"))
            if u is None or v is None:
                raise ValueError(f"kept bases lack layer {name!r}; delete the bases file to fetch them again")
            layer.set_basis(u, v)
        self.basis_digest = basis_digest(tensors)

    def install(self, state: GlobalState) -> None:
        """Load a global state's shared tensors into the model, remembering which bases it now holds."""
        self._check_state(state)
        load_shared(self.model, state.shared_params())
        self.basis_digest = state.basis_digest()

    def train_round(self, state: GlobalState, progress: Callable[[int, int, float], None] | None = None) -> SiteUpdate:
        """One round, in named steps: install the state, take the local steps, then measure and package the update."""
        started = time.perf_counter()
        self.install(state)
        received = self.received_information_reading(state)
        local = self.start_round(state)
        # Dropout draws from torch's global generator: seed a private copy of it by site and round, so that a round
        # is a function of the state it starts from (a resumed job reproduces the uninterrupted one).
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self._seed * 1_000_003 + state.round) % (2 ** 63))
            self.model.train()
            for step in range(self.config.train.local_steps):
                loss = self.local_step(local, step)
                if progress is not None:
                    progress(step + 1, self.config.train.local_steps, loss)
        update = self.finish_round(state, local, started)
        if received is not None:
            update.metrics["loss/private_received"] = received
        return update

    def received_information_reading(self, state: GlobalState) -> float | None:
        """The two-view loss of the received model on this site's private items (precision.information_reading
        "received"), or None when the information check does not read it, and under DP, where only seconds and dp/*
        leave. Its own generator: the round's batches and views stay those of a run without it."""
        cfg = self.config.precision
        if not (cfg.information_check and cfg.method != "uniform" and cfg.information_reading == "received"
                and not self.config.privacy.dp):
            return None
        rng = np.random.default_rng([self._seed, state.round, 29])
        with autocast_to(self.device, self.autocast):
            return received_view_loss(self.model, self.spec, self.private, min(self.config.train.batch_size, len(self.private)),
                                      cfg.information_draws, self.config.private.augment_strength,
                                      self.config.private.temperature, rng)

    def start_round(self, state: GlobalState) -> "LocalRound":
        """What the round's steps share: the state's consensus and targets on this device, a fresh optimiser with a
        warm-up, the precision tracker, this round's batch generator. The state must be installed."""
        cfg = self.config
        consensus = state.consensus()
        kernel = from_upper_triangle(consensus.double()).to(self.device) if consensus is not None else None
        targets = {m: t.to(self.device) for m, t in state.targets().items() if m != self.modality}
        optimizer, scheduler = round_optimizer(cfg, *trainable_params(self.model, self.modality))
        collect_gradients = refresh_phase(state.round, cfg.adapter.refresh_every) == "gradients"
        set_gradient_probes(self.model, collect_gradients)
        return LocalRound(
            round=state.round, kernel=kernel, targets=targets, target_means={m: t.mean(0) for m, t in targets.items()},
            use_cka=cfg.alignment.lambda_cka > 0 and kernel is not None,
            use_cross=cfg.alignment.lambda_cross > 0 and bool(targets),
            optimizer=optimizer, scheduler=scheduler,
            tracker=PrecisionTracker(core_params(self.model), cfg.precision.method, cfg.precision.window),
            rng=np.random.default_rng([self._seed, state.round]), collect_gradients=collect_gradients)

    def local_step(self, local: "LocalRound", step: int) -> float:
        """One local step: L = L_private + lambda_a (1 - CKA) + lambda_x L_cross + lambda_d ||delta||^2, an Adam step,
        the precision tracker's record; returns the loss."""
        cfg = self.config
        batch, anchor_batch = min(cfg.train.batch_size, len(self.private)), min(cfg.alignment.anchor_batch, len(self.anchors))
        # bf16 autocast covers the trunk's forward; the model returns float32 embeddings, so the losses, the Gram and
        # the optimiser stay in float32.
        with autocast_to(self.device, self.autocast):
            items, _, z1, z2, za, anchor_index = embed_step(self.model, self.spec, self.private, self.anchors, local.rng,
                                                            batch, anchor_batch, cfg.private.augment_strength,
                                                            local.use_cka or local.use_cross)
        loss_private = two_view_contrastive(z1, z2, cfg.private.temperature, same_items(items))
        loss_cka = loss_cross = z1.new_zeros(())
        if anchor_index is not None:
            index = torch.as_tensor(anchor_index)
            if local.use_cka:
                loss_cka = cka_loss(za, local.kernel, index.to(self.device))
            if local.use_cross:
                loss_cross = cross_modal_anchor_loss(za, anchor_index, local.targets, local.target_means,
                                                     self._anchor_same, cfg.alignment.temperature)
        loss_delta = sum((layer.delta ** 2).sum() for layer in self.model.adapters().values())
        a = cfg.alignment
        loss = (cfg.private.weight * loss_private + a.lambda_cka * loss_cka + a.lambda_cross * loss_cross
                + a.lambda_delta * loss_delta)
        take_step(loss, local.optimizer, local.scheduler, f"site {self.site!r} round {local.round} step {step}")
        local.tracker.record()
        for key, value in (("loss", loss), ("private", loss_private), ("cka", loss_cka), ("cross", loss_cross)):
            local.sums[key] += float(value.detach())
        return float(loss.detach())

    def finish_round(self, state: GlobalState, local: "LocalRound", started: float) -> SiteUpdate:
        """The update: shared parameters, their precision, the site scalar, the anchor Gram, metrics, a refresh's
        projected gradients, codebook centroids while the codebook is being built; released under DP if asked."""
        cfg, model = self.config, self.model
        basis_gradients = projected_gradients(model, cfg.train.local_steps) if local.collect_gradients else {}
        gram = centred_gram(model.embed_all(self.modality, self.anchors.items).double())
        precision = local.tracker.precision(cfg.precision.eps)
        uncertainty, metrics = self._site_scalar(state, precision)
        steps = cfg.train.local_steps
        metrics.update({f"loss/{k}": v / steps for k, v in local.sums.items()})
        metrics["seconds"] = time.perf_counter() - started  # ``started``: when train_round began
        if local.kernel is not None:
            metrics["cka_to_consensus"] = consensus_agreement(gram, local.kernel)
        metrics.update(self.typicality_metrics())
        params = {k: v.detach().cpu().clone() for k, v in core_params(model).items()}
        params.update({k: v.detach().cpu().clone() for k, v in projector_params(model, self.modality).items()})
        gram_upper = upper_triangle(gram).float()
        if cfg.privacy.dp:
            params, gram_upper, precision, uncertainty, metrics = self._privatize(state, params, gram_upper, metrics)
        centroids, counts = self.codebook_centroids(state)
        update = SiteUpdate(
            site=self.site, modality=self.modality, round=state.round, anchor_fingerprint=self.anchor_fingerprint,
            params=params, precision=precision, gram_upper=gram_upper, n_samples=len(self.private),
            uncertainty=float(uncertainty), metrics=metrics, basis_gradients=basis_gradients,
            basis_digest=self.basis_digest or "", codebook_centroids=centroids, codebook_counts=counts,
        )
        sums = local.sums
        log.info("site %s round %d: loss %.4f (private %.4f, cka %.4f, cross %.4f) in %.1fs", self.site, state.round,
                 sums["loss"] / steps, sums["private"] / steps, sums["cka"] / steps, sums["cross"] / steps, metrics["seconds"])
        return update

    def _site_scalar(self, state: GlobalState, precision: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """(pi_k, its parts as metrics): 1 / (epistemic + aleatoric spread), or 1.0 when not estimated. Under
        differential privacy it is not computed: it depends on private data and is not released."""
        cfg = self.config
        if not (cfg.precision.site_scalar and cfg.precision.method != "uniform" and not cfg.privacy.dp):
            return 1.0, {}
        probe = min(cfg.precision.site_scalar_anchors, len(self.anchors))
        epistemic = embedding_spread(self.model, self.modality, take_items(self.anchors.items, np.arange(probe)),
                                     core_params(self.model), precision, cfg.precision.site_scalar_samples,
                                     self._seed + state.round)
        aleatoric = view_spread(self.model, self.spec, self.private.items,
                                min(cfg.precision.site_scalar_anchors, len(self.private)), cfg.private.augment_strength,
                                self._seed + state.round)
        return 1.0 / (epistemic + aleatoric + cfg.precision.eps), {"spread/epistemic": epistemic, "spread/aleatoric": aleatoric}

    def codebook_centroids(self, state: GlobalState) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids, counts) of this site's private items for the private codebook (alignment/codebook.py), while
        the server has not built it; empty otherwise, and always under differential privacy (centroids are not
        released through its mechanism)."""
        empty = torch.zeros(0, 0), torch.zeros(0)
        projection = state.codebook_projections().get(self.modality)
        if projection is None or state.has_codebook():
            return empty
        if self.config.privacy.dp:
            log.info("site %s: no codebook centroids under differential privacy", self.site)
            return empty
        if self._codebook_upload is None:  # the private items and the projection are fixed: cluster once
            cfg = self.config.alignment
            centroids, counts = site_centroids(projection(self.private_base_features()), cfg.codebook_size,
                                               cfg.codebook_min_cluster, self._seed)
            log.info("site %s round %d: %d codebook centroids of clusters of %s+ private items (of %d)", self.site,
                     state.round, len(counts), cfg.codebook_min_cluster, len(self.private))
            self._codebook_upload = (torch.from_numpy(centroids).float(), torch.from_numpy(counts).float()) if len(counts) else empty
        return self._codebook_upload

    def _privatize(self, state: GlobalState, params: dict[str, torch.Tensor], gram_upper: torch.Tensor,
                   metrics: dict[str, float]) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], float, dict[str, float]]:
        """The Gaussian mechanism on what leaves (dp.py); nothing else that depends on private data goes up."""
        cfg = self.config.privacy
        generator = fresh_generator()
        received = state.shared_params()
        params = privatize_change(params, received, cfg.clip_update, cfg.noise_multiplier, generator)
        gram_upper = gaussian_release(gram_upper, cfg.clip_gram, cfg.noise_multiplier, generator)
        precision = {k: torch.ones_like(v, dtype=torch.float64) for k, v in params.items() if is_core_or_magnitude(k)}
        self._dp_rounds += 1
        spent = privacy_spent(cfg.noise_multiplier, self._dp_rounds, cfg.delta)
        log.info("site %s round %d: differential privacy, epsilon %.3g at delta %g after %d round(s)", self.site,
                 state.round, spent.epsilon, spent.delta, self._dp_rounds)
        public = {"seconds": metrics["seconds"], "dp/epsilon": spent.epsilon, "dp/delta": spent.delta,
                  "dp/rounds": float(self._dp_rounds)}
        return params, gram_upper, precision, 1.0, public


def take_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, where: str) -> None:
    """One optimiser step; a non-finite loss stops the round with the fix instead of poisoning the update."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the local loss became {loss.item()}; lower train.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def embed_step(model: HomogeneousTransformer, spec: ModalitySpec, private: ModalityData, anchors: ModalityData,
               rng: np.random.Generator, batch: int, anchor_batch: int, strength: float, use_anchors: bool):
    """One local step's forward: a private batch in two augmented views and, if asked, an anchor batch, in one pass.

    Drawn from ``rng`` in this order (batch, views, anchors), so that the bench's rivals see a site's batches.
    Returns (private items, their index, z view 1, z view 2, z anchors or None, anchor index or None).
    """
    index = rng.choice(len(private), size=batch, replace=False)
    items = take_items(private.items, index)
    parts = [augment(spec, items, rng, strength) for _ in range(2)]
    anchor_index = rng.choice(len(anchors), size=anchor_batch, replace=False) if use_anchors else None
    if anchor_index is not None:
        parts.append(take_items(anchors.items, anchor_index))
    z = model.embed(spec.name, _concat(parts))
    za = z[2 * batch:] if anchor_index is not None else None
    return items, index, z[:batch], z[batch:2 * batch], za, anchor_index


def same_items(items: object) -> torch.Tensor:
    """n x n mask of items that are identical (two anchors with the same code set, say)."""
    keys = [np.asarray(x).tobytes() if isinstance(items, np.ndarray) else x for x in items]  # type: ignore[union-attr]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    ids = torch.tensor([index[k] for k in keys])
    return ids[:, None] == ids[None, :]


def _concat(parts: list) -> object:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [item for part in parts for item in part]


@torch.no_grad()
def received_view_loss(model: HomogeneousTransformer, spec: ModalitySpec, private: ModalityData, batch: int, draws: int,
                       strength: float, temperature: float, rng: np.random.Generator) -> float:
    """The mean two-view loss of ``draws`` batches of ``batch`` private items under the model as it is (in eval mode:
    no dropout, no gradients): what the information check reads before the site's steps adapt its encoder to its own
    data. Only this one number leaves the site."""
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for _ in range(draws):
            items = take_items(private.items, rng.choice(len(private), size=batch, replace=False))
            z = model.embed(spec.name, _concat([augment(spec, items, rng, strength) for _ in range(2)]))
            total += float(two_view_contrastive(z[:batch].float(), z[batch:].float(), temperature, same_items(items)))
    finally:
        model.train(was_training)
    return total / draws


@torch.no_grad()
def view_spread(model: HomogeneousTransformer, spec: ModalitySpec, items: object, count: int, strength: float, seed: int) -> float:
    """Half the mean squared distance between two augmented views of the same private items.

    The aleatoric part of the site scalar: data that the shared model cannot
    embed consistently (noise, a gain it has not seen, scrambled content) has a
    wide spread. Only this one number leaves the site.
    """
    rng = np.random.default_rng([seed, 7])
    index = rng.choice(len(items), size=min(count, len(items)), replace=False)  # type: ignore[arg-type]
    chosen = take_items(items, index)
    z1 = model.embed_all(spec.name, augment(spec, chosen, rng, strength)).double()
    z2 = model.embed_all(spec.name, augment(spec, chosen, rng, strength)).double()
    return float(((z1 - z2) ** 2).sum(-1).mean() / 2)


@torch.no_grad()
def embedding_spread(model: HomogeneousTransformer, modality: str, items: object, params: Mapping[str, torch.nn.Parameter],
                     precision: Mapping[str, torch.Tensor], samples: int, seed: int, max_std: float = 1.0) -> float:
    """Mean variance of anchor embeddings when cores are sampled around the site's own with variance 1 / Lambda.

    Its inverse is the site scalar pi_k: a site whose coefficients are uncertain
    in directions that move the embeddings gets less say.
    """
    generator = torch.Generator().manual_seed(int(seed) % (2 ** 63))
    originals = {k: p.detach().clone() for k, p in params.items()}
    draws = []
    try:
        for _ in range(max(samples, 2)):
            for key, param in params.items():
                std = precision[key].rsqrt().clamp(max=max_std).to(param.dtype)
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.copy_(originals[key] + (noise * std).to(param.device))
            draws.append(model.embed_all(modality, items).double())
    finally:
        for key, param in params.items():
            param.copy_(originals[key])
    stacked = torch.stack(draws)  # samples x anchors x p
    return float(stacked.var(0).sum(-1).mean())
