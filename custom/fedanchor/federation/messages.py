"""What crosses the network, as plain data: the global state down, a site's update up.

Both convert to and from a flat ``dict[str, numpy.ndarray]`` plus a JSON-able
meta dict, which is what a FLARE DXO carries, so the FLARE components never touch
the maths. docs/DESIGN.md, "What crosses the network" is the contract:

Up, per site per round: S and its precision, m and its precision, the projector
of the site's modality, the Gram upper triangle on public anchors, n_k, one
uncertainty scalar, metrics, the digest of the (public, global) bases it trained on;
in a basis refresh's gradient round (adapters/refresh.py) also G V and G^T U per
layer, means over the site's steps and samples; once, until the server has built
the private codebook (alignment/codebook.py), the centroids of the site's clusters
of at least ``alignment.codebook_min_cluster`` private items and their sizes. Down:
S, m, the projectors, K_bar, the anchor targets and the anchor CCA readout fitted
on them, the codebook's public projection and, once built, its centres, and U and V
unless the site already holds them (``GlobalState.without_basis``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..alignment.codebook import FORM_CODES, Codebook, CodebookProjection, form_of_code
from ..alignment.readout import AnchorReadout

PARAM_PREFIX = "param/"
PRECISION_PREFIX = "log_precision/"  # precisions travel as float16 logarithms
BASIS_GRADIENT_PREFIX = "basis_grad/"  # refresh gradient rounds only: basis_grad/adapter/<layer>/U is G V, .../V is G^T U
GRAM_KEY = "gram_upper"  # travels as float16
# Precisions and the Gram are statistics that only weigh and steer the merge (the server normalises each site's
# precisions to unit mean; centred, unit-norm Gram entries lie in [-1, 1]), so they travel at half precision; the
# parameters themselves stay float32 so that the merge stays exact. log keeps precisions of 1e-8..1e8 in float16's range.
# Down, the consensus Gram and the anchor targets (unit vectors) only steer the sites' anchor terms: half precision too.
WIRE_STATISTICS = torch.float16
CONSENSUS_KEY = "consensus/gram_upper"
BASIS_DIGEST_KEY = "basis_digest"  # meta of a state sent without U and V: the bases it runs on
TARGET_PREFIX = "targets/"
READOUT_PREFIX = "readout/"  # readout/<modality>/mean, /proj: the anchor readout; /anchors: the anchors in its space
CODEBOOK_PREFIX = "codebook/"  # down: codebook/<modality>/mean, /linear (the projection), /centres, /scale, /form
CODEBOOK_CENTROIDS = "codebook/centroids"  # up: a site's cluster centroids (clusters x components) ...
CODEBOOK_COUNTS = "codebook/counts"  # ... and how many private items each averages


def adapter_key(layer: str, part: str) -> str:
    """Name of a shared adapter tensor: part is S, m, U or V."""
    return f"adapter/{layer}/{part}"


def projector_key(modality: str, param: str) -> str:
    return f"projector/{modality}/{param}"


def is_core_or_magnitude(key: str) -> bool:
    return key.startswith("adapter/") and key.rsplit("/", 1)[-1] in ("S", "m")


def is_basis(key: str) -> bool:
    return key.startswith("adapter/") and key.rsplit("/", 1)[-1] in ("U", "V")


def basis_digest(tensors: Mapping[str, Any]) -> str | None:
    """SHA-256 of every shared basis U and V (names, shapes, float32 bytes), or None when there is none."""
    keys = sorted(k for k in tensors if is_basis(k))
    if not keys:
        return None
    h = hashlib.sha256()
    for key in keys:
        value = tensors[key]
        array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
        array = np.ascontiguousarray(array, dtype=np.float32)
        h.update(f"{key}:{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def _log_wire(precision: torch.Tensor) -> torch.Tensor:
    """log(precision) as it travels; non-positive precisions become NaN or -inf, which the server's check rejects."""
    return precision.detach().cpu().double().log().to(WIRE_STATISTICS)


