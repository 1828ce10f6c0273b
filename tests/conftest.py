"""Shared fixtures: a tiny random-init trunk so almost the whole suite runs on a CPU in seconds."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from fedanchor.config import FedAnchorConfig, config_from_dict


def tiny_config(**sections) -> FedAnchorConfig:
    """A config on the tiny trunk with small, fast defaults; sections override nested keys."""
    values = {
        "trunk": {"name": "tiny", "embed_dim": 32, "max_text_tokens": 24},
        "adapter": {"rank": 4},
        "train": {"local_steps": 6, "batch_size": 8, "lr": 5e-3},
        "precision": {"window": 4, "site_scalar_samples": 2, "site_scalar_anchors": 8},
        # One pass of the readout's 5-fold choice: the automatic repeats (13 on 16 anchors) cost seconds a round.
        "alignment": {"anchor_batch": 8, "readout_repeats": 1},
        "data": {"scenario": "motion", "n_anchors": 16, "n_test": 24},
        "rounds": 2,
    }
    for section, overrides in sections.items():
        if isinstance(overrides, dict):
            values.setdefault(section, {}).update(overrides)
        else:
            values[section] = overrides
    return config_from_dict(values)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def merge_coefficients(updates, sample_exponent: float, factors=None) -> dict[str, dict[str, torch.Tensor]]:
    """Site -> S/m key -> the coefficient of that site's value in the server's merge, written out from the design
    (FederatedServer.accept and finish_round), not computed by PrecisionWeightedMerge:

    within a modality a site weighs a_k pi_k n_k**gamma Lambda_k / mean(Lambda_k) per coefficient, a_k its checks'
    factors (``factors``, 1 for a site not named); each modality's precision-weighted mean then enters with its share
    of the mass sum_k a_k n_k**gamma. The coefficients of one entry sum to one over the sites.
    """
    updates = list(updates)
    factors = factors or {}
    mass = {u.site: factors.get(u.site, 1.0) * float(u.n_samples) ** sample_exponent for u in updates}
    modality_mass: dict[str, float] = {}
    for u in updates:
        modality_mass[u.modality] = modality_mass.get(u.modality, 0.0) + mass[u.site]
    total = sum(modality_mass.values())
    raw = {u.site: {k: u.uncertainty * mass[u.site] * p.double() / p.double().mean() for k, p in u.precision.items()}
           for u in updates}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for u in updates:
        peers = [v.site for v in updates if v.modality == u.modality]
        out[u.site] = {k: modality_mass[u.modality] / total * w / sum(raw[s][k] for s in peers) for k, w in raw[u.site].items()}
    return out


def weighted_cores(updates, coefficients) -> dict[str, torch.Tensor]:
    """sum_k c_k * x_k (float64) for every S and m key."""
    updates = list(updates)
    keys = coefficients[updates[0].site]
    return {k: sum(coefficients[u.site][k] * u.params[k].double() for u in updates) for k in keys}


def assert_png_drawn(path, size_inches: tuple[float, float], dpi: int = 110) -> None:
    """A PNG that decodes to the figure's size in pixels and shows a drawing: some of it is ink (lines, text, points)
    and most of it is not (not blank, not one flat colour)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        width, height = image.size
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert abs(width - size_inches[0] * dpi) <= 1 and abs(height - size_inches[1] * dpi) <= 1, (width, height)
    ink = float((grey < 160).mean())
    assert 0.003 < ink < 0.5, f"{path}: {ink:.2%} of the pixels are ink"


def fedanchor_configs(node):
    """Every fedanchor config dict inside a job's JSON (the server's and the sites' copies)."""
    if isinstance(node, dict):
        if "rounds" in node and "train" in node and "data" in node:
            yield node
        for value in node.values():
            yield from fedanchor_configs(value)
    elif isinstance(node, list):
        for value in node:
            yield from fedanchor_configs(value)


def changed_job(job: Path, out: Path, changes: dict) -> Path:
    """A copy of the job folder ``job`` at ``out`` with dotted fedanchor settings changed in every copy of its config;
    the key 'meta.scope' changes the job's privacy scope, 'custom code' adds a code file to every app."""
    shutil.copytree(job, out)
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text())
    for key, value in changes.items():
        if key == "meta.scope":
            meta["scope"] = value
        elif key == "custom code":
            for app in meta["deploy_map"]:
                (out / app / "custom").mkdir(exist_ok=True)
                (out / app / "custom" / "extra.py").write_text("print('hello')\n")
    meta_file.write_text(json.dumps(meta))
    for path in out.rglob("*.json"):
        data = json.loads(path.read_text())
        configs = list(fedanchor_configs(data))
        for config in configs:
            for key, value in changes.items():
                if key in ("meta.scope", "custom code"):
                    continue
                *parents, leaf = key.split(".")
                node = config
                for part in parents:
                    node = node[part]
                node[leaf] = value
        if configs:
            path.write_text(json.dumps(data))
    return out
