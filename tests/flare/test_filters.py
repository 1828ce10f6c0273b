"""Section5OutputFilter: a train result leaves the site only as the section-5 site update, nothing more."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from fedanchor.federation.messages import SiteUpdate
from fedanchor.flare.filters import Section5OutputFilter, section5_violation
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
    ("extra key", with_data(lambda d: d.__setitem__("private/embeddings", np.zeros((5, 4), np.float32))), "outside section 5"),
    ("param outside adapter/projector", with_data(lambda d: d.__setitem__("param/head/weight", np.zeros(3, np.float32))),
     "outside section 5"),
    ("adapter basis U goes up", with_data(lambda d: d.__setitem__("param/adapter/layer.0.query/U", np.zeros(3, np.float32))),
     "outside section 5"),
    ("key with an extra level", with_data(lambda d: d.__setitem__("param/adapter/x/y/S", np.zeros(3, np.float32))),
     "outside section 5"),
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
    ("Gram of no anchor count", with_data(lambda d: d.update({"gram_upper": np.zeros(11, np.float16)})), "n(n+1)/2"),
    ("an entry outside the DXO", outside_dxo(), "outside its DXO"),
    ("weights instead of a collection", DXO(DataKind.WEIGHTS, data=update_to_dxo(site_update()).data).to_shareable(), "COLLECTION"),
    ("not a DXO", Shareable(), "not a DXO"),
]


def test_a_section5_update_passes_unchanged():
    result = update_to_dxo(site_update()).to_shareable()
    assert section5_violation(result) is None
    assert Section5OutputFilter().process(result, ctx()) is result


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
    assert section5_violation(result) is None


@pytest.mark.parametrize("case,result,reason", REFUSED, ids=[c[0] for c in REFUSED])
def test_anything_else_is_refused_with_a_reason(case, result, reason, caplog):
    assert reason in (section5_violation(result) or ""), case
    with caplog.at_level("ERROR"):
        out = Section5OutputFilter().process(result, ctx())
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "DXO" not in out and not [k for k in out if k != "__headers__"], "a refused result must carry nothing"
    assert reason in caplog.text


def test_other_tasks_pass_and_error_replies_are_emptied():
    metrics = DXO(DataKind.METRICS, data={"anchor/cka_to_consensus": 0.5}).to_shareable()
    assert Section5OutputFilter().process(metrics, ctx("validate")) is metrics
    aborted = make_reply(ReturnCode.TASK_ABORTED)
    aborted["leak"] = np.zeros(3)
    out = Section5OutputFilter().process(aborted, ctx())
    assert out.get_return_code() == ReturnCode.TASK_ABORTED and "leak" not in out


def test_the_train_task_name_is_checked():
    with pytest.raises(ValueError, match="task name"):
        Section5OutputFilter(train_task="")


def test_a_site_can_raise_its_own_codebook_floor_above_the_jobs():
    result = update_to_dxo(site_update()).to_shareable()  # clusters of 5, 6 and 9 private items
    assert Section5OutputFilter(codebook_min_cluster=5).process(result, ctx()) is result
    refused = Section5OutputFilter(codebook_min_cluster=8).process(update_to_dxo(site_update()).to_shareable(), ctx())
    assert refused.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    with pytest.raises(ValueError, match="at least 2"):
        Section5OutputFilter(codebook_min_cluster=1)
