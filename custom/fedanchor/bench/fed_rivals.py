"""Federated rivals: FedAvg on LoRA factors (with and without an anchor term), FedProto, CreamFL.

Each rival is a function ``(config, split) -> RivalRun`` that runs every site and
the server in one process on the split and seeds that fedanchor uses, and is
scored like every other bench method (``bench.rivals.score_models``: the fedanchor
server's scoring of held-out pairs, in the anchor CCA readout space).

Shared with fedanchor's ``SiteTrainer`` (so that only what is shared differs):

- the private objective: two augmented views (``augment``) of a batch of private
  items, ``two_view_contrastive`` with identical items as positives, weight
  ``private.weight``;
- the sampling order of the site's generator (batch, views, then anchors), seeded
  by ``crc32(site) ^ train.seed`` and the round, as in ``SiteTrainer``;
- SiteTrainer's own round optimiser (``round_optimizer``: a fresh Adam each round,
  ``train.lr`` for adapters, ``train.projector_lr`` for the site's projector, the
  linear warm-up) and, for the own-model rivals, its trainable parameters
  (``trainable_params``);
- SiteTrainer's cross-modal anchor term (``cross_modal_anchor_loss``) against fixed
  targets of the other modalities, centred on the targets' mean over all anchors,
  with the same duplicate-anchor mask ``same_items``.

Bytes are measured on the messages with ``messages.tensor_nbytes``, the count of
``SiteUpdate.nbytes`` and ``GlobalState.nbytes`` (the tensors as numpy arrays; JSON
meta such as n_k is not counted there either). ``bytes_down[r][site]`` is what the server sends that
site at the start of round r; the state after the last round is evaluated, not sent.

What each rival shares per site per round (``test_message_sizes`` checks every
one of these, per site and round, against the measured bytes; ``fedanchor bench``
prints the measured figures):

- FedAvg-LoRA: up A and B of every adapted layer and the site's projector; down
  the global model's A, B and every projector, with the anchor term also the
  other modalities' anchor targets (N x p).
- FedProto: up one p-vector per class the site holds, with the class ids and
  counts (int64); down the global prototypes of every class seen so far and their
  ids (nothing in round 0: the server has none yet).
- CreamFL: up the site's embeddings of all N public anchors of its modality
  (N x p); down every modality's aggregated anchor representations.
- Full fine-tuning (bytes only, ``full_finetune_bytes``): the whole trunk, head
  and projector of one site.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adapters.geolora import geolora_layers
from ..alignment.losses import two_view_contrastive
from ..config import FedAnchorConfig
from ..data.scenario import FederatedSplit, ModalityData, ModalitySpec
from ..federation.messages import TARGET_PREFIX, tensor_nbytes
from ..federation.site import (cross_modal_anchor_loss, embed_step, resolve_device, round_optimizer, same_items, take_step,
                              trainable_params)
from ..federation.state import projector_params
from ..model.homogeneous import HomogeneousTransformer, build_model
from .rivals import score_models

LORA_ADAPTER = "default"  # peft's adapter name; one adapter per layer
PROTOTYPES, CLASSES, COUNTS = "prototypes", "classes", "counts"
ANCHOR_PREFIX = "anchors/"  # CreamFL: anchors/<modality> -> N x p representations


@dataclass
class RivalRun:
    """One federated rival's run: final metrics, measured bytes per round per site, wall time, notes."""

    metrics: dict[str, float]
    bytes_up: list[dict[str, int]]  # per round: site -> bytes of its serialized upload
    bytes_down: list[dict[str, int]]  # per round: site -> bytes the server sent it at the start of the round
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- bytes --------------------------------------------------------------------------
def _detached(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


# -- checks ---------------------------------------------------------------------------
def _check_inputs(config: FedAnchorConfig, split: FederatedSplit) -> None:
    if not isinstance(config, FedAnchorConfig):
        raise TypeError(f"config must be a FedAnchorConfig (bench.runner.bench_config builds one), got {type(config).__name__}")
    if not isinstance(split, FederatedSplit):
        raise TypeError(f"split must be a FederatedSplit (federation.loop.make_split(config) builds one), got {type(split).__name__}")
    if not split.private:
        raise ValueError("the split has no private sites; set data.sites or use a scenario with default sites")
    if not split.test:
        raise ValueError("the split has no held-out test pairs to score on; raise data.n_test")
    for site, private in split.private.items():
        if private.spec.name not in split.anchors:
            raise ValueError(f"site {site!r} holds modality {private.spec.name!r}, which has no public anchors; "
                             f"the split's anchors cover {list(split.anchors)}")
        if len(private) < 2:
            raise ValueError(f"site {site!r} has {len(private)} private samples; the two-view objective needs at least 2")


# -- the site side --------------------------------------------------------------------
@dataclass
class _Site:
    name: str
    private: ModalityData
    anchors: ModalityData
    model: HomogeneousTransformer
    seed: int  # as SiteTrainer: crc32(site) ^ train.seed
    anchor_same: torch.Tensor  # which of this modality's anchors are identical inputs

    @property
    def modality(self) -> str:
        return self.private.spec.name

    @property
    def spec(self) -> ModalitySpec:
        return self.private.spec


def _make_sites(config: FedAnchorConfig, split: FederatedSplit, device: torch.device,
                make_model: Callable[[], HomogeneousTransformer]) -> dict[str, _Site]:
    sites = {}
    for name, private in split.private.items():
        anchors = split.anchors[private.spec.name]
        sites[name] = _Site(name, private, anchors, make_model().to(device), zlib.crc32(name.encode()) ^ config.train.seed,
                            same_items(anchors.items))
    return sites


# extra(z1, z2, private batch index, anchor embeddings or None, anchor index or None) -> a scalar loss term
ExtraTerm = Callable[[torch.Tensor, torch.Tensor, np.ndarray, torch.Tensor | None, np.ndarray | None], torch.Tensor]


def _local_round(config: FedAnchorConfig, site: _Site, round_: int, adapters: Sequence[nn.Parameter],
                 projector: Sequence[nn.Parameter], extra: ExtraTerm | None = None, extra_weight: float = 0.0,
                 use_anchors: bool = False) -> dict[str, float]:
    """``train.local_steps`` steps of private two-view SSL (+ ``extra_weight * extra``); returns the mean losses.

    The private batch, its two views and the anchor batch are drawn in SiteTrainer's
    order from the same seeded generator, and the views and anchors go through the
    model in one forward pass, as there.
    """
    cfg = config
    model = site.model
    optimizer, scheduler = round_optimizer(cfg, list(adapters), list(projector))
    rng = np.random.default_rng([site.seed, round_])
    n, n_anchor = len(site.private), len(site.anchors)
    batch = min(cfg.train.batch_size, n)
    anchor_batch = min(cfg.alignment.anchor_batch, n_anchor)
    sums = {"loss": 0.0, "private": 0.0, "extra": 0.0}
    model.train()
    for step in range(cfg.train.local_steps):
        items, index, z1, z2, za, anchor_index = embed_step(model, site.spec, site.private, site.anchors, rng, batch,
                                                            anchor_batch, cfg.private.augment_strength, use_anchors)
        loss_private = two_view_contrastive(z1, z2, cfg.private.temperature, same_items(items))
        loss_extra = extra(z1, z2, index, za, anchor_index) if extra is not None else z1.new_zeros(())
        loss = cfg.private.weight * loss_private + extra_weight * loss_extra
        take_step(loss, optimizer, scheduler, f"site {site.name!r} round {round_} step {step}")
        for key, value in (("loss", loss), ("private", loss_private), ("extra", loss_extra)):
            sums[key] += float(value.detach())
    model.eval()
    return {k: v / cfg.train.local_steps for k, v in sums.items()}


def _anchor_term(config: FedAnchorConfig, site: _Site, targets: Mapping[str, torch.Tensor]) -> ExtraTerm:
    """The cross-modal anchor InfoNCE of site.py against fixed targets of the other modalities (mean over them)."""
    device = site.model.head.weight.device
    fixed = {m: t.to(device) for m, t in targets.items() if m != site.modality}
    if not fixed:
        raise ValueError(f"site {site.name!r}: no anchor targets of another modality to align to; the split needs two modalities")
    means = {m: t.mean(0) for m, t in fixed.items()}  # over all anchors, as site.py

    def term(z1, z2, index, za, anchor_index):
        if za is None or anchor_index is None:
            raise ValueError("the anchor term needs the step's anchor batch (use_anchors=True)")
        return cross_modal_anchor_loss(za, anchor_index, fixed, means, site.anchor_same, config.alignment.temperature)
    return term


def _own_model_sites(config: FedAnchorConfig, split: FederatedSplit) -> dict[str, _Site]:
    """Every site with its own fedanchor model, for the rivals that never average parameters."""
    _check_inputs(config, split)
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    return _make_sites(config, split, device, lambda: build_model(config, modalities, split.feature_stats))


def _own_round(config: FedAnchorConfig, site: _Site, round_: int, extra: ExtraTerm | None = None,
               use_anchors: bool = False) -> dict[str, float]:
    """One local round of an own-model site: what a fedanchor site trains (S, m, delta, its projector)."""
    return _local_round(config, site, round_, *trainable_params(site.model, site.modality), extra,
                        config.alignment.lambda_cross, use_anchors=use_anchors)


# -- scoring ------------------------------------------------------------------------
def _first_site_per_modality(sites: Mapping[str, _Site]) -> dict[str, _Site]:
    first: dict[str, _Site] = {}
    for site in sites.values():
        first.setdefault(site.modality, site)
    return first


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = sum(float(w) * t.double() for w, t in zip(weights, tensors)) / total
    return out.to(tensors[0].dtype)  # type: ignore[union-attr]


# -- 1. FedAvg on LoRA factors ------------------------------------------------------------
def strip_geolora(model: nn.Module) -> list[str]:
    """Replace every GeoLoRA layer by a frozen ``nn.Linear`` with its base weight W0; return the layer names.

    A GeoLoRA layer at S = 0, delta = 0 computes exactly W0 x + b (m starts at the
    row norms of W0), so the stripped model is ``build_model``'s untrained model.
    """
    names = []
    for name, layer in geolora_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        names.append(name)
    return names


def build_lora_model(config: FedAnchorConfig, modalities: Mapping[str, ModalitySpec],
                     feature_stats: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> HomogeneousTransformer:
    """``build_model`` with plain peft LoRA instead of GeoLoRA: same trunk, tokenizers, head and adapted layers.

    peft's ``inject_adapter_in_model`` works on HomogeneousTransformer as it is (its
    adapted layers are plain ``nn.Linear`` once GeoLoRA is stripped). Rank
    ``adapter.rank`` (the head: min(rank, embed_dim), as build_model), lora_alpha =
    rank (scaling 1), dropout 0; peft's own init: A kaiming-uniform, B zero, so the
    model starts as build_model's. A is seeded by ``adapter.seed`` like the GeoLoRA
    bases, so every site and the server start from the same factors.
    """
    from peft import LoraConfig, inject_adapter_in_model

    model = build_model(config, modalities, feature_stats)
    names = strip_geolora(model)
    rank = config.adapter.rank
    head_rank = min(rank, config.trunk.embed_dim)
    patterns = {"head": head_rank} if head_rank != rank and "head" in names else {}
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", target_modules=names,
                      rank_pattern=patterns, alpha_pattern=patterns)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.adapter.seed)
        inject_adapter_in_model(lora, model, adapter_name=LORA_ADAPTER)
    # peft freezes everything that is not a LoRA factor; the projectors train too, as in fedanchor.
    for p in trainable:
        p.requires_grad_(True)
    if len(lora_factors(model)) != 2 * len(names):
        raise RuntimeError(f"peft adapted {len(lora_factors(model)) // 2} of the {len(names)} layers that build_model adapts")
    return model


