"""Paired multimodal scenarios: the containers every other part of fedanchor reads.

A scenario is a set of n samples seen in two or more modalities, row i of every
modality being the same sample. ``split_scenario`` (in ``split.py``) turns one
into public anchors, a held-out test set and unpaired private site shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import numpy as np

ModalityKind = Literal["text", "codes", "vector", "image", "signal"]
MODALITY_KINDS: tuple[str, ...] = ("text", "codes", "vector", "image", "signal")
ARRAY_KINDS: tuple[str, ...] = ("vector", "image", "signal")
# Items each kind's arrays must have per sample: vector (D,), image (H, W), signal (C, T).
_ARRAY_NDIM = {"vector": 1, "image": 2, "signal": 2}

Items = Union[list[str], list[tuple[int, ...]], np.ndarray]

SCENARIOS: tuple[str, ...] = ("xray", "digits", "motion")


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's items look like."""

    name: str
    kind: ModalityKind
    shape: tuple[int, ...] = ()
    vocab: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModalitySpec.name is empty; give the modality a name such as 'report'")
        if self.kind not in MODALITY_KINDS:
            raise ValueError(
                f"ModalitySpec {self.name!r} has kind={self.kind!r}; use one of {MODALITY_KINDS}"
            )
        if self.kind in ARRAY_KINDS and len(self.shape) != _ARRAY_NDIM[self.kind]:
            raise ValueError(
                f"ModalitySpec {self.name!r} of kind {self.kind!r} needs a shape of "
                f"{_ARRAY_NDIM[self.kind]} dimension(s), got shape={self.shape}"
            )
        if self.kind not in ARRAY_KINDS and self.shape:
            raise ValueError(
                f"ModalitySpec {self.name!r} of kind {self.kind!r} takes no shape; pass shape=()"
            )
        if self.kind != "codes" and self.vocab:
            raise ValueError(f"ModalitySpec {self.name!r} of kind {self.kind!r} takes no vocab; pass vocab=()")

    @property
    def is_array(self) -> bool:
        return self.kind in ARRAY_KINDS


@dataclass
class ModalityData:
    """One modality's items for a subset of a scenario's samples."""

    spec: ModalitySpec
    items: Items
    sample_ids: list[str]
    semantic_labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.items)
        if len(self.sample_ids) != n or len(self.semantic_labels) != n:
            raise ValueError(
                f"modality {self.spec.name!r}: {n} items but {len(self.sample_ids)} sample_ids "
                f"and {len(self.semantic_labels)} semantic_labels; they must match row for row"
            )
        if self.spec.is_array:
            if not isinstance(self.items, np.ndarray) or self.items.shape[1:] != self.spec.shape:
                got = getattr(self.items, "shape", type(self.items).__name__)
                raise ValueError(
                    f"modality {self.spec.name!r}: items must be an ndarray of shape "
                    f"(n, {', '.join(map(str, self.spec.shape))}), got {got}"
                )

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, index: Sequence[int] | np.ndarray) -> ModalityData:
        """Rows ``index`` (in that order) as a new ModalityData; arrays are copied."""
        idx = np.asarray(index)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(
                f"subset index must be a 1-D sequence of integer row numbers, got dtype={idx.dtype} "
                f"ndim={idx.ndim}; convert a boolean mask with np.flatnonzero(mask)"
            )
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(
                f"subset index out of range for modality {self.spec.name!r} with {n} rows: "
                f"min={int(idx.min())}, max={int(idx.max())}"
            )
        if isinstance(self.items, np.ndarray):
            items: Items = self.items[idx]  # fancy indexing copies, so the result is writable
        else:
            items = [self.items[i] for i in idx.tolist()]
        return ModalityData(
            spec=self.spec,
            items=items,
            sample_ids=[self.sample_ids[i] for i in idx.tolist()],
            semantic_labels=np.asarray(self.semantic_labels, dtype=np.int64)[idx],
        )


@dataclass
class PairedScenario:
    """n samples in every modality; row i of each ModalityData is the same sample."""

    name: str
    modalities: dict[str, ModalitySpec]
    data: dict[str, ModalityData]
    semantic_names: list[str]
    licence: str

    def __post_init__(self) -> None:
        if list(self.modalities) != list(self.data):
            raise ValueError(
                f"scenario {self.name!r}: modalities {list(self.modalities)} and data "
                f"{list(self.data)} must name the same modalities in the same order"
            )
        lengths = {m: len(d) for m, d in self.data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"scenario {self.name!r}: modalities differ in length {lengths}; they must be paired")
        ids = [d.sample_ids for d in self.data.values()]
        if any(other != ids[0] for other in ids[1:]):
            raise ValueError(f"scenario {self.name!r}: modalities list different sample_ids; rows must be paired")

    def __len__(self) -> int:
        return len(next(iter(self.data.values()))) if self.data else 0


@dataclass
class FederatedSplit:
    """A scenario dealt out: public paired anchors, paired test set, unpaired site shards."""

    scenario: str
    seed: int
    anchors: dict[str, ModalityData]
    test: dict[str, ModalityData]
    private: dict[str, ModalityData]
    site_modality: dict[str, str]
    anchor_fingerprint: str
    feature_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def without(self, site: str) -> "FederatedSplit":
        """The same split with ``site`` gone: the federation without it (the same anchors, test pairs and shards)."""
        if site not in self.private:
            raise ValueError(f"site {site!r} is not one of this split's sites {sorted(self.private)}")
        return dataclasses.replace(self, private={s: d for s, d in self.private.items() if s != site},
                                   site_modality={s: m for s, m in self.site_modality.items() if s != site})


def _freeze(scenario: PairedScenario) -> PairedScenario:
    # The cached scenario is shared by every caller in the process; read-only
    # arrays stop one caller's in-place edit from silently changing another's data.
    for d in scenario.data.values():
        if isinstance(d.items, np.ndarray):
            d.items.setflags(write=False)
        d.semantic_labels.setflags(write=False)
    return scenario


@functools.lru_cache(maxsize=None)
def load_scenario(name: str) -> PairedScenario:
    """Load a bundled scenario by name (one of SCENARIOS); parsed once per process."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {SCENARIOS}")
    # Imported here because the loaders import this module for the dataclasses.
    if name == "xray":
        from .xray import load_xray as loader
    elif name == "digits":
        from .digits import load_digits as loader
    else:
        from .motion import load_motion as loader
    return _freeze(loader())