def tensor_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a message's arrays as they are serialized (what a FLARE DXO carries; the meta dict is not counted)."""
    return int(sum(a.nbytes for a in _to_numpy(tensors).values()))


def _to_torch(arrays: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


@dataclass
class GlobalState:
    """The server's state that every site receives at the start of a round."""

    round: int
    anchor_fingerprint: str
    tensors: dict[str, torch.Tensor]  # adapter/*, projector/*, consensus/gram_upper, targets/<modality>, readout/*, codebook/*
    meta: dict[str, Any] = field(default_factory=dict)

    def shared_params(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith(("adapter/", "projector/"))}

    def consensus(self) -> torch.Tensor | None:
        kernel = self.tensors.get(CONSENSUS_KEY)
        return kernel.float() if kernel is not None else None  # travels as float16

    def targets(self) -> dict[str, torch.Tensor]:
        return {k[len(TARGET_PREFIX):]: v.float() for k, v in self.tensors.items() if k.startswith(TARGET_PREFIX)}

    def nbytes(self) -> int:
        """Bytes down: what the server sends each site at the start of a round."""
        return tensor_nbytes(self.tensors)

    def has_basis(self) -> bool:
        return any(is_basis(k) for k in self.tensors)

    def basis_digest(self) -> str | None:
        """The digest of the bases this state runs on: computed when it carries them, else the one it names."""
        return basis_digest(self.tensors) if self.has_basis() else self.meta.get(BASIS_DIGEST_KEY)

    def without_basis(self) -> "GlobalState":
        """This state for a site that already holds its bases: U and V left out, their digest in the meta.
        The bases are most of what goes down with MiniLM (the bench prints bytes down per round) and change only at
        a refresh."""
        digest = self.basis_digest()
        if digest is None:
            raise ValueError("the state names no basis: it can only travel whole")
        tensors = {k: v for k, v in self.tensors.items() if not is_basis(k)}
        return GlobalState(self.round, self.anchor_fingerprint, tensors, {**self.meta, BASIS_DIGEST_KEY: digest})

    def readout(self) -> "AnchorReadout | None":
        """The anchor CCA readout the server fitted on this state's anchor targets, if the job uses one."""
        means = {k.split("/")[1]: v for k, v in self.tensors.items() if k.startswith(READOUT_PREFIX) and k.endswith("/mean")}
        if not means:
            return None
        projections = {m: self.tensors[f"{READOUT_PREFIX}{m}/proj"] for m in means}
        return AnchorReadout(means, projections, self.tensors.get(READOUT_PREFIX + "correlations", torch.zeros(0)))

    def scored_anchors(self) -> dict[str, torch.Tensor]:
        """Every modality's anchors in the readout's space (travel as float16): what a site validates against."""
        return {k[len(READOUT_PREFIX):-len("/anchors")]: v.float() for k, v in self.tensors.items()
                if k.startswith(READOUT_PREFIX) and k.endswith("/anchors")}

    def codebook_projections(self) -> dict[str, CodebookProjection]:
        """Per modality, the public projection its private codebook lives in (sent from round 0 on)."""
        return {m: CodebookProjection(self.tensors[f"{CODEBOOK_PREFIX}{m}/mean"].double().numpy(),
                                      self.tensors[f"{CODEBOOK_PREFIX}{m}/linear"].double().numpy())
                for m in self._codebook_modalities("mean")}

    def codebooks(self) -> dict[str, Codebook]:
        """Per modality, its private codebook, once the server has built it (empty before)."""
        projections = self.codebook_projections()
        return {m: Codebook(projections[m], self.tensors[f"{CODEBOOK_PREFIX}{m}/centres"].double().numpy(),
                            float(self.tensors[f"{CODEBOOK_PREFIX}{m}/scale"]), form_of_code(self._codebook_form_code(m)))
                for m in self._codebook_modalities("centres")}

    def _codebook_form_code(self, modality: str) -> float:
        """The block's form code; older states carry a 0/1 position flag (the same codes) or, older still, none: their
        blocks had the position."""
        for name in ("form", "position"):
            if f"{CODEBOOK_PREFIX}{modality}/{name}" in self.tensors:
                return float(self.tensors[f"{CODEBOOK_PREFIX}{modality}/{name}"].item())
        return FORM_CODES["assignment+position"]

    def has_codebook(self) -> bool:
        """Whether the server has built the private codebook (its centres travel with the state)."""
        return bool(self._codebook_modalities("centres"))

    def _codebook_modalities(self, part: str) -> list[str]:
        return sorted(k[len(CODEBOOK_PREFIX):-len(part) - 1] for k in self.tensors
                      if k.startswith(CODEBOOK_PREFIX) and k.endswith("/" + part))

    def readout_blocks(self, configured: tuple[str, ...]) -> tuple[str, ...]:
        """The blocks this state's readout reads: the configured ones, without the codebook before it is built."""
        return tuple(b for b in configured if b != "codebook" or self.has_codebook())

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta = {"round": self.round, "anchor_fingerprint": self.anchor_fingerprint, **self.meta}
        return _to_numpy(self.tensors), meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> "GlobalState":
        missing = [k for k in ("round", "anchor_fingerprint") if k not in meta]
        if missing:
            raise ValueError(f"global state meta lacks {missing}; was it written by fedanchor?")
        extra = {k: v for k, v in meta.items() if k not in ("round", "anchor_fingerprint")}
        return cls(round=int(meta["round"]), anchor_fingerprint=str(meta["anchor_fingerprint"]), tensors=_to_torch(arrays), meta=extra)


def _meta_number(meta: Mapping[str, Any], key: str, what: str = "meta") -> float:
    """A number of a site update's meta as a float; anything else (None, text, a list) is refused by name."""
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"site update {what} {key}={value!r} is not a number")
    return float(value)