def lora_factors(model: nn.Module) -> dict[str, nn.Parameter]:
    """lora/<layer>/A (r x d_in) and lora/<layer>/B (d_out x r) of every peft LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and LORA_ADAPTER in module.lora_A:
            out[f"lora/{name}/A"] = module.lora_A[LORA_ADAPTER].weight
            out[f"lora/{name}/B"] = module.lora_B[LORA_ADAPTER].weight
    return out


def _all_projectors(model: HomogeneousTransformer) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for m in model.modalities:
        out.update(projector_params(model, m))
    return out


@torch.no_grad()
def _load(params: Mapping[str, nn.Parameter], tensors: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise KeyError(f"message entries {unknown[:3]} match no parameter of this model")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
        params[key].copy_(value.to(params[key].device, params[key].dtype))


def fedavg_merge(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: every tensor averaged on its own, weighted by ``weights`` (n_k).

    Applied to LoRA factors this averages A and B separately, as FedAvg on PEFT
    factors does; the merged update B_bar A_bar is not the mean of the sites'
    B_k A_k (the inexact merge that GeoLoRA's shared basis avoids).
    """
    if not updates:
        raise ValueError("fedavg_merge needs at least one update")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights; give one weight (n_k) per update")
    if any(not np.isfinite(w) or w <= 0 for w in weights):
        raise ValueError(f"weights {list(weights)} must be positive and finite (sample counts n_k)")
    keys = set(updates[0])
    for k, update in enumerate(updates[1:], 1):
        if set(update) != keys:
            raise ValueError(f"update {k} has keys that differ from update 0: {sorted(set(update) ^ keys)[:3]}")
    return {key: _weighted_mean([u[key] for u in updates], weights) for key in updates[0]}


