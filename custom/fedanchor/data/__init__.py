"""fedanchor.data: bundled paired scenarios, their federated split, views and corruptions.

>>> from fedanchor.data import load_scenario, split_scenario
>>> split = split_scenario(load_scenario("motion"), {"a": "accel", "b": "gyro"}, 10, 20, seed=0)
"""

from __future__ import annotations

from .augment import augment
from .corrupt import CORRUPTIONS, corrupt
from .scenario import (
    SCENARIOS,
    FederatedSplit,
    ModalityData,
    ModalityKind,
    ModalitySpec,
    PairedScenario,
    load_scenario,
)
from .split import anchor_fingerprint, feature_stats, split_scenario

__all__ = [
    "CORRUPTIONS",
    "SCENARIOS",
    "FederatedSplit",
    "ModalityData",
    "ModalityKind",
    "ModalitySpec",
    "PairedScenario",
    "anchor_fingerprint",
    "augment",
    "corrupt",
    "feature_stats",
    "load_scenario",
    "split_scenario",
]
