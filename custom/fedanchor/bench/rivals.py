"""Non-federated rivals: the paired ceiling, anchors-only training, anchor CCA and ASIF relative representations.

All of them are scored like the federated model (``score_models``): held-out pairs,
in the anchor CCA readout space (or anchor-centred when the readout is off),
``cross_modal_metrics``.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.nn import functional as F

from ..alignment.losses import paired_info_nce
from ..alignment.readout_choice import choose_readout, concatenated
from ..config import FedAnchorConfig
from ..data import load_scenario
from ..data.scenario import FederatedSplit, ModalityData
from ..evaluation import cross_modal_metrics
from ..federation.server import centre_on_anchors, fit_readout, to_scoring_space
from ..federation.site import resolve_device, same_items
from ..model.base_features import base_features
from ..model.homogeneous import HomogeneousTransformer, build_model, take_items


# -- data -----------------------------------------------------------------------
def true_pairs(split: FederatedSplit, with_anchors: bool = True) -> dict[str, ModalityData]:
    """Every private sample of every site with its true partners in the other modalities (looked up by sample id).

    Only the ceiling sees this: it is the pairing that federation never has.
    """
    scenario = load_scenario(split.scenario)
    first = next(iter(scenario.data.values()))
    row = {sid: i for i, sid in enumerate(first.sample_ids)}
    ids: list[str] = list(next(iter(split.anchors.values())).sample_ids) if with_anchors else []
    for private in split.private.values():
        ids += list(private.sample_ids)
    ids = list(dict.fromkeys(ids))
    index = np.array([row[s] for s in ids], dtype=np.int64)
    return {m: scenario.data[m].subset(index) for m in split.anchors}


# -- centralised CLIP-style training ---------------------------------------------
def clip_loss(za: torch.Tensor, zb: torch.Tensor, temperature: float, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on batch-centred unit vectors; identical items on either side count as positives."""
    return paired_info_nce(za - za.mean(0, keepdim=True), zb - zb.mean(0, keepdim=True), temperature, positives)


