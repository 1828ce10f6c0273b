"""GlobalState and SiteUpdate in FLARE's containers, and the shareable generator.

Down: a GlobalState is a DXO of kind WEIGHTS whose data are its arrays and whose
meta is its meta (round, anchor fingerprint, plus what the server adds: the job
config, the last evaluation). Up: a SiteUpdate is a DXO of kind COLLECTION
(parameters, precisions and the Gram are not one weight dict, and generic
FLARE weight filters must not touch them). Nothing here merges or averages:
the generator replaces the learnable with what the aggregator produced.
"""
from __future__ import annotations

from typing import Any, Mapping

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.shareable_generator import ShareableGenerator

from ..federation.messages import GlobalState, SiteUpdate


# -- plain conversions ---------------------------------------------------------
def state_to_dxo(state: GlobalState, extra_meta: Mapping[str, Any] | None = None) -> DXO:
    arrays, meta = state.to_arrays()
    meta.update(extra_meta or {})
    return DXO(data_kind=DataKind.WEIGHTS, data=arrays, meta=meta)


def dxo_to_state(dxo: DXO) -> GlobalState:
    if dxo.data_kind != DataKind.WEIGHTS:
        raise ValueError(f"a fedanchor global state travels as DataKind.WEIGHTS, got {dxo.data_kind!r}")
    return GlobalState.from_arrays(dxo.data or {}, dxo.get_meta_props() or {})


def state_to_learnable(state: GlobalState, extra_meta: Mapping[str, Any] | None = None) -> ModelLearnable:
    arrays, meta = state.to_arrays()
    meta.update(extra_meta or {})
    return make_model_learnable(arrays, meta)


def learnable_to_state(learnable: ModelLearnable) -> GlobalState:
    if ModelLearnableKey.WEIGHTS not in learnable or ModelLearnableKey.META not in learnable:
        raise ValueError("model learnable lacks weights or meta; was it made by FedAnchorPersistor?")
    return GlobalState.from_arrays(learnable[ModelLearnableKey.WEIGHTS] or {}, learnable[ModelLearnableKey.META] or {})


def update_to_dxo(update: SiteUpdate) -> DXO:
    arrays, meta = update.to_arrays()
    return DXO(data_kind=DataKind.COLLECTION, data=arrays, meta=meta)


def dxo_to_update(dxo: DXO) -> SiteUpdate:
    if dxo.data_kind != DataKind.COLLECTION:
        raise ValueError(f"a fedanchor site update travels as DataKind.COLLECTION, got {dxo.data_kind!r}")
    return SiteUpdate.from_arrays(dxo.data or {}, dxo.get_meta_props() or {})


def shareable_to_update(shareable: Shareable) -> SiteUpdate:
    return dxo_to_update(from_shareable(shareable))


def shareable_to_state(shareable: Shareable) -> GlobalState:
    return dxo_to_state(from_shareable(shareable))


# -- the FLARE component ---------------------------------------------------------
class FedAnchorShareableGenerator(ShareableGenerator):
    """Learnable <-> Shareable for the fedanchor global state; a full replacement, never a diff."""

    def learnable_to_shareable(self, model: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        learnable_to_state(model)  # fail here, on the server, if it is not a global state
        return DXO(data_kind=DataKind.WEIGHTS, data=model[ModelLearnableKey.WEIGHTS],
                   meta=dict(model[ModelLearnableKey.META])).to_shareable()

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        dxo = from_shareable(shareable)
        dxo_to_state(dxo)  # validates kind and meta
        return make_model_learnable(dxo.data, dict(dxo.get_meta_props() or {}))
