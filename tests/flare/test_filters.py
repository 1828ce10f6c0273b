"""SiteReleaseFilter: a task result leaves the site only as what fedanchor may release, nothing more."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from fedanchor.federation.messages import SiteUpdate
from fedanchor.flare.filters import SiteReleaseFilter, update_violation
from fedanchor.flare.shareable import update_to_dxo


def site_update() -> SiteUpdate:
    g = torch.Generator().manual_seed(3)
    params = {"adapter/layer.0.query/S": torch.randn(4, 4, generator=g), "adapter/layer.0.query/m": torch.rand(8, generator=g),
              "adapter/layer.1.value/S": torch.randn(4, 4, generator=g), "adapter/layer.1.value/m": torch.rand(8, generator=g),
              "projector/accel/weight": torch.randn(6, 3, generator=g), "projector/accel/bias": torch.randn(6, generator=g)}
    precision = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) + 0.1 for k, v in params.items() if k.startswith("adapter/")}
    return SiteUpdate(site="hospital-a", modality="accel", round=1, anchor_fingerprint="f" * 64, params=params,
                      precision=precision, gram_upper=torch.rand(10, generator=g), n_samples=20, uncertainty=2.5,
                      metrics={"loss/loss": 1.25}, codebook_centroids=torch.randn(3, 5, generator=g),
                      codebook_counts=torch.tensor([5.0, 6.0, 9.0]))


def ctx(task: str = "train") -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    return fl_ctx


def with_data(change):
    """A train result whose DXO data dict has been changed by ``change(data)``."""
    dxo = update_to_dxo(site_update())
    data = copy.deepcopy(dxo.data)
    change(data)
    return DXO(data_kind=dxo.data_kind, data=data, meta=dxo.get_meta_props()).to_shareable()


def with_meta(change):
    dxo = update_to_dxo(site_update())
    meta = copy.deepcopy(dxo.get_meta_props())
    change(meta)
    return DXO(data_kind=dxo.data_kind, data=dxo.data, meta=meta).to_shareable()


def outside_dxo() -> Shareable:
    shareable = update_to_dxo(site_update()).to_shareable()
    shareable["embeddings"] = np.zeros((3, 3), np.float32)
    return shareable


# (case, result, the reason's words)
REFUSED = [
    ("extra key", with_data(lambda d: d.__setitem__("private/embeddings", np.zeros((5, 4), np.float32))), "outside what a site update may carry"),
    ("param outside adapter/projector", with_data(lambda d: d.__setitem__("param/head/weight", np.zeros(3, np.float32))),
     "outside what a site update may carry"),
    ("adapter basis U goes up", with_data(lambda d: d.__setitem__("param/adapter/layer.0.query/U", np.zeros(3, np.float32))),
     "outside what a site update may carry"),
    ("key with an extra level", with_data(lambda d: d.__setitem__("param/adapter/x/y/S", np.zeros(3, np.float32))),
     "outside what a site update may carry"),
    ("precision without its parameter", with_data(lambda d: d.pop("param/adapter/layer.1.value/m")), "do not pair up"),
    ("parameter without its precision", with_data(lambda d: d.pop("log_precision/adapter/layer.0.query/S")), "do not pair up"),
    ("no Gram", with_data(lambda d: d.pop("gram_upper")), "lacks 'gram_upper'"),
    ("another modality's projector", with_data(lambda d: d.__setitem__("param/projector/gyro/weight", np.zeros(3, np.float32))),
     "several modalities"),
    ("projector of a modality not the site's", with_meta(lambda m: m.__setitem__("modality", "gyro")), "from a site of modality"),
    ("nested object instead of an array", with_data(lambda d: d.__setitem__("gram_upper", {"rows": [1.0, 2.0]})), "not floating-point"),
    ("integer array", with_data(lambda d: d.__setitem__("gram_upper", np.arange(10))), "not floating-point"),
    ("extra meta key", with_meta(lambda m: m.__setitem__("embeddings", [[0.1, 0.2]])), "meta keys outside"),
    ("metrics that are not numbers", with_meta(lambda m: m.__setitem__("metrics", {"ids": "17,18,19"})), "numbers"),
    ("per-sample embeddings as a magnitude", with_data(lambda d: d.update(
        {"param/adapter/layer.0.query/m": np.zeros((20, 8), np.float32)})), "shape"),
    ("per-sample embeddings as a core", with_data(lambda d: d.update(
        {"param/adapter/layer.0.query/S": np.zeros((20, 8), np.float32),
         "log_precision/adapter/layer.0.query/S": np.zeros((20, 8), np.float16)})), "square"),
    ("basis gradient G V alone", with_data(lambda d: d.update(
        {"basis_grad/adapter/layer.0.query/U": np.zeros((8, 4), np.float32)})), "travel together"),
    ("per-sample embeddings as G^T U", with_data(lambda d: d.update(
        {"basis_grad/adapter/layer.0.query/U": np.zeros((8, 4), np.float32),
         "basis_grad/adapter/layer.0.query/V": np.zeros((500, 4), np.float32)})), "at most 4 x d_out"),
    ("per-sample embeddings as G V", with_data(lambda d: d.update(
        {"basis_grad/adapter/layer.0.query/U": np.zeros((20, 8), np.float32),
         "basis_grad/adapter/layer.0.query/V": np.zeros((8, 4), np.float32)})), "G V is d_out x r"),
    ("basis gradients of a layer it does not send", with_data(lambda d: d.update(
        {"basis_grad/adapter/layer.9.key/U": np.zeros((8, 4), np.float32),
         "basis_grad/adapter/layer.9.key/V": np.zeros((8, 4), np.float32)})), "does not carry"),
    ("codebook counts without centroids", with_data(lambda d: d.pop("codebook/centroids")), "travel together"),
    ("a codebook centroid of one record", with_data(lambda d: d.update({"codebook/counts": np.array([1.0, 6.0, 9.0], np.float32)})),
     "at least 5"),
    ("fractional codebook counts", with_data(lambda d: d.update({"codebook/counts": np.array([5.5, 6.0, 9.0], np.float32)})),
     "whole numbers"),
    ("per-sample rows as codebook centroids", with_data(lambda d: d.update({"codebook/centroids": np.zeros((20, 5), np.float32)})),
     "expected (clusters, components)"),
    ("typicality numbers of too few items", with_meta(lambda m: m.update(
        n_samples=4, metrics={**m["metrics"], "typicality/energy/mean": 0.1, "typicality/energy/sd": 0.9})), "no fewer than 5"),
    ("Gram of no anchor count", with_data(lambda d: d.update({"gram_upper": np.zeros(11, np.float16)})), "n(n+1)/2"),
    ("an entry outside the DXO", outside_dxo(), "outside its DXO"),
    ("weights instead of a collection", DXO(DataKind.WEIGHTS, data=update_to_dxo(site_update()).data).to_shareable(), "COLLECTION"),
    ("not a DXO", Shareable(), "not a DXO"),
]


def test_a_site_update_passes_unchanged():
    result = update_to_dxo(site_update()).to_shareable()
    assert update_violation(result) is None
    typical = with_meta(lambda m: m.update(metrics={**m["metrics"], "typicality/energy/mean": 0.1, "typicality/energy/sd": 0.9}))
    assert update_violation(typical) is None  # 20 private items: above the floor
    assert SiteReleaseFilter().process(result, ctx()) is result


def test_a_refresh_gradient_round_update_passes_with_cores_of_several_ranks():
    """After a basis refresh layers keep different ranks; in a gradient round G V and G^T U go up for each layer."""
    import dataclasses

    update = site_update()
    params, precision = dict(update.params), dict(update.precision)
    params["adapter/layer.1.value/S"], precision["adapter/layer.1.value/S"] = torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.float64)
    gradients = {"adapter/layer.0.query/U": torch.zeros(8, 4), "adapter/layer.0.query/V": torch.zeros(32, 4),
                 "adapter/layer.1.value/U": torch.zeros(8, 3), "adapter/layer.1.value/V": torch.zeros(8, 3)}
    result = update_to_dxo(dataclasses.replace(update, params=params, precision=precision,
                                               basis_gradients=gradients)).to_shareable()
    assert update_violation(result) is None


@pytest.mark.parametrize("case,result,reason", REFUSED, ids=[c[0] for c in REFUSED])
def test_anything_else_is_refused_with_a_reason(case, result, reason, caplog):
    assert reason in (update_violation(result) or ""), case
    with caplog.at_level("ERROR"):
        out = SiteReleaseFilter().process(result, ctx())
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "DXO" not in out and not [k for k in out if k != "__headers__"], "a refused result must carry nothing"
    assert reason in caplog.text


def test_validate_results_pass_as_finite_metrics_only():
    metrics = DXO(DataKind.METRICS, data={"anchor/cka_to_consensus": 0.5}, meta={"round": 2}).to_shareable()
    assert SiteReleaseFilter().process(metrics, ctx("validate")) is metrics


VALIDATE_REFUSED = [
    ("an array among the metrics", {"anchor/embeddings": np.zeros((5, 4))}, {}, "finite numbers"),
    ("a NaN metric", {"anchor/recall@1": float("nan")}, {}, "finite numbers"),
    ("a string metric", {"ids": "17,18"}, {}, "finite numbers"),
    ("meta beyond the round", {"anchor/recall@1": 0.5}, {"round": 1, "site_ids": [1, 2]}, "round only"),
]


@pytest.mark.parametrize("case,data,meta,reason", VALIDATE_REFUSED, ids=[c[0] for c in VALIDATE_REFUSED])
def test_validate_results_carrying_anything_else_are_refused(case, data, meta, reason):
    result = DXO(DataKind.METRICS, data=data, meta=meta).to_shareable()
    out = SiteReleaseFilter().process(result, ctx("validate"))
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and "DXO" not in out
    assert reason in SiteReleaseFilter().violation("validate", result)


def submitted(update: SiteUpdate, change=None) -> Shareable:
    data = {k: v.numpy().copy() for k, v in update.params.items()}
    if change:
        change(data)
    return DXO(DataKind.WEIGHTS, data=data, meta={"site": update.site, "round": update.round}).to_shareable()


def test_submit_model_may_only_send_again_what_train_released():
    release = SiteReleaseFilter()
    update = site_update()
    early = release.process(submitted(update), ctx("submit_model"))
    assert early.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR  # nothing released yet
    release.process(update_to_dxo(update).to_shareable(), ctx())
    again = submitted(update)
    assert release.process(again, ctx("submit_model")) is again
    for change, reason in ((lambda d: d["adapter/layer.0.query/S"].__iadd__(1e-3), "values differ"),  # e.g. un-noised cores
                           (lambda d: d.__setitem__("adapter/layer.0.query/delta", np.zeros(8, np.float32)), "differing keys"),
                           (lambda d: d.pop("projector/accel/bias"), "differing keys")):
        out = release.process(submitted(update, change), ctx("submit_model"))
        assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and "DXO" not in out
        assert reason in release.violation("submit_model", submitted(update, change))
    extra_meta = DXO(DataKind.WEIGHTS, data=from_shareable(again).data, meta={"site": "a", "ids": [3, 4]}).to_shareable()
    assert "meta may carry" in release.violation("submit_model", extra_meta)


def test_results_of_other_tasks_are_refused_and_error_replies_emptied():
    metrics = DXO(DataKind.METRICS, data={"anchor/cka_to_consensus": 0.5}).to_shareable()
    assert SiteReleaseFilter().process(metrics, ctx("export_embeddings")).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    aborted = make_reply(ReturnCode.TASK_ABORTED)
    aborted["leak"] = np.zeros(3)
    out = SiteReleaseFilter().process(aborted, ctx())
    assert out.get_return_code() == ReturnCode.TASK_ABORTED and "leak" not in out


def test_the_train_task_name_is_checked():
    with pytest.raises(ValueError, match="task name"):
        SiteReleaseFilter(train_task="")


def test_a_site_can_raise_its_own_codebook_floor_above_the_jobs():
    result = update_to_dxo(site_update()).to_shareable()  # clusters of 5, 6 and 9 private items
    assert SiteReleaseFilter(codebook_min_cluster=5).process(result, ctx()) is result
    refused = SiteReleaseFilter(codebook_min_cluster=8).process(update_to_dxo(site_update()).to_shareable(), ctx())
    assert refused.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    with pytest.raises(ValueError, match="at least 2"):
        SiteReleaseFilter(codebook_min_cluster=1)