def train_centralised(config: FedAnchorConfig, split: FederatedSplit, pairs: Mapping[str, ModalityData], steps: int,
                      seed: int) -> HomogeneousTransformer:
    """The fedanchor model (trunk + GeoLoRA + projectors), trained on ``pairs`` in one place, CLIP-style."""
    torch.manual_seed(seed)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    device = resolve_device(config.train.device)
    model = build_model(config, modalities, split.feature_stats).to(device)
    adapters = [p for layer in model.adapters().values() for p in (layer.S, layer.m, layer.delta)]
    projectors = [p for m in modalities for p in model.tokenizer(m).parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([{"params": adapters, "lr": config.train.lr},
                                  {"params": projectors, "lr": config.train.projector_lr}], weight_decay=config.train.weight_decay)
    names = list(pairs)
    n = len(pairs[names[0]])
    batch = min(max(config.train.batch_size, config.alignment.anchor_batch), n)
    rng = np.random.default_rng([seed, 11])
    model.train()
    for _ in range(steps):
        index = rng.choice(n, size=batch, replace=False)
        items = {m: take_items(pairs[m].items, index) for m in names}
        z = {m: model.embed(m, items[m]) for m in names}
        loss = z[names[0]].new_zeros(())
        combos = list(itertools.combinations(names, 2))
        for a, b in combos:
            positives = (same_items(items[a]) | same_items(items[b])).to(z[a].device)
            loss = loss + clip_loss(z[a], z[b], config.alignment.temperature, positives) / len(combos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def score_models(models: Mapping[str, HomogeneousTransformer], split: FederatedSplit, config: FedAnchorConfig) -> dict[str, float]:
    """Score every learned method the way the fedanchor server scores its global model.

    ``models[m]`` embeds modality m (one shared model, or a site's own model for
    rivals that keep one per site). The test items go into the anchor readout chosen
    by cross-validation on the anchors over the job's blocks (the models' embeddings
    and the items' base features; no codebook) when ``config.alignment.readout`` is "cca" (the
    server's default), else into the anchor-centred space.
    """
    missing = [m for m in split.test if m not in models]
    if missing:
        raise ValueError(f"no model to embed test modality(ies) {missing}; every test modality needs at least one site")
    anchors = {m: models[m].embed_all(m, split.anchors[m].items) for m in split.test}
    tests = {m: models[m].embed_all(m, d.items) for m, d in split.test.items()}
    cfg = config.alignment
    if cfg.readout != "cca":
        return cross_modal_metrics(to_scoring_space(tests, anchors, None), _labels(split))
    # A rival's model has no private codebook: the sites that would send its centroids are fedanchor's.
    blocks = tuple(b for b in cfg.readout_blocks if b != "codebook")
    base = "base" in blocks
    anchor_base = {m: base_features(models[m], m, split.anchors[m].items, cfg.readout_text_tokens) for m in split.test} if base else None
    test_base = {m: base_features(models[m], m, d.items, cfg.readout_text_tokens) for m, d in split.test.items()} if base else None
    readout, choice = fit_readout(config, anchors, anchor_base, blocks)
    metrics = cross_modal_metrics(to_scoring_space(tests, anchors, readout, test_base, blocks), _labels(split))
    return {**metrics, **{f"readout/weight/{k}": v for k, v in choice.weights.items()}, "anchor_cv/mrr": choice.cv_mrr}


def _labels(split: FederatedSplit) -> dict[str, np.ndarray]:
    return {m: np.asarray(d.semantic_labels) for m, d in split.test.items()}


# -- training-free features for CCA and ASIF --------------------------------------
def frozen_features(config: FedAnchorConfig, split: FederatedSplit, seed: int,
                    extra: Mapping[str, ModalityData] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str], dict[str, np.ndarray]]:
    """(anchor features, test features, what they are, features of ``extra``) per modality: the base features
    (model/base_features.py) that fedanchor's readout also reads: raw arrays, multi-hot code sets, the frozen
    trunk's mean-pooled embedding of the whole text."""
    torch.manual_seed(seed)
    model = build_model(config, {k: v.spec for k, v in split.anchors.items()}, split.feature_stats)
    model.eval()
    tokens = config.alignment.readout_text_tokens
    what = {"codes": "multi-hot code sets", "text": f"frozen {config.trunk.name} trunk, mean-pooled over {tokens} tokens"}
    anchors, test, source, more = {}, {}, {}, {}
    for m, d in split.anchors.items():
        anchors[m] = base_features(model, m, d.items, tokens)
        test[m] = base_features(model, m, split.test[m].items, tokens)
        if extra is not None:
            more[m] = base_features(model, m, extra[m].items, tokens)
        source[m] = what.get(d.spec.kind, "raw values, flattened")
    return anchors, test, source, more


def cca_rival(anchor_f: Mapping[str, np.ndarray], test_f: Mapping[str, np.ndarray], split: FederatedSplit,
              extra_blocks: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None, folds: int = 5, seed: int = 0,
              **grid: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Ridge CCA fitted on the anchor pairs with truncation, ridge and directions chosen by cross-validation on the
    anchors: the same choice (``choose_readout``, with the same fold shuffles for the same ``seed``) as fedanchor's
    readout, on the base block alone or with ``extra_blocks`` (modality -> feature function of base features, e.g.
    an anchor codebook)."""
    def blocks(features: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
        return {m: {"base": x, **({"codebook": extra_blocks[m](x)} if extra_blocks else {})} for m, x in features.items()}
    readout, choice = choose_readout(blocks(anchor_f), folds=folds, seed=seed, **grid)
    tests = concatenated(blocks(test_f))
    embeddings = {m: readout.apply(m, torch.from_numpy(x)).float() for m, x in tests.items()}
    return cross_modal_metrics(embeddings, _labels(split)), {**choice.as_dict(), "chosen_by": f"{choice.folds}-fold CV on the pairs it was fitted on"}


def asif_rival(anchor_f: Mapping[str, np.ndarray], test_f: Mapping[str, np.ndarray], split: FederatedSplit,
               top_k: int | None = None, power: float = 3.0) -> tuple[dict[str, float], dict[str, float]]:
    """ASIF-style relative representations: cosine to each anchor of the item's own modality, top-k kept, raised to a power."""
    n = next(iter(anchor_f.values())).shape[0]
    k = int(top_k or max(4, n // 5))

    def relrep(x: np.ndarray, anchors: np.ndarray, mu: np.ndarray) -> torch.Tensor:
        xs = x - mu
        an = anchors - mu
        xs /= np.linalg.norm(xs, axis=1, keepdims=True) + 1e-12
        an /= np.linalg.norm(an, axis=1, keepdims=True) + 1e-12
        sims = xs @ an.T
        keep = np.argsort(-sims, axis=1)[:, :k]
        out = np.zeros_like(sims)
        rows = np.arange(len(sims))[:, None]
        out[rows, keep] = np.maximum(sims[rows, keep], 0.0) ** power
        return F.normalize(torch.from_numpy(out.astype(np.float32)), dim=-1)

    embeddings = {}
    for m in anchor_f:
        mu = anchor_f[m].mean(0)
        za = relrep(anchor_f[m], anchor_f[m], mu)
        embeddings[m] = centre_on_anchors(relrep(test_f[m], anchor_f[m], mu), za)
    return cross_modal_metrics(embeddings, _labels(split)), {"top_k": k, "power": power}