def fedavg_lora(config: FedAnchorConfig, split: FederatedSplit, anchor_term: bool = False) -> RivalRun:
    """FedAvg on PEFT LoRA factors, as NVIDIA FLARE's LLM examples do it (optionally with the anchor term).

    Model: ``build_lora_model`` (build_model with peft LoRA of rank ``adapter.rank`` on
    the same layers instead of GeoLoRA). Each round the server sends every site the
    global A, B of every layer and every modality's projector (the global model, as
    FLARE's FedAvg does); a site trains A, B and its own projector on the private
    two-view objective, and uploads A, B and its projector. The server averages A
    and B separately weighted by n_k over all sites, and each projector weighted by
    n_k over the sites of its modality.

    ``anchor_term=True``: the server also embeds the public anchors of every
    modality with the global model each round and sends each site those of the
    other modalities (N x p each); sites add ``alignment.lambda_cross`` times
    fedanchor's cross-modal anchor InfoNCE against them. Scored with the global model.
    """
    _check_inputs(config, split)
    if anchor_term and config.alignment.lambda_cross <= 0:
        raise ValueError("fedavg_lora(anchor_term=True) weighs the anchor term by alignment.lambda_cross, which is "
                         f"{config.alignment.lambda_cross}; set it above 0 or call with anchor_term=False")
    if anchor_term and len(split.anchors) < 2:
        raise ValueError("fedavg_lora(anchor_term=True) needs anchors in at least two modalities")
    started = time.perf_counter()
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = build_lora_model(config, modalities, split.feature_stats).to(device).eval()
    sites = _make_sites(config, split, device, lambda: build_lora_model(config, modalities, split.feature_stats))
    server_params = {**lora_factors(server), **_all_projectors(server)}
    bytes_up: list[dict[str, int]] = []
    bytes_down: list[dict[str, int]] = []
    losses: list[dict[str, dict[str, float]]] = []
    for r in range(config.rounds):
        global_params = _detached(server_params)
        targets = {m: server.embed_all(m, split.anchors[m].items) for m in modalities} if anchor_term else {}
        up_round, down_round, loss_round = {}, {}, {}
        lora_updates, lora_weights = [], []
        projector_updates: dict[str, list[tuple[dict[str, torch.Tensor], int]]] = {}
        for name, site in sites.items():
            message = dict(global_params)
            message.update({TARGET_PREFIX + m: t for m, t in targets.items() if m != site.modality})
            down_round[name] = tensor_nbytes(message)
            factors = lora_factors(site.model)
            projector = projector_params(site.model, site.modality)
            _load({**factors, **_all_projectors(site.model)}, global_params)
            extra = _anchor_term(config, site, targets) if anchor_term else None
            loss_round[name] = _local_round(config, site, r, list(factors.values()), list(projector.values()), extra,
                                            config.alignment.lambda_cross, use_anchors=anchor_term)
            update = _detached({**factors, **projector})
            up_round[name] = tensor_nbytes(update)
            n = len(site.private)
            lora_updates.append({k: v for k, v in update.items() if k in factors})
            lora_weights.append(n)
            projector_updates.setdefault(site.modality, []).append(({k: v for k, v in update.items() if k in projector}, n))
        merged = fedavg_merge(lora_updates, lora_weights)
        for pairs in projector_updates.values():
            merged.update(fedavg_merge([p for p, _ in pairs], [n for _, n in pairs]))
        _load(server_params, merged)
        bytes_up.append(up_round)
        bytes_down.append(down_round)
        losses.append(loss_round)
    metrics = score_models({m: server for m in split.test}, split, config)
    notes = {"rounds": config.rounds, "local_steps": config.train.local_steps, "rank": config.adapter.rank,
             "lora": "peft inject_adapter_in_model, lora_alpha=rank, dropout 0", "anchor_term": anchor_term,
             "lambda_cross": config.alignment.lambda_cross if anchor_term else 0.0, "evaluated_with": "the global model",
             "losses": losses}
    return RivalRun(metrics, bytes_up, bytes_down, time.perf_counter() - started, notes)


