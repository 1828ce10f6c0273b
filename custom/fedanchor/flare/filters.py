"""The site's release filter: a task result leaves the site only as what fedanchor may release (docs/DESIGN.md).

A hospital puts ``SiteReleaseFilter`` on every task result through the scopes of
its ``local/privacy.json`` (see ``provision/site/privacy.json``), so the check runs
whatever the job's own configuration says. It checks every task:

``train``: exactly what ``SiteUpdate.to_arrays`` produces, as one DXO of kind COLLECTION:

- ``param/adapter/<layer>/S`` and ``param/adapter/<layer>/m`` (the shared cores and magnitudes),
- ``log_precision/adapter/<layer>/S|m``, one for every such parameter and no other,
- ``param/projector/<modality>/<name>`` for the site's own modality only,
- ``gram_upper`` (the anchor Gram's upper triangle),
- in a basis refresh's gradient round only, ``basis_grad/adapter/<layer>/U`` (G V, d_out x r) and
  ``.../V`` (G^T U, r columns), for layers whose core it also sends,
- until the private codebook is built, ``codebook/centroids`` (clusters x components) with
  ``codebook/counts``: each centroid a mean of at least ``codebook_min_cluster`` private items
  (a whole number, checked here),
- among the metrics, the typicality check's ``typicality/*`` numbers only from a site of at least
  ``codebook_min_cluster`` private items (its ``n_samples``),

with meta limited to the SiteUpdate fields (site, modality, round, anchor
fingerprint, n_samples, uncertainty, numeric metrics, the digest of the global
bases it trained on).

``validate``: a DXO of kind METRICS whose values are finite numbers, meta the round only.

``submit_model``: a DXO of kind WEIGHTS holding exactly the parameters (``param/...``
keys stripped) of the last train result this filter let through, byte for byte:
what was already released, after differential privacy's noise when the job uses it.
Nothing new leaves through it.

Anything else (an extra key, a key outside these prefixes, a nested object, a
second modality's projector, another task) is refused: the filter logs why and
replaces the result with an empty ``TASK_RESULT_FILTER_ERROR`` reply, so nothing of
it reaches the server.
"""
from __future__ import annotations

import dataclasses
import math
import re
from numbers import Real
from typing import Any, Mapping

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply

from ..alignment.codebook import MIN_CLUSTER
from ..federation.messages import (ARRAY_FIELDS, BASIS_GRADIENT_PREFIX, CODEBOOK_CENTROIDS, CODEBOOK_COUNTS, GRAM_KEY,
                                   PARAM_PREFIX, PRECISION_PREFIX, SiteUpdate)
from ..typicality import METRIC_PREFIX as TYPICALITY_PREFIX

ADAPTER_PARAM = re.compile(r"^param/adapter/[^/]+/[Sm]$")
ADAPTER_PRECISION = re.compile(r"^log_precision/adapter/[^/]+/[Sm]$")
PROJECTOR_PARAM = re.compile(r"^param/projector/(?P<modality>[^/]+)/[^/]+$")
BASIS_GRADIENT = re.compile(r"^basis_grad/adapter/(?P<layer>[^/]+)/[UV]$")
WIDEST_LAYER = 4  # G^T U has d_in rows; no transformer linear layer is wider than 4x the widest output it adapts
# The SiteUpdate fields that travel in the DXO's meta: to_arrays puts every field but the arrays there.
META_KEYS = frozenset(f.name for f in dataclasses.fields(SiteUpdate)) - set(ARRAY_FIELDS)
# What a FLARE Shareable may hold: the headers FLARE itself sets and the DXO (stored under "DXO" by DXO.to_shareable).
SHAREABLE_KEYS = frozenset({ReservedHeaderKey.HEADERS, "DXO"})
SUBMIT_META_KEYS = frozenset({"site", "modality", "round", "anchor_fingerprint"})


