"""The readout chosen by cross-validation on the anchors: blocks, truncation, ridge and directions, and nothing else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedanchor.alignment.readout_choice import choose_readout, concatenated


def views(n: int, seed: int, noise: float = 0.1, latent: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Two nonlinear-free views of one latent (x = L A, y = L B) with noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, latent))
    return (z @ rng.normal(size=(latent, 12)) + noise * rng.normal(size=(n, 12)),
            z @ rng.normal(size=(latent, 9)) + noise * rng.normal(size=(n, 9)))


def top1(readout, blocks) -> float:
    inputs = concatenated(blocks)
    za, zb = (readout.apply(m, torch.from_numpy(inputs[m])).float() for m in ("a", "b"))
    return float(((za @ zb.T).argmax(1) == torch.arange(len(za))).double().mean())


def split_blocks(x, y, extra_a=None, extra_b=None, rows=slice(None)):
    a, b = {"base": x[rows]}, {"base": y[rows]}
    if extra_a is not None:
        a["model"], b["model"] = extra_a[rows], extra_b[rows]
    return {"a": a, "b": b}


@pytest.mark.parametrize("model_block", ["signal", "noise"])
def test_cross_validation_keeps_a_block_that_carries_signal_and_a_noise_block_does_no_harm(model_block):
    x, y = views(260, seed=1, noise=2.0)  # a weak base block
    rng = np.random.default_rng(2)
    if model_block == "signal":
        mx, my = views(260, seed=1, noise=0.05)  # the same latent, seen clearly
    else:
        mx, my = rng.normal(size=(260, 10)), rng.normal(size=(260, 10))
    train, held = slice(0, 200), slice(200, 260)
    readout, choice = choose_readout(split_blocks(x, y, mx, my, train))
    alone, _ = choose_readout(split_blocks(x, y, rows=train))
    chosen, without = top1(readout, split_blocks(x, y, mx, my, held)), top1(alone, split_blocks(x, y, rows=held))
    if model_block == "signal":
        assert choice.weights["model"] > 0 and choice.gain > choice.gain_se and chosen > without + 0.2
    else:
        assert chosen >= without - 0.05
    assert 0 < choice.cv_mrr <= 1 and choice.candidates == len(choice.table)


def test_a_zero_weight_block_is_exactly_the_readout_without_it():
    x, y = views(120, seed=3)
    rng = np.random.default_rng(4)
    junk_a, junk_b = rng.normal(size=(120, 7)), rng.normal(size=(120, 7))
    with_junk, choice = choose_readout(split_blocks(x, y, junk_a, junk_b), weights=(0.0,))
    alone, alone_choice = choose_readout(split_blocks(x, y))
    assert choice.weights["model"] == 0.0 and (choice.reg, choice.dims) == (alone_choice.reg, alone_choice.dims)
    za = with_junk.apply("a", torch.from_numpy(concatenated(split_blocks(x, y, junk_a, junk_b))["a"]))
    zb = alone.apply("a", torch.from_numpy(x))
    assert torch.allclose(za, zb, atol=1e-5)


def test_a_block_whose_cross_validated_gain_is_inside_its_noise_is_dropped():
    """40 anchors, a noise block that ranks held-out anchors a little better by chance: the first block alone is
    kept, and the choice says by how little the other won."""
    x, y = views(40, seed=2, noise=1.5)
    rng = np.random.default_rng(102)
    blocks = split_blocks(x, y, rng.normal(size=(40, 2)), rng.normal(size=(40, 2)))
    readout, choice = choose_readout(blocks)
    alone, alone_choice = choose_readout(split_blocks(x, y))
    assert 0 < choice.gain <= choice.gain_se  # the noise block did win on the folds, by less than one standard error
    assert choice.weights["model"] == 0.0 and choice.cv_mrr == pytest.approx(alone_choice.cv_mrr)
    assert torch.allclose(readout.apply("a", torch.from_numpy(concatenated(blocks)["a"])),
                          alone.apply("a", torch.from_numpy(x)), atol=1e-5)


def test_identical_items_do_not_inflate_the_cross_validated_score():
    """Ties count half: a readout that maps every anchor to one point must score like chance, not like a perfect one."""
    x, y = views(60, seed=5)
    constant = {"a": {"base": np.ones((60, 3)) + 1e-9 * x[:, :3]}, "b": {"base": np.ones((60, 3))}}
    _, choice = choose_readout(constant, truncations=(0,), regs=(0.1,))
    fold = 60 // 5
    chance = np.mean([1.0 / (1.0 + 0.5 * (fold - 1))])
    assert choice.cv_mrr == pytest.approx(chance, rel=0.05)


def test_fixed_ridge_and_directions_are_not_searched():
    x, y = views(100, seed=6)
    _, choice = choose_readout(split_blocks(x, y), fixed_reg=0.2, fixed_dims=3)
    assert (choice.reg, choice.dims) == (0.2, 3)
    assert {row["reg"] for row in choice.table} == {0.2} and {row["dims"] for row in choice.table} == {3}


def test_the_choice_depends_on_the_anchors_only():
    """The same anchors give the same readout whatever else exists: the function sees no other data."""
    x, y = views(100, seed=7)
    first, c1 = choose_readout(split_blocks(x, y))
    second, c2 = choose_readout(split_blocks(x.copy(), y.copy()))
    assert c1.as_dict() == c2.as_dict()
    assert torch.equal(first.projections["a"], second.projections["a"])


@pytest.mark.parametrize("blocks,match", [
    ({"a": {"base": np.zeros((20, 3))}}, "at least two modalities"),
    ({"a": {"base": np.zeros((20, 3))}, "b": {"model": np.zeros((20, 3))}}, "same non-empty feature blocks"),
    ({"a": {"base": np.zeros((20, 3))}, "b": {"base": np.zeros((19, 3))}}, "one row per anchor"),
    ({"a": {"base": np.full((20, 3), np.nan)}, "b": {"base": np.zeros((20, 3))}}, "NaN or Inf"),
    ({"a": {"base": np.zeros((5, 3))}, "b": {"base": np.zeros((5, 3))}}, "too few to cross-validate"),
], ids=["one-modality", "other-blocks", "rows", "nan", "too-few"])
def test_bad_blocks_are_refused_with_the_reason(blocks, match):
    with pytest.raises(ValueError, match=match):
        choose_readout(blocks)


@pytest.mark.parametrize("anchors,repeats", [(16, 13), (100, 2), (200, 1)])
def test_few_anchors_repeat_the_k_fold_split_on_fresh_shuffles(anchors, repeats):
    """Folds of a handful of anchors rank too coarsely to choose by: the split is repeated until ~200 were ranked."""
    x, y = views(anchors, seed=8)
    _, choice = choose_readout(split_blocks(x, y), truncations=(0,), regs=(0.1,))
    assert choice.repeats == repeats


@pytest.mark.parametrize("n, p, q", [(16, 12, 9), (40, 60, 9), (30, 5, 80)])  # narrow, wide and mixed blocks
def test_one_decomposition_per_fold_scores_every_ridge_as_its_own_fit_would(n, p, q):
    """The search scores all ridges of a fold from one eigendecomposition per modality; each must equal fitting
    ``fit_anchor_readout`` at that ridge and ranking the held-out items in its space."""
    from fedanchor.alignment.readout import fit_anchor_readout
    from fedanchor.alignment.readout_choice import _fold_spectra, _mean_reciprocal_rank, _score_regs, _unit_rows

    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, 3))
    inputs = {"a": z @ rng.normal(size=(3, p)) + rng.normal(size=(n, p)),
              "b": z @ rng.normal(size=(3, q)) + rng.normal(size=(n, q))}
    maps = {m: (x.mean(0) + 0.1, np.eye(x.shape[1]) * 0.5) for m, x in inputs.items()}
    train, test = np.arange(n)[: n - n // 4], np.arange(n)[n - n // 4:]
    regs, dims = (0.01, 0.3, 1.0), (1, 2, 5)
    fast = _score_regs(_fold_spectra(inputs, maps, train, test), regs, dims)
    for reg in regs:
        readout = fit_anchor_readout({m: torch.from_numpy((x[train] - maps[m][0]) @ maps[m][1]) for m, x in inputs.items()},
                                     reg, max(dims))
        full = {m: ((x[test] - maps[m][0]) @ maps[m][1] - readout.means[m].double().numpy())
                @ readout.projections[m].double().numpy() for m, x in inputs.items()}
        for d in dims:
            unit = {m: _unit_rows(v[:, :d]) for m, v in full.items()}
            assert fast[reg][d] == pytest.approx(_mean_reciprocal_rank(unit), abs=1e-9), (reg, d)


def test_principal_axes_fall_back_to_the_covariance_when_the_svd_does_not_converge(monkeypatch):
    from fedanchor.alignment import readout_choice
    rng = np.random.default_rng(9)
    x = rng.normal(size=(30, 5)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5])
    x -= x.mean(0)
    expected = readout_choice.principal_axes(x)

    def failing_svd(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")
    monkeypatch.setattr(readout_choice.np.linalg, "svd", failing_svd)
    fallback = readout_choice.principal_axes(x)
    assert fallback.shape == expected.shape
    assert np.abs(fallback.T @ expected) == pytest.approx(np.eye(5), abs=1e-8)  # the same axes, up to sign
