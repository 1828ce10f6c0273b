"""The anchor CCA readout: one generalised-CCA fit on public anchors, used by the server and by the bench's CCA rival."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedanchor.alignment.readout import fit_anchor_readout
from fedanchor.federation.loop import run_in_process
from fedanchor.federation.messages import GlobalState

from conftest import tiny_config


def paired(n: int, p: int, q: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of one latent: x = L A, y = L B, plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x = latent @ torch.randn(6, p, generator=g, dtype=torch.float64) + noise * torch.randn(n, p, generator=g, dtype=torch.float64)
    y = latent @ torch.randn(6, q, generator=g, dtype=torch.float64) + noise * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a @ b.T).argmax(1) == torch.arange(len(a))).double().mean())


@pytest.mark.parametrize("p,q", [(8, 12), (40, 5), (300, 20)], ids=["narrow", "unequal", "wider-than-anchors"])
def test_readout_fitted_on_anchors_pairs_held_out_items(p, q):
    x, y = paired(260, p, q, noise=0.05, seed=p)
    readout = fit_anchor_readout({"a": x[:200], "b": y[:200]}, reg=0.05, dims=6)
    za, zb = readout.apply("a", x[200:].float()), readout.apply("b", y[200:].float())
    assert top1(za, zb) > 0.9 and top1(zb, za) > 0.9
    assert torch.allclose(za.norm(dim=1), torch.ones(len(za)), atol=1e-5)


def test_two_modalities_give_the_canonical_correlations_of_cca():
    x, y = paired(500, 7, 5, noise=0.5, seed=1)
    readout = fit_anchor_readout({"a": x, "b": y}, reg=1e-6, dims=5)
    xc, yc = x - x.mean(0), y - y.mean(0)
    wx = torch.linalg.inv(torch.linalg.cholesky(xc.T @ xc)).T
    wy = torch.linalg.inv(torch.linalg.cholesky(yc.T @ yc)).T
    rho = torch.linalg.svdvals(wx.T @ xc.T @ yc @ wy)
    assert torch.allclose(readout.correlations.double(), rho, atol=1e-3)


def test_unrelated_modalities_have_low_correlation_and_three_modalities_fit():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 5, generator=g, dtype=torch.float64), torch.randn(400, 5, generator=g, dtype=torch.float64)
    assert fit_anchor_readout({"a": x, "b": y}, reg=0.1).correlations.max() < 0.3
    x, y = paired(300, 6, 6, noise=0.05, seed=4)
    three = fit_anchor_readout({"a": x, "b": y, "c": x @ torch.randn(6, 9, generator=g, dtype=torch.float64)}, reg=0.05, dims=6)
    assert set(three.projections) == {"a", "b", "c"} and three.correlations[0] > 0.9


@pytest.mark.parametrize("anchors,reg,match", [
    ({"a": torch.zeros(10, 3)}, 0.1, "at least two modalities"),
    ({"a": torch.zeros(10, 3), "b": torch.zeros(9, 3)}, 0.1, "one row per anchor"),
    ({"a": torch.zeros(10, 3), "b": torch.zeros(10, 3)}, 0.0, "must be > 0"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, 0.1, "too few"),
])
def test_bad_readout_input_is_refused_with_the_fix(anchors, reg, match):
    with pytest.raises(ValueError, match=match):
        fit_anchor_readout(anchors, reg=reg)


def test_server_broadcasts_the_readout_and_scores_in_it():
    config = tiny_config(rounds=1)
    result = run_in_process(config, progress=None)
    state = result.final_state
    readout = state.readout()
    assert readout is not None and set(readout.projections) == {"accel", "gyro"}
    arrays, meta = state.to_arrays()
    again = GlobalState.from_arrays(arrays, meta).readout()
    assert all(torch.equal(again.projections[m], readout.projections[m]) for m in readout.projections)
    # The projection was fitted on this state's anchors: their images (which the state carries) agree across modalities.
    scored = state.scored_anchors()
    za, zg = scored["accel"], scored["gyro"]
    assert float((za * zg).sum(1).mean()) > 0.3
    # It reads the base, codebook and model blocks side by side: each modality's input is raw values, the
    # assignment to each codebook centre and its point (centres + components), then the embedding.
    books = state.codebooks()
    width = {m: p.shape[0] for m, p in readout.projections.items()}
    assert width == {m: 300 + len(b.centres) + b.centres.shape[1] + config.trunk.embed_dim for m, b in books.items()}
    without = run_in_process(tiny_config(rounds=1, alignment={"readout": "none"}), progress=None).final_state
    assert without.readout() is None and not any(k.startswith("readout/") for k in without.tensors)
    assert np.isfinite(result.final_eval["accel->gyro/recall@1"])
