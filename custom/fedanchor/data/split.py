"""Deal a paired scenario into public anchors, a paired test set and unpaired site shards.

One seeded permutation decides everything: its first ``n_anchors`` samples are the
public anchors, the next ``n_test`` the held-out test set, and the rest are dealt
round-robin to the sites (sorted by name), each site keeping only its own modality.
No sample reaches two sites, so no pairing leaks except through the anchors.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping

import numpy as np

from .scenario import FederatedSplit, ModalityData, PairedScenario

STD_FLOOR = 1e-6


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} is too small; {hint}")
    return int(value)


def _check_sites(scenario: PairedScenario, site_modality: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(site_modality, Mapping) or not site_modality:
        raise ValueError(
            "site_modality must be a non-empty mapping of site name -> modality name, "
            f"e.g. {{'site-1': {next(iter(scenario.modalities), 'report')!r}}}"
        )
    seen: dict[str, str] = {}
    for site, modality in site_modality.items():
        if not isinstance(site, str) or not site.strip():
            raise ValueError(f"site name {site!r} is empty or not a string; give every site a non-empty name")
        key = site.strip()
        if key in seen:
            raise ValueError(f"site names {seen[key]!r} and {site!r} are the same once stripped; make them unique")
        seen[key] = site
        if modality not in scenario.modalities:
            raise ValueError(
                f"site {site!r} asks for modality {modality!r}, which scenario {scenario.name!r} "
                f"does not have; valid modalities: {list(scenario.modalities)}"
            )
    return {site: site_modality[site] for site in sorted(site_modality)}


def _canonical_bytes(data: ModalityData) -> bytes:
    spec = data.spec
    header = {
        "name": spec.name,
        "kind": spec.kind,
        "shape": list(spec.shape),
        "vocab": list(spec.vocab),
        "sample_ids": list(data.sample_ids),
        "semantic_labels": [int(v) for v in np.asarray(data.semantic_labels)],
    }
    if spec.is_array:
        # Little-endian float32, C order: the same content hashes the same on any machine.
        body = np.ascontiguousarray(np.asarray(data.items, dtype="<f4")).tobytes()
        header["items_shape"] = list(np.shape(data.items))
    elif spec.kind == "codes":
        body = json.dumps([[int(c) for c in item] for item in data.items]).encode()
    else:
        body = json.dumps(list(data.items), ensure_ascii=False).encode("utf-8")
    head = json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8")
    # Length prefixes keep the concatenation unambiguous.
    return len(head).to_bytes(8, "little") + head + len(body).to_bytes(8, "little") + body


def anchor_fingerprint(anchors: Mapping[str, ModalityData]) -> str:
    """sha256 hex over every anchor modality (in the mapping's order): spec, ids, labels, items."""
    if not anchors:
        raise ValueError("anchors is empty; pass the split's anchors (modality name -> ModalityData)")
    digest = hashlib.sha256(b"fedanchor-anchors-v1")
    for name, data in anchors.items():
        name_bytes = name.encode("utf-8")
        digest.update(len(name_bytes).to_bytes(8, "little") + name_bytes)
        digest.update(_canonical_bytes(data))
    return digest.hexdigest()


def feature_stats(anchors: Mapping[str, ModalityData]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, std) per array modality, broadcastable to one item, from the given (public) rows.

    vector: per feature (D,); image: one global value (1, 1); signal: per channel (C, 1).
    std is floored at STD_FLOOR so standardising never divides by zero.
    """
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, data in anchors.items():
        if not data.spec.is_array:
            continue
        x = np.asarray(data.items, dtype=np.float64)
        if data.spec.kind == "vector":
            axes: tuple[int, ...] = (0,)
        elif data.spec.kind == "image":
            axes = (0, 1, 2)
        else:
            axes = (0, 2)
        mean = x.mean(axis=axes)
        std = np.maximum(x.std(axis=axes), STD_FLOOR)
        shape = {"vector": data.spec.shape, "image": (1, 1), "signal": (data.spec.shape[0], 1)}[data.spec.kind]
        stats[name] = (mean.reshape(shape).astype(np.float32), std.reshape(shape).astype(np.float32))
    return stats


def split_scenario(
    scenario: PairedScenario,
    site_modality: Mapping[str, str],
    n_anchors: int,
    n_test: int,
    seed: int,
    max_private_per_site: int | None = None,
) -> FederatedSplit:
    """Split ``scenario`` by ``seed``; see the module docstring for the rules."""
    sites = _check_sites(scenario, site_modality)
    n_anchors = _check_int("n_anchors", n_anchors, 2, "alignment needs at least 2 paired anchors")
    n_test = _check_int("n_test", n_test, 1, "evaluation needs at least 1 held-out test pair")
    seed = _check_int("seed", seed, 0, "use a non-negative integer seed")
    if max_private_per_site is not None:
        max_private_per_site = _check_int(
            "max_private_per_site", max_private_per_site, 1, "use None for no cap, or a cap of at least 1"
        )
    n = len(scenario)
    left = n - n_anchors - n_test
    if left < len(sites):
        raise ValueError(
            f"n_anchors={n_anchors} + n_test={n_test} leaves {max(left, 0)} of {n} samples for "
            f"{len(sites)} site{'s' if len(sites) != 1 else ''} (each needs at least 1); "
            "lower n_test or n_anchors"
        )

    order = np.random.default_rng(seed).permutation(n)
    anchor_idx = order[:n_anchors]
    test_idx = order[n_anchors : n_anchors + n_test]
    rest = order[n_anchors + n_test :]

    anchors = {m: d.subset(anchor_idx) for m, d in scenario.data.items()}
    test = {m: d.subset(test_idx) for m, d in scenario.data.items()}
    private: dict[str, ModalityData] = {}
    for k, (site, modality) in enumerate(sites.items()):
        shard = rest[k :: len(sites)]  # round-robin deal: shard sizes differ by at most one
        if max_private_per_site is not None:
            shard = shard[:max_private_per_site]
        private[site] = scenario.data[modality].subset(shard)

    return FederatedSplit(
        scenario=scenario.name,
        seed=seed,
        anchors=anchors,
        test=test,
        private=private,
        site_modality=dict(sites),
        anchor_fingerprint=anchor_fingerprint(anchors),
        feature_stats=feature_stats(anchors),
    )
