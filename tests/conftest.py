"""Shared fixtures: a tiny random-init trunk so almost the whole suite runs on a CPU in seconds."""
from __future__ import annotations

import os

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
