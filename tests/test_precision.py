"""Precision estimates and the precision-weighted merge."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedanchor.federation import run_in_process
from fedanchor.precision import PrecisionTracker, PrecisionWeightedMerge, data_distance


@pytest.mark.parametrize("method", ["iterate_variance", "gradient_variance"])
def test_noisier_gradients_give_lower_precision(method):
    """On a quadratic with noisy gradients, the coefficient with more noise gets the lower precision."""
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(2))
    tracker = PrecisionTracker({"x": param}, method, window=50)
    optimiser = torch.optim.SGD([param], lr=0.1)
    for _ in range(200):
        optimiser.zero_grad()
        noise = torch.randn(2) * torch.tensor([0.1, 2.0])
        param.grad = param.detach() - 1.0 + noise
        optimiser.step()
        tracker.record()
    precision = tracker.precision()["x"]
    assert precision[0] > 10 * precision[1]


def test_merge_is_the_precision_weighted_mean_and_reports_shares():
    merge = PrecisionWeightedMerge()
    merge.add("a", {"s": torch.tensor([1.0, 0.0])}, {"s": torch.tensor([3.0, 1.0])})
    merge.add("b", {"s": torch.tensor([5.0, 4.0])}, {"s": torch.tensor([1.0, 1.0])})
    torch.testing.assert_close(merge.result()["s"], torch.tensor([2.0, 2.0]))
    shares = merge.site_shares()
    assert shares == pytest.approx({"a": 4 / 6, "b": 2 / 6})  # each site's fraction of the tensor's total weight


@pytest.mark.parametrize("weights,match", [
    ({"s": torch.tensor([-1.0, 1.0])}, "negative or not finite"),
    ({"s": torch.tensor([float("nan"), 1.0])}, "negative or not finite"),
    ({"s": torch.tensor([1.0])}, "shape"),
])
def test_merge_refuses_nonsense_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        PrecisionWeightedMerge().add("a", {"s": torch.zeros(2)}, weights)


def test_merge_refuses_a_site_twice_and_an_empty_merge():
    merge = PrecisionWeightedMerge()
    with pytest.raises(ValueError, match="nothing to merge"):
        merge.result()
    merge.add("a", {"s": torch.zeros(1)}, 1.0)
    with pytest.raises(ValueError, match="twice"):
        merge.add("a", {"s": torch.zeros(1)}, 1.0)


def test_coefficients_no_site_informs_fail_instead_of_becoming_zero():
    merge = PrecisionWeightedMerge()
    merge.add("a", {"s": torch.ones(2)}, {"s": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match="zero total weight"):
        merge.result()


# Only additive noise is asserted: a gain shift is what delta_site exists to absorb (the site is particular,
# not unreliable), and scrambled pixels are down-weighted on some seeds only (docs/DECISIONS.md, "Precision").
# The site scalar is an option (off by default); this pins what it does when a job turns it on.
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_site_with_noisy_data_gets_a_lower_weight_than_clean_sites(seed):
    config = tiny_config(
        data={"scenario": "digits", "n_anchors": 32, "n_test": 50, "max_private_per_site": 64, "seed": seed,
              "sites": {"clean-1": "pixels", "clean-2": "pixels", "corrupt": "pixels", "vector": "zernike"}},
        train={"local_steps": 12, "batch_size": 16, "seed": seed},
        precision={"window": 8, "site_scalar": True, "anchor_check": False}, rounds=1,
    )
    result = run_in_process(config, progress=None, corruptions={"corrupt": ("noise", 3.0)})
    weights = result.rounds[-1].site_weights
    assert weights["corrupt"] < weights["clean-1"] and weights["corrupt"] < weights["clean-2"], weights


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_with_the_default_weighting_the_information_check_finds_a_garbage_site_and_takes_its_say(seed):
    """Defaults but the typicality check (information check on, anchor check and site scalar off): an accel site whose
    recordings are random values of the right shape shares the least information between its two views of the accel
    sites in every round, and the server, holding each round's updates to its end, weighs it by that round's factor
    from the first round on: its weight over a clean site's is its factor, which falls below 1 whenever the site
    shares less than half its median peer's information (in one round of three at least), while the clean accel
    sites keep equal weights. (That the factors enter the merge exactly is test_federation's.)"""
    config = tiny_config(data={"seed": seed, "sites": {"clean-1": "accel", "clean-2": "accel", "garbage": "accel",
                                                       "gyro": "gyro"}}, train={"seed": seed},
                         precision={"typicality_check": False}, rounds=3)  # this check alone (test_typicality: both)
    assert config.precision.information_check and not config.precision.anchor_check and not config.precision.site_scalar
    result = run_in_process(config, progress=None, corruptions={"garbage": ("garbage", 1.0)})
    factors = []
    for record in result.rounds:
        nats = {s: record.site_metrics[s]["information_check/nats"] for s in ("clean-1", "clean-2", "garbage")}
        assert min(nats, key=nats.get) == "garbage", (record.round, nats)
        weights = record.site_weights
        assert sum(weights.values()) == pytest.approx(1.0)
        assert weights["clean-1"] == pytest.approx(weights["clean-2"]), (record.round, weights)
        factor = record.site_metrics["garbage"]["information_check/factor"]
        assert factor == pytest.approx(min(1.0, nats["garbage"] / (0.5 * sorted(nats.values())[1]))), (record.round, nats)
        assert weights["garbage"] / weights["clean-1"] == pytest.approx(factor), (record.round, weights)
        factors.append(factor)
    assert min(factors) < 0.9, factors


# (case, losses, modality of each site, expected factors: "1" exactly one, "<0.5" well below)
PEER_FACTOR_CASES = [
    ("one site far worse than three peers", {"a": 4.70, "b": 4.57, "c": 4.56, "d": 4.63}, "pppp",
     {"a": "<0.5", "b": "1", "c": "1", "d": "1"}),
    ("all equal: the floor keeps the spread positive", {"a": 3.0, "b": 3.0, "c": 3.0}, "ppp", {"a": "1", "b": "1", "c": "1"}),
    ("two sites cannot tell the odd one out", {"a": 9.0, "b": 1.0}, "pp", {"a": "1", "b": "1"}),
    ("modalities are judged apart", {"a": 5.0, "b": 1.0, "c": 1.0, "d": 1.1, "e": 9.0, "f": 9.1}, "pppzzz",
     {"a": "<0.5", "b": "1", "c": "1", "d": "1", "e": "1", "f": "1"}),
    ("a better than usual site is not rewarded past 1", {"a": 1.0, "b": 4.0, "c": 4.02, "d": 4.0}, "pppp",
     {"a": "1", "b": "1", "c": "1", "d": "1"}),
]


@pytest.mark.parametrize("case, losses, modalities, expected", PEER_FACTOR_CASES, ids=[c[0] for c in PEER_FACTOR_CASES])
def test_anchor_check_factors_single_out_the_odd_site_of_a_modality(case, losses, modalities, expected):
    from fedanchor.precision import peer_factors

    factors = peer_factors(losses, dict(zip(losses, modalities)), min_peers=3)
    for site, want in expected.items():
        if want == "1":
            assert factors[site] == 1.0, (site, factors)
        else:
            assert 0.0 < factors[site] < 0.5, (site, factors)


# Anchors on a unit grid in the plane: each one's nearest other anchor is 1 away (squared distance 1).
GRID = np.array([[x, y] for x in range(4) for y in range(4)], dtype=float)
# (case, centroids, counts, expected distance)
DATA_DISTANCE_CASES = [
    ("centroids on anchors", GRID[:3], [5, 5, 5], 0.0),
    ("half a step off", GRID[:2] + [0.5, 0.0], [5, 7], 0.25),
    ("counts weigh the mean", np.array([[0.0, 0.0], [10.0, 0.0]]), [9, 1], (0 * 9 + 49 * 1) / 10),
    ("far from every anchor", np.array([[13.0, 3.0]]), [20], 100.0),
]


@pytest.mark.parametrize("case, centroids, counts, expected", DATA_DISTANCE_CASES, ids=[c[0] for c in DATA_DISTANCE_CASES])
def test_data_distance_is_the_centroids_squared_distance_to_the_nearest_anchor_in_anchor_spacings(case, centroids, counts,
                                                                                                   expected):
    assert data_distance(centroids, np.array(counts, dtype=float), GRID) == pytest.approx(expected)


def test_data_distance_is_scale_free():
    centroids, counts = GRID[:2] + [0.5, 0.0], np.array([5.0, 7.0])
    assert data_distance(7.0 * centroids, counts, 7.0 * GRID) == pytest.approx(data_distance(centroids, counts, GRID))


@pytest.mark.parametrize("centroids, counts, anchors, message", [
    (np.zeros((0, 2)), np.zeros(0), GRID, "positive count"),
    (GRID[:2], np.array([5.0, 0.0]), GRID, "positive count"),
    (GRID[:2], np.array([5.0, 5.0]), GRID[:1], "at least 2 projected anchors"),
    (GRID[:2], np.array([5.0, 5.0]), np.zeros((16, 3)), "of width 2"),
])
def test_data_distance_refuses_what_it_cannot_measure(centroids, counts, anchors, message):
    with pytest.raises(ValueError, match=message):
        data_distance(centroids, counts, anchors)


@pytest.mark.parametrize("floor, expected", [(0.01, "<0.5"), (0.1, "1")])
def test_the_spread_floor_decides_how_far_above_its_peers_a_site_may_sit(floor, expected):
    """A site 9% above the median of four (digits' clean zernike sites in one round): the anchor check's 1% floor
    takes its say, the data check's 10% floor counts it as the same data."""
    from fedanchor.precision import peer_factors

    losses = {"a": 3.127, "b": 2.845, "c": 2.91, "d": 2.839}
    factor = peer_factors(losses, dict.fromkeys(losses, "z"), min_peers=3, relative_floor=floor)["a"]
    assert (factor == 1.0) if expected == "1" else (0.0 < factor < 0.5), factor


# (case, nats each site's views share, modality of each site, expected factors); chance is 3 nats for every site
INFORMATION_CASES = [
    ("a site at chance among three learning peers", {"a": 0.0, "b": 1.1, "c": 1.0, "d": 0.9}, "pppp",
     {"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0}),
    ("within half the median a site keeps its say", {"a": 0.5, "b": 1.0, "c": 0.8}, "ppp",
     {"a": 1.0, "b": 1.0, "c": 1.0}),
    ("below half the median the factor is its share of that half", {"a": 0.2, "b": 1.0, "c": 0.8}, "ppp",
     {"a": 0.5, "b": 1.0, "c": 1.0}),
    ("two sites cannot be compared", {"a": 0.0, "b": 2.0}, "pp", {"a": 1.0, "b": 1.0}),
    ("nobody has learned a tenth of chance yet: differences are noise", {"a": 0.03, "b": 0.2, "c": 0.25}, "ppp",
     {"a": 1.0, "b": 1.0, "c": 1.0}),
    ("no site learns anything: nobody is preferred", {"a": 0.0, "b": 0.0, "c": 0.0}, "ppp",
     {"a": 1.0, "b": 1.0, "c": 1.0}),
    ("modalities are judged apart", {"a": 0.1, "b": 1.0, "c": 1.0, "d": 0.5, "e": 0.5, "f": 0.5}, "pppzzz",
     {"a": 0.2, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0, "f": 1.0}),
]


@pytest.mark.parametrize("case, nats, modalities, expected", INFORMATION_CASES, ids=[c[0] for c in INFORMATION_CASES])
def test_information_factors_keep_a_sites_say_within_half_the_median_and_scale_it_below(case, nats, modalities, expected):
    from fedanchor.precision import information_factors

    factors = information_factors(nats, {s: 3.0 for s in nats}, dict(zip(nats, modalities)), min_peers=3)
    assert factors == pytest.approx(expected, abs=1e-12), factors


@pytest.mark.parametrize("tolerance", [0.0, -0.5, 1.5])
def test_information_factors_refuse_a_tolerance_outside_zero_to_one(tolerance):
    from fedanchor.precision import information_factors

    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        information_factors({"a": 1.0, "b": 1.0, "c": 1.0}, dict.fromkeys("abc", 3.0), dict.fromkeys("abc", "p"), tolerance=tolerance)


@pytest.mark.parametrize("loss, batch, expected", [
    (math.log(31), 16, 0.0),  # chance: each view picks its partner among 2B - 1 = 31 at random
    (0.0, 16, math.log(31)),  # every partner found with certainty
    (1.0, 2, math.log(3) - 1.0),
    (5.0, 16, 0.0),  # worse than chance is floored: no information, not negative information
])
def test_view_information_is_the_infonce_bound_on_what_two_views_share(loss, batch, expected):
    from fedanchor.precision import view_information

    assert view_information(loss, batch) == pytest.approx(expected)


@pytest.mark.parametrize("loss, batch, message", [(1.0, 1, "at least 2 items"), (float("nan"), 8, "must be finite")])
def test_view_information_refuses_what_it_cannot_read(loss, batch, message):
    from fedanchor.precision import view_information

    with pytest.raises(ValueError, match=message):
        view_information(loss, batch)
