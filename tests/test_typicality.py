"""The typicality check: per-item statistics, their summaries, and the factors the server gives sites."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import tiny_config
from fedanchor.federation import SiteTrainer, make_split, run_in_process
from fedanchor.typicality import (ALLOWED_Z, Summary, anchor_summary, anchor_units, energy, roughness, site_summary,
                                  statistics_of, typicality_factors, typicality_z)

RNG = np.random.default_rng(0)
SMOOTH = np.sin(np.linspace(0, 4 * np.pi, 100))[None, None, :] * RNG.uniform(0.5, 2.0, size=(20, 3, 1))


def moving_average(x: np.ndarray, width: int = 5) -> np.ndarray:
    return np.apply_along_axis(lambda row: np.convolve(row, np.ones(width) / width, "same"), -1, x)


# (case, transform of smooth signals, how their roughness compares with the originals')
ROUGHNESS_CASES = [
    ("gain and offset leave it", lambda x: 3.0 * x + 5.0, "same"),
    ("white noise is rough", lambda x: RNG.normal(size=x.shape), "higher"),
    ("time steps shuffled are rough", lambda x: x[..., RNG.permutation(x.shape[-1])], "higher"),
    ("a moving average is smoother", moving_average, "lower"),
]


@pytest.mark.parametrize("case,transform,expected", ROUGHNESS_CASES, ids=[c[0] for c in ROUGHNESS_CASES])
def test_roughness_tells_structure_from_its_absence_and_ignores_scale(case, transform, expected):
    before, after = roughness(SMOOTH).mean(), roughness(transform(SMOOTH)).mean()
    if expected == "same":
        assert after == pytest.approx(before, abs=1e-9)
    elif expected == "higher":
        assert after > before + 2.0, (before, after)
    else:
        assert after < before, (before, after)


def test_roughness_of_white_noise_is_log_two():
    # Successive differences of independent values have twice their variance.
    assert roughness(RNG.normal(size=(200, 2, 400))).mean() == pytest.approx(math.log(2.0), abs=0.02)


def test_energy_is_the_log_mean_square_in_the_anchors_units():
    anchors = RNG.normal(3.0, [1.0, 2.0, 4.0], size=(500, 3))
    mean, scale = anchor_units(anchors)
    items = mean + scale * np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert energy(items, mean, scale) == pytest.approx([0.0, math.log(4.0 / 3.0), math.log(1e-12)])
    assert energy(2 * items - mean, mean, scale)[:2] == pytest.approx(energy(items, mean, scale)[:2] + math.log(4.0))


def test_a_feature_the_anchors_hold_constant_is_measured_in_unit_scale():
    anchors = np.column_stack([RNG.normal(size=50), np.full(50, 7.0)])
    _, scale = anchor_units(anchors)
    assert scale[1] == 1.0


def test_each_anchors_energy_is_taken_against_the_other_anchors():
    anchors = RNG.normal(size=(12, 5))
    reference = anchor_summary("vector", anchors, anchors)
    by_hand = [energy(anchors[i:i + 1], *anchor_units(np.delete(anchors, i, 0)))[0] for i in range(len(anchors))]
    assert reference.mean["energy"] == pytest.approx(np.mean(by_hand))
    assert reference.sd["energy"] == pytest.approx(np.std(by_hand, ddof=1))
    assert set(reference.mean) == {"energy"} and reference.items == 12
    assert set(anchor_summary("signal", SMOOTH[:12], SMOOTH[:12].reshape(12, -1)).mean) == {"energy", "roughness"}


def test_a_summary_travels_as_four_site_metrics_and_back():
    summary = site_summary("signal", SMOOTH, SMOOTH.reshape(20, -1), SMOOTH.reshape(20, -1))
    metrics = summary.metrics()
    assert sorted(metrics) == ["typicality/energy/mean", "typicality/energy/sd", "typicality/roughness/mean",
                               "typicality/roughness/sd"]
    assert Summary.from_metrics({**metrics, "loss/private": 1.0}, 20) == summary
    assert Summary.from_metrics({"loss/private": 1.0}, 20) is None
    with pytest.raises(ValueError, match="mean/sd pairs; missing .*typicality/energy/sd"):
        Summary.from_metrics({"typicality/energy/mean": 0.1}, 20)


def summary(energy_mean: float, energy_sd: float = 1.0, items: int = 10) -> Summary:
    return Summary({"energy": energy_mean}, {"energy": energy_sd}, items)


REFERENCE = summary(0.0, 1.0, 16)
# (case, site -> summary, expected factors: "1" exactly one, "<" below 0.05, "(a,b)" within)
FACTOR_CASES = [
    ("clean sites within their standard error keep their say",
     {"a": summary(0.1), "b": summary(-0.2), "c": summary(0.25)}, {"a": "1", "b": "1", "c": "1"}),
    ("a site far off in the mean loses it",
     {"a": summary(0.1), "b": summary(-0.2), "c": summary(2.5)}, {"a": "1", "b": "1", "c": "<"}),
    ("a site whose items are all alike loses it",
     {"a": summary(0.1), "b": summary(-0.2), "c": summary(0.0, 0.1)}, {"a": "1", "b": "1", "c": "<"}),
    ("a mild shift loses part of it",
     {"a": summary(0.0), "b": summary(0.05), "c": summary(0.9)}, {"a": "1", "b": "1", "c": (0.3, 0.95)}),
    ("many items make a small shift count",
     {"a": summary(0.0, 1.0, 1000), "b": summary(0.01, 1.0, 1000), "c": summary(0.3, 1.0, 1000)},
     {"a": "1", "b": "1", "c": "<"}),
]


@pytest.mark.parametrize("case,sites,expected", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_typicality_factors_single_out_the_site_unlike_its_peers_and_the_anchors(case, sites, expected):
    factors, zs = typicality_factors(sites, dict.fromkeys(sites, "accel"), {"accel": REFERENCE}.__getitem__)
    for site, want in expected.items():
        assert factors[site] == pytest.approx(math.exp(-max(0.0, zs[site] - ALLOWED_Z)))
        if want == "1":
            assert factors[site] == 1.0, (site, zs)
        elif want == "<":
            assert factors[site] < 0.05, (site, zs)
        else:
            assert want[0] < factors[site] < want[1], (site, zs)


def test_a_modality_with_too_few_reporting_sites_is_not_judged():
    sites = {"a": summary(0.0), "b": summary(5.0), "g": summary(9.0)}
    modality_of = {"a": "accel", "b": "accel", "g": "gyro"}
    factors, zs = typicality_factors(sites, modality_of, {"accel": REFERENCE}.__getitem__, min_sites=2)  # gyro: never asked
    assert set(factors) == {"a", "b"} and set(zs) == {"a", "b"}


def test_every_site_must_report_the_anchors_statistics():
    # A site that left roughness out would otherwise switch it off for all its peers (the server refuses it first).
    rough = {"a": Summary({"energy": 0.0, "roughness": 9.0}, {"energy": 1.0, "roughness": 1.0}, 10),
             "b": Summary({"energy": 0.1}, {"energy": 1.0}, 10)}
    with pytest.raises(ValueError, match=r"sites \['a'\] report other typicality statistics than the anchors' \['energy'\]"):
        typicality_z(rough, REFERENCE)


@pytest.mark.parametrize("kind,shape,expected", [
    ("signal", (3, 100), ("energy", "roughness")), ("image", (16, 15), ("energy", "roughness")),
    ("signal", (3, 1), ("energy",)), ("vector", (40,), ("energy",)), ("text", (), ("energy",)), ("codes", (), ("energy",)),
])
def test_roughness_is_read_only_where_items_have_an_ordered_axis_of_two_or_more(kind, shape, expected):
    assert statistics_of(kind, shape) == expected
    if kind in ("signal", "image", "vector"):
        items = RNG.normal(size=(6, *shape))
        assert tuple(sorted(site_summary(kind, items, items.reshape(6, -1), items.reshape(6, -1)).mean)) == expected


def test_a_large_offset_does_not_move_the_anchors_reference():
    anchors = RNG.normal(size=(30, 4))
    assert anchor_summary("vector", anchors + 1e8, anchors + 1e8).mean["energy"] == pytest.approx(
        anchor_summary("vector", anchors, anchors).mean["energy"], abs=1e-6)


def test_a_site_sends_its_numbers_only_with_enough_items_and_never_under_dp():
    config = tiny_config(data={"sites": {"a1": "accel", "g1": "gyro"}})
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    data = split.private["a1"]

    def numbers(cfg, items=data):
        trainer = SiteTrainer(cfg, "a1", items, split.anchors["accel"], split.anchor_fingerprint, modalities,
                              split.feature_stats)
        return trainer.typicality_metrics()
    sent = numbers(config)
    assert sorted(sent) == ["typicality/energy/mean", "typicality/energy/sd", "typicality/roughness/mean",
                            "typicality/roughness/sd"] and all(math.isfinite(v) for v in sent.values())
    assert numbers(tiny_config(privacy={"dp": True})) == {}
    assert numbers(tiny_config(precision={"method": "uniform"})) == {}
    assert numbers(tiny_config(precision={"typicality_check": False})) == {}
    few = config.alignment.codebook_min_cluster - 1
    assert numbers(config, data.subset(np.arange(few))) == {}


@pytest.mark.slow
@pytest.mark.parametrize("mode,severity", [("garbage", 1.0), ("noise", 3.0)])
def test_with_the_defaults_the_typicality_check_leaves_a_bad_site_out_from_the_first_round(mode, severity):
    """Three accel sites, one corrupted: its typicality z is far above the clean sites' from round 0 on, its factor
    under 0.05, so it is left out of every round (weight 0); its two clean peers, too few to judge without it, keep
    their whole say and share the accel weight equally."""
    config = tiny_config(data={"sites": {"clean-1": "accel", "clean-2": "accel", "bad": "accel", "gyro": "gyro"}},
                         rounds=2)
    assert config.precision.typicality_check
    result = run_in_process(config, progress=None, corruptions={"bad": (mode, severity)})
    for record in result.rounds:
        metrics, weights = record.site_metrics, record.site_weights
        assert metrics["bad"]["typicality_check/factor"] < 0.05 and metrics["bad"]["checks/left_out"] == 1.0, metrics["bad"]
        assert weights["bad"] == 0.0 and weights["clean-1"] == pytest.approx(weights["clean-2"]), (record.round, weights)
        for site in ("clean-1", "clean-2", "gyro"):
            assert not any(k.endswith("/factor") and v < 1.0 for k, v in metrics[site].items()), (site, metrics[site])