def update_violation(shareable: Shareable, min_cluster: int = MIN_CLUSTER) -> str | None:
    """Why ``shareable`` is not a site update fedanchor may release, or None when it is one (codebook centroids must
    average at least ``min_cluster`` private items)."""
    dxo, reason = _dxo_of(shareable, DataKind.COLLECTION)
    if reason:
        return reason
    reason = _array_violation(dxo.data or {}) or _codebook_violation(dxo.data or {}, min_cluster)
    if reason:
        return reason
    return _meta_violation(dxo.get_meta_props() or {}, dxo.data or {}) or _typicality_violation(dxo.get_meta_props() or {},
                                                                                                 min_cluster)


def _array_violation(data: Mapping[str, Any]) -> str | None:
    if GRAM_KEY not in data:
        return f"the update lacks {GRAM_KEY!r}"
    adapter, precision, projector_modalities, gradients, unknown = set(), set(), set(), set(), []
    for key in data:
        if not isinstance(key, str):
            unknown.append(repr(key))
        elif ADAPTER_PARAM.match(key):
            adapter.add(key[len(PARAM_PREFIX):])
        elif ADAPTER_PRECISION.match(key):
            precision.add(key[len(PRECISION_PREFIX):])
        elif BASIS_GRADIENT.match(key):
            gradients.add(key[len(BASIS_GRADIENT_PREFIX):])
        elif PROJECTOR_PARAM.match(key):
            projector_modalities.add(PROJECTOR_PARAM.match(key).group("modality"))
        elif key not in (GRAM_KEY, CODEBOOK_CENTROIDS, CODEBOOK_COUNTS):
            unknown.append(key)
    if unknown:
        return f"keys outside what a site update may carry: {sorted(unknown)[:5]}"
    if not adapter:
        return "the update carries no adapter cores or magnitudes"
    if precision != adapter:
        odd = sorted(precision ^ adapter)[:5]
        return f"precisions and parameters do not pair up (one without the other: {odd})"
    if len(projector_modalities) > 1:
        return f"projectors of several modalities: {sorted(projector_modalities)}"
    not_arrays = sorted(k for k, v in data.items() if not (isinstance(v, np.ndarray) and v.dtype.kind == "f"))
    if not_arrays:
        return f"entries that are not floating-point arrays: {not_arrays[:5]}"
    return _shape_violation(data, adapter) or _gradient_violation(data, adapter, gradients)