# -- 2. FedProto ------------------------------------------------------------------------
@torch.no_grad()
def class_prototypes(model: HomogeneousTransformer, data: ModalityData) -> dict[str, torch.Tensor]:
    """The FedProto upload: mean embedding of every class the site holds, its class ids and counts."""
    z = model.embed_all(data.spec.name, data.items)
    labels = torch.as_tensor(np.asarray(data.semantic_labels, dtype=np.int64))
    classes, counts = torch.unique(labels, return_counts=True)
    protos = torch.stack([z[labels == c].mean(0) for c in classes])
    return {PROTOTYPES: protos, CLASSES: classes, COUNTS: counts}


def merge_prototypes(uploads: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per class, the count-weighted mean of the prototypes of every site that holds it (all modalities together)."""
    sums: dict[int, torch.Tensor] = {}
    totals: dict[int, float] = {}
    for upload in uploads:
        for proto, c, count in zip(upload[PROTOTYPES], upload[CLASSES].tolist(), upload[COUNTS].tolist()):
            sums[c] = sums.get(c, 0.0) + float(count) * proto.double()
            totals[c] = totals.get(c, 0.0) + float(count)
    classes = sorted(sums)
    return {PROTOTYPES: torch.stack([(sums[c] / totals[c]).float() for c in classes]),
            CLASSES: torch.tensor(classes, dtype=torch.int64)}


def _prototype_term(site: _Site, global_protos: Mapping[str, torch.Tensor]) -> ExtraTerm:
    """Squared distance of each private embedding (both views) to the global prototype of its class.

    FedProto's reference code uses nn.MSELoss, which also averages over the p
    dimensions; summing over them keeps the term's weight comparable to the
    InfoNCE terms at the same lambda (mean over dimensions would be p times weaker).
    Items whose class has no global prototype yet add nothing.
    """
    device = site.model.head.weight.device
    row = {c: i for i, c in enumerate(global_protos[CLASSES].tolist())}
    protos = global_protos[PROTOTYPES].to(device)
    labels = np.asarray(site.private.semantic_labels, dtype=np.int64)

    def term(z1, z2, index, za, anchor_index):
        rows = [row.get(int(c), -1) for c in labels[index]]
        keep = torch.tensor([i >= 0 for i in rows], device=device)
        if not bool(keep.any()):
            return z1.new_zeros(())
        target = protos[torch.tensor([max(i, 0) for i in rows], device=device)]
        dist = ((z1 - target) ** 2).sum(-1) + ((z2 - target) ** 2).sum(-1)
        return (dist * keep).sum() / (2 * keep.sum())
    return term


def fedproto(config: FedAnchorConfig, split: FederatedSplit) -> RivalRun:
    """FedProto-style prototype sharing. A label-privileged rival: sites use their class labels
    (``ModalityData.semantic_labels``), which fedanchor never does.

    Every site keeps its own model (build_model: trunk + GeoLoRA + projectors; it
    trains S, m, delta and its projector, never averaged; no parameter leaves the
    site). Each round it trains private two-view SSL plus ``alignment.lambda_cross``
    times the prototype term (squared distance of each private embedding to the
    previous round's global prototype of its class; none in round 0), then uploads
    the mean embedding of each class it holds (its private items, unaugmented) with
    the class ids and counts. The server averages the prototypes per class over all
    sites of all modalities, weighted by counts, and broadcasts them. No public data
    is used in training (FedProto has none); the anchors serve only the common
    scoring (centring on each modality's anchor mean). Each modality is scored with
    the model of the first site of that modality (split.private order).
    """
    started = time.perf_counter()
    sites = _own_model_sites(config, split)
    global_protos: dict[str, torch.Tensor] = {}  # round 0: the server has no prototypes yet and sends nothing
    bytes_up: list[dict[str, int]] = []
    bytes_down: list[dict[str, int]] = []
    losses: list[dict[str, dict[str, float]]] = []
    use_protos = config.alignment.lambda_cross > 0
    for r in range(config.rounds):
        up_round, down_round, loss_round, uploads = {}, {}, {}, []
        for name, site in sites.items():
            down_round[name] = tensor_nbytes(global_protos)
            extra = _prototype_term(site, global_protos) if (global_protos and use_protos) else None
            loss_round[name] = _own_round(config, site, r, extra)
            upload = class_prototypes(site.model, site.private)
            up_round[name] = tensor_nbytes(upload)
            uploads.append(upload)
        global_protos = merge_prototypes(uploads)
        bytes_up.append(up_round)
        bytes_down.append(down_round)
        losses.append(loss_round)
    evaluated = _first_site_per_modality(sites)
    metrics = score_models({m: s.model for m, s in evaluated.items()}, split, config)
    notes = {"rounds": config.rounds, "local_steps": config.train.local_steps, "label_privileged": True,
             "lambda_proto": config.alignment.lambda_cross, "classes": len(global_protos.get(CLASSES, [])),
             "evaluated_with": {m: s.name for m, s in evaluated.items()}, "losses": losses}
    return RivalRun(metrics, bytes_up, bytes_down, time.perf_counter() - started, notes)


# -- 0. local training only -----------------------------------------------------------------
def local_only(config: FedAnchorConfig, split: FederatedSplit) -> RivalRun:
    """No federation at all: every site trains its own model (S, m, delta, projector) on private two-view SSL.

    Nothing crosses the network (bytes 0). Each modality is scored with the model of
    its first site, so what its geometry shares with the other modality comes from
    the common frozen trunk and, at scoring, the anchor readout alone.
    """
    started = time.perf_counter()
    sites = _own_model_sites(config, split)
    losses = []
    for r in range(config.rounds):
        losses.append({name: _own_round(config, site, r) for name, site in sites.items()})
    evaluated = _first_site_per_modality(sites)
    metrics = score_models({m: s.model for m, s in evaluated.items()}, split, config)
    silent = [{name: 0 for name in sites} for _ in range(config.rounds)]
    notes = {"rounds": config.rounds, "local_steps": config.train.local_steps,
             "evaluated_with": {m: s.name for m, s in evaluated.items()}, "losses": losses}
    return RivalRun(metrics, silent, [dict(r) for r in silent], time.perf_counter() - started, notes)


# -- 3. CreamFL -------------------------------------------------------------------------
def creamfl(config: FedAnchorConfig, split: FederatedSplit) -> RivalRun:
    """CreamFL-style public-embedding sharing (simplified: no server model is trained).

    Every site keeps its own model (build_model; trains S, m, delta and its
    projector, never averaged). Each round the server sends every site the anchor
    representations of all modalities (N x p each), and the site trains private
    two-view SSL plus ``alignment.lambda_cross`` times fedanchor's anchor InfoNCE
    between its anchor embeddings and the other modalities' representations (same
    centring and duplicate mask as site.py). It then uploads its embeddings of all
    N public anchors of its modality (N x p floats). The server averages them per
    modality weighted by n_k. Round 0's representations are the initial model's
    (every site starts from the same build_model), as fedanchor's round-0 targets.
    CreamFL proper also distils the representations into a server model and uses
    intra-modal contrast; here the aggregated representations themselves are the
    global ones. Each modality is scored with the model of its first site.
    """
    _check_inputs(config, split)
    if len(split.anchors) < 2:
        raise ValueError("creamfl needs anchors in at least two modalities to share representations across")
    started = time.perf_counter()
    torch.manual_seed(config.train.seed)
    device = resolve_device(config.train.device)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    sites = _make_sites(config, split, device, lambda: build_model(config, modalities, split.feature_stats))
    # Every site's model equals build_model's before training, so any of them gives the initial representations.
    initial = next(iter(sites.values())).model
    reps = {m: initial.embed_all(m, split.anchors[m].items) for m in modalities}
    use_cross = config.alignment.lambda_cross > 0
    bytes_up: list[dict[str, int]] = []
    bytes_down: list[dict[str, int]] = []
    losses: list[dict[str, dict[str, float]]] = []
    for r in range(config.rounds):
        message = {ANCHOR_PREFIX + m: z for m, z in reps.items()}
        up_round, down_round, loss_round = {}, {}, {}
        uploads: dict[str, list[tuple[torch.Tensor, int]]] = {}
        for name, site in sites.items():
            down_round[name] = tensor_nbytes(message)
            extra = _anchor_term(config, site, reps) if use_cross else None
            loss_round[name] = _own_round(config, site, r, extra, use_anchors=use_cross)
            z = site.model.embed_all(site.modality, site.anchors.items)
            up_round[name] = tensor_nbytes({ANCHOR_PREFIX + site.modality: z})
            uploads.setdefault(site.modality, []).append((z, len(site.private)))
        for m, pairs in uploads.items():
            reps[m] = _weighted_mean([z for z, _ in pairs], [n for _, n in pairs])
        bytes_up.append(up_round)
        bytes_down.append(down_round)
        losses.append(loss_round)
    evaluated = _first_site_per_modality(sites)
    metrics = score_models({m: s.model for m, s in evaluated.items()}, split, config)
    notes = {"rounds": config.rounds, "local_steps": config.train.local_steps, "lambda_cross": config.alignment.lambda_cross,
             "n_anchors": len(next(iter(split.anchors.values()))), "server_model": False,
             "evaluated_with": {m: s.name for m, s in evaluated.items()}, "losses": losses}
    return RivalRun(metrics, bytes_up, bytes_down, time.perf_counter() - started, notes)


# -- 4. full fine-tuning, bytes only ---------------------------------------------------------
def full_finetune_bytes(config: FedAnchorConfig, split: FederatedSplit, site: str | None = None) -> int:
    """Bytes of one site's update if the whole trunk, the head and its projector were fine-tuned (no training).

    Every parameter of the untrained model without adapters (build_model with GeoLoRA
    stripped) that a full fine-tune would change and FedAvg would ship: the whole
    trunk (its word embeddings included: FedAvg ships the full model), the head and
    the site's tokenizer parameters, each tensor once (a text tokenizer shares the
    trunk's word embeddings); buffers are not counted. Serialized like
    ``SiteUpdate.nbytes``. ``site`` defaults to the first site of the split.
    """
    _check_inputs(config, split)
    name = site if site is not None else next(iter(split.private))
    if name not in split.private:
        raise ValueError(f"site {name!r} is not in the split; its sites are {list(split.private)}")
    modality = split.private[name].spec.name
    model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
    strip_geolora(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, module in (("trunk", model.trunk), ("head", model.head), (f"projector/{modality}", model.tokenizer(modality))):
        for key, param in module.named_parameters():
            if id(param) not in seen and param.is_floating_point():
                seen.add(id(param))
                tensors[f"{prefix}/{key}"] = param
    return tensor_nbytes(tensors)