def _meta_whole(meta: Mapping[str, Any], key: str) -> int:
    """A whole number of a site update's meta (a round, a sample count): 3 and 3.0 pass, 2.5, inf and text do not."""
    value = _meta_number(meta, key)
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"site update meta {key}={meta[key]!r} is not a whole number")
    return int(value)


ARRAY_FIELDS = ("params", "precision", "gram_upper", "basis_gradients", "codebook_centroids", "codebook_counts")  # the SiteUpdate fields that travel as arrays


@dataclass
class SiteUpdate:
    """One site's contribution to one round."""

    site: str
    modality: str
    round: int
    anchor_fingerprint: str
    params: dict[str, torch.Tensor]  # adapter/<layer>/S, adapter/<layer>/m, projector/<own modality>/*
    precision: dict[str, torch.Tensor]  # Lambda for every S and m key (float64), before the sample-count factor
    gram_upper: torch.Tensor  # upper triangle of the site's centred, normalised anchor Gram
    n_samples: int
    uncertainty: float  # pi_k: inverse embedding spread under sampled cores (1.0 when not estimated)
    metrics: dict[str, float] = field(default_factory=dict)
    basis_gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # refresh gradient rounds: adapter/<layer>/U|V
    basis_digest: str = ""  # the bases the site trained on (it holds them: the next state may leave them out)
    codebook_centroids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # until the codebook is built
    codebook_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def __post_init__(self) -> None:
        # Round the statistics to what the wire carries, so an in-process run merges exactly what FLARE would.
        self.precision = {k: _log_wire(v).double().exp() for k, v in self.precision.items()}
        self.gram_upper = self.gram_upper.detach().to(WIRE_STATISTICS).float()
        # Basis gradients only steer where the server extends the bases; the merge stays exact whatever bases it picks.
        # Clamped into float16's range: an overflow would read as Inf, which the server refuses.
        self.basis_gradients = {k: v.detach().cpu().clamp(-6e4, 6e4).to(WIRE_STATISTICS).float()
                                for k, v in self.basis_gradients.items()}

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {PARAM_PREFIX + k: v for k, v in _to_numpy(self.params).items()}
        arrays.update({PRECISION_PREFIX + k: _log_wire(v).numpy() for k, v in self.precision.items()})
        arrays[GRAM_KEY] = self.gram_upper.detach().cpu().to(WIRE_STATISTICS).numpy()
        arrays.update({BASIS_GRADIENT_PREFIX + k: v.astype(np.float16) for k, v in _to_numpy(self.basis_gradients).items()})
        if self.codebook_counts.numel():
            arrays[CODEBOOK_CENTROIDS] = self.codebook_centroids.detach().cpu().float().numpy()
            arrays[CODEBOOK_COUNTS] = self.codebook_counts.detach().cpu().float().numpy()
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ARRAY_FIELDS}
        meta["metrics"] = {k: float(v) for k, v in self.metrics.items()}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> "SiteUpdate":
        required = ("site", "modality", "round", "anchor_fingerprint", "n_samples", "uncertainty")
        missing = [k for k in required if k not in meta]
        if missing:
            raise ValueError(f"site update meta lacks {missing}")
        if GRAM_KEY not in arrays:
            raise ValueError(f"site update lacks {GRAM_KEY!r}")
        unknown = [k for k in arrays if k not in (GRAM_KEY, CODEBOOK_CENTROIDS, CODEBOOK_COUNTS)
                   and not k.startswith((PARAM_PREFIX, PRECISION_PREFIX, BASIS_GRADIENT_PREFIX))]
        if unknown:
            raise ValueError(f"site update carries unexpected entries {sorted(unknown)[:5]}; only parameters, precisions, "
                             "the Gram, a refresh's basis gradients and codebook centroids may travel")
        if (CODEBOOK_CENTROIDS in arrays) != (CODEBOOK_COUNTS in arrays):
            raise ValueError(f"site update carries one of {CODEBOOK_CENTROIDS!r} and {CODEBOOK_COUNTS!r} without the other")
        uncertainty = _meta_number(meta, "uncertainty")
        if not math.isfinite(uncertainty):
            raise ValueError(f"site update uncertainty {uncertainty} is not finite")
        metrics = meta.get("metrics", {})
        if not isinstance(metrics, Mapping):
            raise ValueError(f"site update metrics are a {type(metrics).__name__}, not a mapping of names to numbers")
        try:
            tensors = _to_torch(arrays)
        except TypeError as err:  # e.g. an array of strings or objects
            raise ValueError(f"site update carries an array torch cannot read: {err}") from err
        return cls(
            site=str(meta["site"]), modality=str(meta["modality"]), round=_meta_whole(meta, "round"),
            anchor_fingerprint=str(meta["anchor_fingerprint"]),
            params={k[len(PARAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(PARAM_PREFIX)},
            precision={k[len(PRECISION_PREFIX):]: v.double().exp() for k, v in tensors.items() if k.startswith(PRECISION_PREFIX)},
            gram_upper=tensors[GRAM_KEY].float(), n_samples=_meta_whole(meta, "n_samples"), uncertainty=uncertainty,
            metrics={str(k): _meta_number(metrics, k, "metric") for k in metrics},
            basis_gradients={k[len(BASIS_GRADIENT_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(BASIS_GRADIENT_PREFIX)},
            basis_digest=str(meta.get("basis_digest", "")),
            **({"codebook_centroids": tensors[CODEBOOK_CENTROIDS].float(), "codebook_counts": tensors[CODEBOOK_COUNTS].float()}
               if CODEBOOK_COUNTS in tensors else {}),
        )

    def nbytes(self) -> int:
        arrays, _ = self.to_arrays()
        return int(sum(a.nbytes for a in arrays.values()))  # the same count as tensor_nbytes, over the update's arrays