def _shape_violation(data: Mapping[str, Any], adapter: set[str]) -> str | None:
    """Shapes that a site update has whatever the model: square cores, 1-D magnitudes, a precision
    shaped like its parameter, a Gram upper triangle of n(n+1)/2 values. A per-sample array smuggled under one of
    these names breaks at least one of them."""
    for key in sorted(adapter):
        value, precision = data[PARAM_PREFIX + key], data[PRECISION_PREFIX + key]
        if precision.shape != value.shape:
            return f"{PRECISION_PREFIX + key} has shape {precision.shape}, its parameter {value.shape}"
        if key.endswith("/S"):
            if value.ndim != 2 or value.shape[0] != value.shape[1]:
                return f"{PARAM_PREFIX + key} has shape {value.shape}; a core is square (r x r)"
        elif value.ndim != 1:
            return f"{PARAM_PREFIX + key} has shape {value.shape}; a magnitude is one value per output row"
    gram = data[GRAM_KEY]
    n = int((math.isqrt(8 * gram.size + 1) - 1) // 2) if gram.ndim == 1 else -1
    if gram.ndim != 1 or n * (n + 1) // 2 != gram.size:
        return f"{GRAM_KEY} has shape {gram.shape}; it is the n(n+1)/2 upper triangle of an n-anchor Gram"
    return None


def _gradient_violation(data: Mapping[str, Any], adapter: set[str], gradients: set[str]) -> str | None:
    """Projected basis gradients pair up per layer, with the layer's core rank as columns and G V one row per output."""
    layers = {key.rsplit("/", 1)[0] for key in gradients}
    for layer in sorted(layers):
        if f"{layer}/U" not in gradients or f"{layer}/V" not in gradients:
            return f"{BASIS_GRADIENT_PREFIX}{layer}: G V and G^T U travel together"
        if f"{layer}/S" not in adapter:
            return f"{BASIS_GRADIENT_PREFIX}{layer} for a layer whose core the update does not carry"
        rank, d_out = data[PARAM_PREFIX + layer + "/S"].shape[0], data[PARAM_PREFIX + layer + "/m"].shape[0]
        grad_u, grad_v = data[BASIS_GRADIENT_PREFIX + layer + "/U"], data[BASIS_GRADIENT_PREFIX + layer + "/V"]
        if grad_u.shape != (d_out, rank):
            return f"{BASIS_GRADIENT_PREFIX}{layer}/U has shape {grad_u.shape}; G V is d_out x r = ({d_out}, {rank})"
        if grad_v.ndim != 2 or grad_v.shape[1] != rank or not 1 <= grad_v.shape[0] <= WIDEST_LAYER * d_out:
            return (f"{BASIS_GRADIENT_PREFIX}{layer}/V has shape {grad_v.shape}; G^T U is d_in x r with r={rank} "
                    f"and d_in at most {WIDEST_LAYER} x d_out")
    return None


def _codebook_violation(data: Mapping[str, Any], min_cluster: int) -> str | None:
    """Codebook centroids travel with their counts, one per centroid, each a whole number of at least min_cluster."""
    if CODEBOOK_CENTROIDS not in data and CODEBOOK_COUNTS not in data:
        return None
    if CODEBOOK_CENTROIDS not in data or CODEBOOK_COUNTS not in data:
        return f"{CODEBOOK_CENTROIDS} and {CODEBOOK_COUNTS} travel together"
    centroids, counts = data[CODEBOOK_CENTROIDS], data[CODEBOOK_COUNTS]
    if centroids.ndim != 2 or counts.ndim != 1 or centroids.shape[0] != counts.shape[0]:
        return (f"{CODEBOOK_CENTROIDS} has shape {centroids.shape} and {CODEBOOK_COUNTS} {counts.shape}; "
                "expected (clusters, components) and (clusters,)")
    if not np.isfinite(counts).all() or (counts < min_cluster).any() or (counts != np.round(counts)).any():
        return (f"{CODEBOOK_COUNTS} must be whole numbers of at least {min_cluster} (a centroid of fewer private "
                "items is too close to one record)")
    return None


def _typicality_violation(meta: Mapping[str, Any], min_cluster: int) -> str | None:
    """The typicality check's numbers (means and spreads over a site's items) leave only from a site holding at least
    min_cluster private items, as any centroid."""
    sent = sorted(k for k in meta.get("metrics", {}) if k.startswith(TYPICALITY_PREFIX))
    if sent and meta.get("n_samples", 0) < min_cluster:
        return (f"typicality numbers {sent[:2]} over {meta.get('n_samples')} private items; they may summarise no "
                f"fewer than {min_cluster}")
    return None


def _meta_violation(meta: Mapping[str, Any], data: Mapping[str, Any]) -> str | None:
    extra = sorted(str(k) for k in meta if k not in META_KEYS)
    if extra:
        return f"meta keys outside what a site update may carry: {extra[:5]}"
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Real) and not isinstance(v, bool) for k, v in metrics.items()):
        return "metrics must map names to numbers"
    for key in ("site", "modality", "anchor_fingerprint", "basis_digest"):
        if key in meta and not isinstance(meta[key], str):
            return f"meta {key!r} must be a string"
    for key in ("round", "n_samples"):
        if key in meta and (not isinstance(meta[key], int) or isinstance(meta[key], bool)):
            return f"meta {key!r} must be an integer"
    if "uncertainty" in meta and not (isinstance(meta["uncertainty"], Real) and math.isfinite(meta["uncertainty"])):
        return "meta 'uncertainty' must be a finite number"
    modality = meta.get("modality")
    stray = sorted({m.group("modality") for k in data if (m := PROJECTOR_PARAM.match(k))} - {modality})
    if stray:
        return f"projector of modality {stray[0]!r} from a site of modality {modality!r}"
    return None


def metrics_violation(shareable: Shareable) -> str | None:
    """Why ``shareable`` is not a validate result (finite numbers by name, the round in the meta), or None."""
    dxo, reason = _dxo_of(shareable, DataKind.METRICS)
    if reason:
        return reason
    bad = sorted(str(k) for k, v in (dxo.data or {}).items()
                 if not isinstance(k, str) or not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v))
    if bad:
        return f"validate metrics must be finite numbers by name; not so: {bad[:5]}"
    extra = sorted(str(k) for k in (dxo.get_meta_props() or {}) if k != "round")
    if extra:
        return f"validate meta may carry the round only, got {extra[:5]}"
    return None


