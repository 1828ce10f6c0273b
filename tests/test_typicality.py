"""The typicality check: per-item statistics, their summaries, and the factors the server gives sites."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import tiny_config
from fedanchor.federation import SiteTrainer, make_split, run_in_process
from fedanchor.typicality import (ALLOWED_Z, ANCHOR_STATISTICS, Summary, anchor_summary, anchor_units, energy,
                                  roughness, site_summary, statistics_of, typicality_factors, typicality_z)

RNG = np.random.default_rng(0)
SIGNAL_METRICS = sorted(f"typicality/{name}/{part}" for name in ("energy", "roughness", *ANCHOR_STATISTICS)
                        for part in ("mean", "sd"))
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
    assert set(reference.mean) == {"energy", *ANCHOR_STATISTICS} and reference.items == 12
    assert set(anchor_summary("signal", SMOOTH[:12], SMOOTH[:12].reshape(12, -1)).mean) == {"energy", "roughness",
                                                                                            *ANCHOR_STATISTICS}


def test_a_summary_travels_as_eight_site_metrics_and_back():
    summary = site_summary("signal", SMOOTH, SMOOTH.reshape(20, -1), SMOOTH.reshape(20, -1))
    metrics = summary.metrics()
    assert sorted(metrics) == SIGNAL_METRICS
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
]


@pytest.mark.parametrize("anchors,bad_factor", [(16, "1"), (1000, "<")])
def test_many_items_make_a_small_shift_count_as_far_as_the_anchors_count_allows(anchors, bad_factor):
    """Sites of 1000 items, one shifted by 0.3 sd: beside 16 anchors the shift is within what the reference's mean
    is known to (standard error 0.25), beside 1000 anchors it is ten times that."""
    sites = {"a": summary(0.0, 1.0, 1000), "b": summary(0.01, 1.0, 1000), "c": summary(0.3, 1.0, 1000)}
    factors, zs, _ = typicality_factors(sites, dict.fromkeys(sites, "accel"), lambda _: summary(0.0, 1.0, anchors))
    assert factors["a"] == factors["b"] == 1.0
    assert (factors["c"] == 1.0) if bad_factor == "1" else (factors["c"] < 0.05), zs


@pytest.mark.parametrize("case,sites,expected", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_typicality_factors_single_out_the_site_unlike_its_peers_and_the_anchors(case, sites, expected):
    factors, zs, _ = typicality_factors(sites, dict.fromkeys(sites, "accel"), {"accel": REFERENCE}.__getitem__)
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
    factors, zs, _ = typicality_factors(sites, modality_of, {"accel": REFERENCE}.__getitem__, min_sites=2)  # gyro: never asked
    assert set(factors) == {"a", "b"} and set(zs) == {"a", "b"}


def test_every_site_must_report_the_anchors_statistics():
    # A site that left roughness out would otherwise switch it off for all its peers (the server refuses it first).
    rough = {"a": Summary({"energy": 0.0, "roughness": 9.0}, {"energy": 1.0, "roughness": 1.0}, 10),
             "b": Summary({"energy": 0.1}, {"energy": 1.0}, 10)}
    with pytest.raises(ValueError, match=r"sites \['a'\] report other typicality statistics than the anchors' \['energy'\]"):
        typicality_z(rough, REFERENCE)


@pytest.mark.parametrize("kind,shape,expected", [
    ("signal", (3, 100), ("energy", "roughness", *ANCHOR_STATISTICS)),
    ("image", (16, 15), ("energy", "roughness", *ANCHOR_STATISTICS)),
    ("signal", (3, 1), ("energy", *ANCHOR_STATISTICS)), ("vector", (40,), ("energy", *ANCHOR_STATISTICS)),
    ("text", (), ("energy", "coherence", *ANCHOR_STATISTICS)), ("codes", (), ("energy", *ANCHOR_STATISTICS)),
])
def test_order_is_read_where_items_have_one_roughness_on_an_axis_of_two_or_more_coherence_in_text(kind, shape, expected):
    assert statistics_of(kind, shape) == expected
    if kind in ("signal", "image", "vector"):
        items = RNG.normal(size=(6, *shape))
        assert sorted(site_summary(kind, items, items.reshape(6, -1), items.reshape(6, -1)).mean) == sorted(expected)


TEXTS = ["no acute disease", "the heart is normal in size", "lungs are clear", "no effusion"]


@pytest.mark.parametrize("coherence,match", [
    (None, "needs the coherence of each of its 4 items .*base_features_and_coherence.*got none"),
    (np.ones(3), "needs the coherence of each of its 4 items .*got 3"),
])
def test_a_text_summary_needs_each_items_coherence(coherence, match):
    base = RNG.normal(size=(4, 5))
    with pytest.raises(ValueError, match=match):
        site_summary("text", TEXTS, base, base, coherence)
    with pytest.raises(ValueError, match=match):
        anchor_summary("text", TEXTS, base, coherence)


def test_a_text_sites_coherence_is_summarised_with_its_other_statistics():
    base = RNG.normal(size=(4, 5))
    coherence = np.array([0.30, 0.34, 0.36, 0.40])
    summary = site_summary("text", TEXTS, base, base, coherence)
    assert sorted(summary.mean) == sorted(statistics_of("text", ()))
    assert summary.mean["coherence"] == pytest.approx(0.35) and summary.sd["coherence"] == pytest.approx(np.std(coherence, ddof=1))
    assert anchor_summary("text", TEXTS, base, coherence).mean["coherence"] == pytest.approx(0.35)
    assert "coherence" not in site_summary("vector", base, base, base).mean  # no order to read in a vector


# (case, what the bad site's pipeline does to everything it reads: its items and its copy of the anchors alike)
PIPELINE_CASES = [
    ("a gain and offset", lambda x: 2.0 * x + 1.0),
    ("a wrong unit", lambda x: 1000.0 * x),
    ("a damped sensor", lambda x: 0.3 * x),
]


@pytest.mark.parametrize("case,pipeline", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_a_site_whose_pipeline_rescales_everything_is_seen_through_its_copy_of_the_anchors(case, pipeline):
    """Items and anchors shifted alike keep their energy (it is measured in the site's own anchors' units); the
    level and dispersion of the site's copy of the anchors give the site away, while clean sites match the server's
    to the last bit."""
    anchors = SMOOTH[:16]
    reference = anchor_summary("signal", anchors, anchors.reshape(16, -1))
    items = {name: SMOOTH[16:] * RNG.uniform(0.8, 1.2, size=(4, 1, 1)) for name in ("clean-1", "clean-2", "bad")}
    copies = {"clean-1": anchors, "clean-2": anchors, "bad": pipeline(anchors)}
    seen = {"bad": pipeline(items["bad"])}
    sites = {name: site_summary("signal", seen.get(name, x), seen.get(name, x).reshape(4, -1),
                                copies[name].reshape(16, -1)) for name, x in items.items()}
    assert sites["bad"].mean["energy"] == pytest.approx(site_summary(
        "signal", items["bad"], items["bad"].reshape(4, -1), anchors.reshape(16, -1)).mean["energy"])
    for name in ANCHOR_STATISTICS:
        assert sites["clean-1"].mean[name] == reference.mean[name] and sites["clean-1"].sd[name] == reference.sd[name]
    factors, zs, _ = typicality_factors(sites, dict.fromkeys(sites, "accel"), {"accel": reference}.__getitem__)
    assert factors["bad"] < 0.05 and factors["clean-1"] == factors["clean-2"] == 1.0, zs


def test_the_anchors_statistics_take_their_standard_errors_from_the_anchor_count():
    """Sites of 5 items and sites of 5000 judge the same shift of their anchors' level alike: the anchors are what
    the level is averaged over."""
    def sites_of(items: int) -> dict[str, Summary]:
        def one(level: float) -> Summary:
            return Summary({"energy": 0.0, "anchor_level": level}, {"energy": 1.0, "anchor_level": 1.0}, items)
        return {"a": one(0.0), "b": one(0.0), "c": one(0.6)}
    reference = Summary({"energy": 0.0, "anchor_level": 0.0}, {"energy": 1.0, "anchor_level": 1.0}, 16)
    few, many = typicality_z(sites_of(5), reference), typicality_z(sites_of(5000), reference)
    assert few["c"] == pytest.approx(many["c"]) == pytest.approx(0.6 / (1.0 / 4.0))


def test_anchors_of_one_level_leave_a_bit_of_difference_unjudged():
    """Anchors whose level does not vary (spread 0) read on another device: a difference far under 1% of the level
    costs nobody their say; a 10% rescale still does."""
    def one(level: float, sd: float) -> Summary:
        return Summary({"energy": 0.0, "anchor_level": level}, {"energy": 1.0, "anchor_level": sd}, 10)
    reference = Summary({"energy": 0.0, "anchor_level": 1.0}, {"energy": 1.0, "anchor_level": 0.0}, 16)
    bits = typicality_z({"a": one(1.0, 0.0), "b": one(1.0 + 1e-7, 3e-9), "c": one(1.0 - 1e-7, 0.0)}, reference)
    assert max(bits.values()) < 1e-3, bits
    rescaled = typicality_z({"a": one(1.0, 0.0), "b": one(1.0, 0.0), "c": one(1.0 + math.log(1.1), 0.0)}, reference)
    assert rescaled["c"] > 4 and rescaled["a"] == rescaled["b"] == 0.0


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
    assert sorted(sent) == SIGNAL_METRICS
    assert all(math.isfinite(v) for v in sent.values())
    assert numbers(tiny_config(privacy={"dp": True})) == {}
    assert numbers(tiny_config(precision={"method": "uniform"})) == {}
    assert numbers(tiny_config(precision={"typicality_check": False})) == {}
    few = config.alignment.codebook_min_cluster - 1
    assert numbers(config, data.subset(np.arange(few))) == {}


def test_a_report_site_sends_its_reports_coherence_and_a_code_site_none():
    config = tiny_config(data={"scenario": "xray", "n_anchors": 8, "n_test": 8, "max_private_per_site": 30,
                               "sites": {"r1": "report", "f1": "findings"}})
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}

    def numbers(site: str, modality: str) -> dict[str, float]:
        return SiteTrainer(config, site, split.private[site], split.anchors[modality], split.anchor_fingerprint,
                           modalities, split.feature_stats).typicality_metrics()
    report, findings = numbers("r1", "report"), numbers("f1", "findings")
    assert {k.split("/")[1] for k in report} == set(statistics_of("text", ())) and "coherence" in statistics_of("text", ())
    assert {k.split("/")[1] for k in findings} == set(statistics_of("codes", ())) and "coherence" not in statistics_of("codes", ())
    assert -1.0 <= report["typicality/coherence/mean"] <= 1.0 and report["typicality/coherence/sd"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode,severity,in_pipeline", [("garbage", 1.0, False), ("noise", 3.0, False), ("gain", 1.0, True)])
def test_with_the_defaults_the_typicality_check_leaves_a_bad_site_out_from_the_first_round(mode, severity, in_pipeline):
    """Three accel sites, one corrupted (a gain in its pipeline: its copy of the anchors too): its typicality z is far
    above the clean sites' from round 0 on, its factor under exp(-2), so it is left out of every round (weight 0); its two
    clean peers, too few to judge without it, keep their whole say and share the accel weight equally."""
    config = tiny_config(data={"sites": {"clean-1": "accel", "clean-2": "accel", "bad": "accel", "gyro": "gyro"}},
                         rounds=2)
    assert config.precision.typicality_check
    result = run_in_process(config, progress=None, corruptions={"bad": (mode, severity)}, corrupt_anchors=in_pipeline)
    for record in result.rounds:
        metrics, weights = record.site_metrics, record.site_weights
        assert metrics["bad"]["typicality_check/factor"] < math.exp(-2) and metrics["bad"]["checks/left_out"] == 1.0, metrics["bad"]
        assert weights["bad"] == 0.0 and weights["clean-1"] == pytest.approx(weights["clean-2"]), (record.round, weights)
        for site in ("clean-1", "clean-2", "gyro"):
            assert not any(k.endswith("/factor") and v < 1.0 for k, v in metrics[site].items()), (site, metrics[site])
        # the report says which statistic gave the site away: the level of its copy of the anchors when the corruption
        # sits in its pipeline, a statistic of its items otherwise
        parts = {k.rsplit("/", 1)[1]: v for k, v in metrics["bad"].items() if k.startswith("typicality_check/z/")}
        assert set(parts) == {"energy", "roughness", *ANCHOR_STATISTICS}
        assert max(parts.values()) == metrics["bad"]["typicality_check/z"]
        assert (max(parts, key=parts.get) in ANCHOR_STATISTICS) == in_pipeline, parts


@pytest.mark.slow
def test_the_minilm_trunk_reads_reports_with_shuffled_words_as_less_coherent():
    """Real IU X-ray reports through the real MiniLM trunk: shuffling the words of each report lowers its coherence
    (what a mean-pooled embedding barely sees), for most reports and on average by over 4 standard errors (a report of
    a few words has little order to lose); a report's coherence does not depend on the batch
    it was padded in (a site and the server batch differently); a code modality has none."""
    from fedanchor.bench.runner import bench_config
    from fedanchor.model.base_features import base_features_and_coherence
    from fedanchor.model.homogeneous import build_model

    config = bench_config("xray", overrides={"data.n_anchors": 8, "data.n_test": 8, "data.max_private_per_site": 40,
                                             "data.sites": {"r1": "report", "f1": "findings"}})
    split = make_split(config)
    model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
    reports = list(split.private["r1"].items)
    rng = np.random.default_rng(0)
    shuffled = [" ".join(rng.permutation(r.split())) for r in reports]

    def text_coherence(items):
        return base_features_and_coherence(model, "report", items)[1]
    clean, mixed = text_coherence(reports), text_coherence(shuffled)
    assert clean.shape == mixed.shape == (40,)
    drop = clean - mixed
    assert np.mean(drop > 0) >= 0.7 and drop.mean() > 4 * drop.std(ddof=1) / math.sqrt(len(drop)), drop
    alone = np.concatenate([text_coherence([r]) for r in reports[:5]])
    np.testing.assert_allclose(alone, clean[:5], atol=1e-5)
    assert base_features_and_coherence(model, "findings", split.private["f1"].items)[1] is None