def resend_violation(shareable: Shareable, released: Mapping[str, np.ndarray] | None) -> str | None:
    """Why ``shareable`` is not a submit_model result that re-sends exactly the ``released`` parameters, or None."""
    dxo, reason = _dxo_of(shareable, DataKind.WEIGHTS)
    if reason:
        return reason
    if released is None:
        return "no train result has left this site yet, so there is no released model to submit"
    data = dxo.data or {}
    if set(data) != set(released):
        odd = sorted(set(data) ^ set(released))[:5]
        return f"submit_model must carry exactly the parameters of the last released train result; differing keys: {odd}"
    changed = sorted(k for k, v in data.items()
                     if not (isinstance(v, np.ndarray) and v.dtype == released[k].dtype and np.array_equal(v, released[k])))
    if changed:
        return f"submit_model values differ from the last released train result (not what was released): {changed[:5]}"
    extra = sorted(str(k) for k in (dxo.get_meta_props() or {}) if k not in SUBMIT_META_KEYS)
    if extra:
        return f"submit_model meta may carry {sorted(SUBMIT_META_KEYS)} only, got {extra[:5]}"
    return None


def _dxo_of(shareable: Shareable, kind: str):
    extra = sorted(str(k) for k in shareable.keys() if k not in SHAREABLE_KEYS)
    if extra:
        return None, f"the result carries entries outside its DXO: {extra[:5]}"
    try:
        dxo = from_shareable(shareable)
    except Exception as err:  # not a DXO at all: FLARE raises several types here
        return None, f"the result is not a DXO ({type(err).__name__}: {err})"
    if dxo.data_kind != kind:
        return None, f"this task's result travels as DataKind.{kind}, got {dxo.data_kind!r}"
    return dxo, None


class SiteReleaseFilter(Filter):
    def __init__(self, train_task: str = "train", codebook_min_cluster: int = MIN_CLUSTER,
                 validate_task: str = "validate", submit_model_task: str = "submit_model"):
        """
        Args:
            train_task, validate_task, submit_model_task: the executor's task names; a result of any other task
                is refused.
            codebook_min_cluster: the fewest private items a codebook centroid may average (the site's own floor,
                whatever the job asks).
        """
        super().__init__()
        for name, value in (("train_task", train_task), ("validate_task", validate_task),
                            ("submit_model_task", submit_model_task)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a task name, got {value!r}")
        if not isinstance(codebook_min_cluster, int) or codebook_min_cluster < 2:
            raise ValueError(f"codebook_min_cluster must be an integer of at least 2, got {codebook_min_cluster!r}")
        self.train_task = train_task
        self.validate_task = validate_task
        self.submit_model_task = submit_model_task
        self.codebook_min_cluster = codebook_min_cluster
        self._released: dict[str, np.ndarray] | None = None  # the parameters of the last train result let through

    def violation(self, task: str, shareable: Shareable) -> str | None:
        """Why the ``task`` result may not leave, or None."""
        if task == self.train_task:
            return update_violation(shareable, self.codebook_min_cluster)
        if task == self.validate_task:
            return metrics_violation(shareable)
        if task == self.submit_model_task:
            return resend_violation(shareable, self._released)
        return f"task {task!r} is none of {self.train_task!r}, {self.validate_task!r}, {self.submit_model_task!r}"

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedHeaderKey.TASK_NAME)
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            # An error reply says nothing but its code; anything attached to it is dropped.
            return make_reply(rc)
        reason = self.violation(task, shareable)
        if reason:
            self.log_error(fl_ctx, f"fedanchor release filter refused the {task} result: {reason}")
            return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        data = from_shareable(shareable).data or {}
        if task == self.train_task:
            self._released = {k[len(PARAM_PREFIX):]: np.array(v) for k, v in data.items() if k.startswith(PARAM_PREFIX)}
        self.log_info(fl_ctx, f"fedanchor release filter passed the {task} result ({len(data)} entries)")
        return shareable
