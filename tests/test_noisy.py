"""The noisy-site study writes its JSON, Markdown and PNG with a weight for every site and round (shape, not numbers)."""
from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import assert_png_drawn
from fedanchor.bench.noisy import (
    NOISY_MODES,
    noisy_site_study,
    pick_noisy_site,
    resolve_modes,
    write_noisy,
)
from fedanchor.bench.runner import bench_config
from fedanchor.data.corrupt import CORRUPTIONS

# motion has 80 samples: 16 anchors + 24 test leave 40, so 10 private samples for each of 4 sites.
SITES = {"accel-1": "accel", "accel-2": "accel", "gyro-1": "gyro", "gyro-2": "gyro"}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine can be many times slower
    yield
    torch.set_num_threads(threads)


def test_modes_name_corruptions_that_exist():
    assert set(NOISY_MODES) == {"noise", "gain", "shuffle", "blur", "garbage", "small"}
    assert all(m.corruption in CORRUPTIONS and m.severity > 0 for m in NOISY_MODES.values())
    assert resolve_modes({"gain": 0.5})["gain"].severity == 0.5
    with pytest.raises(ValueError, match="unknown noisy-site mode"):
        resolve_modes(["smudge"])
    with pytest.raises(ValueError, match="severity"):
        resolve_modes({"noise": 0.0})


def test_noisy_study_on_motion_writes_weights_for_every_site_and_round(tmp_path, one_thread):
    config = bench_config("motion", quick=True, trunk="tiny", overrides={"data.sites": SITES, "train.local_steps": 4,
                                                                         "alignment.readout_repeats": 1})
    messages: list[str] = []
    started = time.perf_counter()
    study = noisy_site_study(config, modes=["noise"], say=messages.append)
    elapsed = time.perf_counter() - started
    assert study.noisy_site == "accel-1" and study.clean_peers == ["accel-2"]
    assert messages and any("weight ratio" in m for m in messages)

    paths = write_noisy(study, tmp_path)
    assert set(paths) == {"json", "md", "png"}
    data = json.loads(paths["json"].read_text())
    assert data["noisy_site"] == "accel-1" and data["modality"] == "accel"
    runs = [data["reference"], data["runs"]["noise"]["precision"], data["runs"]["noise"]["uniform"]]
    assert data["runs"]["noise"]["uniform"]["method"] == "uniform"
    assert data["runs"]["noise"]["precision"]["method"] == config.precision.method
    for run in runs:
        assert len(run["site_weights"]) == config.rounds == len(run["site_uncertainty"])
        for weights in run["site_weights"]:
            assert set(weights) == set(SITES)
            assert sum(weights.values()) == pytest.approx(1.0)
        for level in ("instance", "semantic"):
            assert 0.0 <= run["mean_recall@10"][level] <= 1.0
    # each run's wall seconds are its own part of the study's, which is its part of the call's
    assert all(run["seconds"] > 0 for run in runs)
    assert sum(run["seconds"] for run in runs) <= data["seconds"] <= elapsed
    # uniform weighting with equal private sizes: every site gets the same share
    assert all(w == pytest.approx(0.25) for w in data["runs"]["noise"]["uniform"]["site_weights"][-1].values())

    figure = data["figures"]["noise"]
    assert len(figure["weight_ratio"]) == config.rounds
    assert figure["weight_ratio"] == [pytest.approx(w["accel-1"] / w["accel-2"])
                                      for w in data["runs"]["noise"]["precision"]["site_weights"]]
    weights = data["runs"]["noise"]["precision"]["site_weights"][-1]
    assert figure["weight_ratio_final"] == pytest.approx(weights["accel-1"] / weights["accel-2"])
    assert figure["weight_ratio_uniform"][-1] == pytest.approx(1.0)
    assert isinstance(figure["ratio_target_met"], bool)
    assert set(figure["recall_target_met"]) == {"instance", "semantic"}
    # the why: two accel sites cannot tell an odd one out, so the checks judge nobody and report nothing
    checks = data["runs"]["noise"]["precision"]["site_checks"]
    assert len(checks) == config.rounds and all(c["accel-1"] == {} for c in checks), checks
    assert all(c == {s: {} for s in SITES} for c in data["runs"]["noise"]["uniform"]["site_checks"])

    md = paths["md"].read_text()
    assert md.startswith("## Noisy-site study")
    assert "| mode | severity | noisy site | weight ratio per round |" in md
    assert "| noise | 3 | accel-1 |" in md and "**" in md
    assert "### Site weights per round" in md and "accel-1*" in md
    assert "Why, under precision weighting" not in md  # no check judged the noisy site: no table of its factors
    assert_png_drawn(paths["png"], (6.0, 4.2))  # one mode: one panel


def test_the_federation_without_the_bad_site_drops_its_voucher_and_keeps_the_others():
    """A study of a site the consortium vouches for (precision.vouched_sites) still builds its clean-only federation:
    the voucher of the site left out goes with it, a voucher of another site stays."""
    from fedanchor.bench.noisy import without_site
    from fedanchor.config import with_overrides
    from fedanchor.federation.loop import make_split

    config = bench_config("motion", quick=True, trunk="tiny", overrides={"data.sites": SITES})
    config = with_overrides(config, {"precision.vouched_sites": ["accel-1", "gyro-2"]})
    rest = make_split(config).without("accel-1")
    with pytest.raises(ValueError, match=r"names \['accel-1'\], not sites of data.sites"):
        with_overrides(config, {"data.sites": rest.site_modality})
    clean_only = without_site(config, rest, "accel-1")
    assert clean_only.data.sites == {"accel-2": "accel", "gyro-1": "gyro", "gyro-2": "gyro"}
    assert clean_only.precision.vouched_sites == ("gyro-2",)


def test_a_study_needs_a_modality_with_two_sites():
    with pytest.raises(ValueError, match="set data.sites so that some modality has two sites"):
        pick_noisy_site({"site-1": "accel", "site-2": "gyro"})
    with pytest.raises(ValueError, match="only 'gyro' site"):
        pick_noisy_site({"a": "accel", "b": "accel", "g": "gyro"}, site="g")
    with pytest.raises(ValueError, match="not a site of this job"):
        pick_noisy_site(SITES, site="nowhere")
    assert pick_noisy_site({"g": "gyro", "a": "accel", "b": "accel"}) == "a"
    # the default motion sites (one per modality) fail before any training
    config = bench_config("motion", quick=True, trunk="tiny")
    with pytest.raises(ValueError, match="e.g. data.sites="):
        noisy_site_study(config, modes=["noise"], say=lambda _m: None)


def test_a_study_needs_precision_weighting_to_compare():
    config = bench_config("motion", quick=True, trunk="tiny", overrides={"data.sites": SITES, "precision.method": "uniform"})
    with pytest.raises(ValueError, match="no precision weighting to compare"):
        noisy_site_study(config, modes=["noise"], say=lambda _m: None)


def _run(weighting: str, weights: dict[str, float], instance: float, semantic: float):
    from fedanchor.bench.noisy import NoisyRun

    metrics = {f"{d}/{k}": v for d in ("a->b", "b->a") for k, v in (("recall@10", instance), ("semantic_recall@10", semantic))}
    return NoisyRun(mode=None, severity=1.0, weighting=weighting, method="iterate_variance" if weighting == "precision" else "uniform",
                    site_weights=[weights], site_uncertainty=[{}], rejected=[{}], metrics=metrics, seconds=1.0)


def _study(seed: int, precision: float, uniform: float, clean_only: float, bad_weight: float,
           uniform_semantic: float = 0.8):
    from fedanchor.bench.noisy import NoisyStudy
    from fedanchor.config import with_overrides

    sites = {"p1": "a", "p2": "a", "p3": "a", "z1": "b"}
    config = with_overrides(bench_config("motion", quick=True, trunk="tiny"), {"data.seed": seed})
    clean = {"p1": 0.25, "p2": 0.25, "p3": 0.25, "z1": 0.25}
    bad = {"p1": bad_weight, "p2": 0.3, "p3": 0.3, "z1": 0.25}
    return NoisyStudy(scenario="motion", config=config, noisy_site="p1", modality="a", sites=sites,
                      reference=_run("precision", clean, 0.9 + seed / 100, 0.8), modes=dict(resolve_modes(["garbage"])),
                      runs={"garbage": {"precision": _run("precision", bad, precision, 0.8),
                                        "uniform": _run("uniform", clean, uniform, uniform_semantic)}},
                      clean_only=_run("precision", {"p2": 0.3, "p3": 0.3, "z1": 0.4}, clean_only, 0.8),
                      reference_uniform=_run("uniform", clean, 0.9, 0.8))


def test_precision_summary_reports_ratio_hurt_and_recovery_from_the_split_means():
    from fedanchor.bench.precision_study import precision_summary

    # uniform loses 0.2 and 0.1 against clean only; precision wins back 0.15 and 0.05: 0.2 / 0.3 recovered overall
    summary = precision_summary([_study(0, 0.75, 0.6, 0.8, 0.03), _study(1, 0.75, 0.7, 0.8, 0.09)])
    case, = summary["cases"]
    assert case["corruption"] == "garbage" and case["bad_site"] == "p1" and case["splits"] == 2
    assert case["weight_ratio"] == pytest.approx((0.1 + 0.3) / 2)  # bad / mean clean peer (0.3) per split, then mean
    assert case["uniform_hurt_instance"] == pytest.approx(0.15) and case["uniform_hurt_semantic"] == pytest.approx(0.0)
    assert case["uniform_hurt_per_split"]["instance"] == pytest.approx([0.2, 0.1])
    assert case["recovery_instance"] == pytest.approx(0.1 / 0.15)
    assert case["recovery_semantic"] != case["recovery_semantic"]  # nan: nothing was lost, so nothing to recover
    assert case["targets_met"] == {"weight_ratio": True, "recovery": False, "uniform_hurt": False}
    clean = summary["clean"]["instance"]
    assert clean["difference"] == pytest.approx(0.005) and clean["split_sd"] == pytest.approx(0.00707, abs=1e-4)
    assert clean["within_one_sd"] is True


@pytest.mark.parametrize("per_split, hurt", [
    ([0.2, 0.1], True),  # mean 0.15, standard error 0.05
    ([0.06, -0.002, -0.002], False),  # one split's loss, the others' noise: mean 0.019, standard error 0.021
    ([0.01, 0.01, 0.01], True),  # small, but the same on every split
    ([0.05], False),  # one split: no spread to weigh it against
    ([-0.1, -0.2], False),
    ([0.1, float("nan")], False),
])
def test_uniform_is_measurably_hurt_only_beyond_the_splits_spread(per_split, hurt):
    from fedanchor.bench.precision_study import measurably_hurt

    assert measurably_hurt(per_split) is hurt


def test_a_recovery_counts_only_where_uniform_is_measurably_hurt():
    from fedanchor.bench.precision_study import precision_summary

    # one split loses 0.2 under uniform and precision wins it back; the other two gain a little: no measurable loss
    summary = precision_summary([_study(seed, 0.8, uniform, 0.8, 0.0, uniform_semantic=uniform)
                                 for seed, uniform in enumerate((0.6, 0.81, 0.82))])
    case, = summary["cases"]
    assert case["uniform_hurt_instance"] > 0 and case["uniform_hurt_semantic"] > 0
    assert case["recovery_instance"] >= 0.75 and case["recovery_semantic"] >= 0.75
    assert case["targets_met"] == {"weight_ratio": True, "recovery": False, "uniform_hurt": False}


def test_precision_study_needs_a_study():
    from fedanchor.bench.precision_study import precision_summary

    with pytest.raises(ValueError, match="at least one split"):
        precision_summary([])


def test_splits_run_apart_are_summarised_as_one_study(tmp_path, capsys):
    """Each split written by its own `bench --precision --seeds N` run (seed-N/noisy.json) reads back into the same
    study, and `python -m fedanchor.bench.precision_study` summarises the folders as precision_summary does in one run."""
    from fedanchor.bench.noisy import write_noisy
    from fedanchor.bench.precision_study import load_splits, main, precision_summary

    studies = [_study(0, 0.75, 0.6, 0.8, 0.03), _study(1, 0.75, 0.7, 0.8, 0.09)]
    for study in studies:
        write_noisy(study, tmp_path / f"run-{study.config.data.seed}" / f"seed-{study.config.data.seed}")
    loaded = load_splits([tmp_path / "run-1", tmp_path / "run-0"])
    assert [s.config.data.seed for s in loaded] == [0, 1]
    assert [s.figures() for s in loaded] == [s.figures() for s in studies]
    assert main([str(tmp_path / "run-0"), str(tmp_path / "run-1"), "--out", str(tmp_path / "all")]) == 0
    written = json.loads((tmp_path / "all" / "precision.json").read_text())
    expected = precision_summary(studies)
    assert written["cases"][0]["recovery_instance"] == pytest.approx(expected["cases"][0]["recovery_instance"])
    assert written["cases"][0]["recovery_semantic"] is None  # nan written as null
    assert written["seeds"] == [0, 1] and (tmp_path / "all" / "seed-1" / "noisy.json").exists()
    assert "| garbage (s=1) | p1 |" in capsys.readouterr().out


@pytest.mark.parametrize("layout, message", [
    ({}, "no seed-N/noisy.json"),
    ({"a": 0, "b": 0}, "repeat"),
])
def test_summarising_splits_refuses_what_does_not_add_up(tmp_path, layout, message):
    from fedanchor.bench.noisy import write_noisy
    from fedanchor.bench.precision_study import load_splits

    for folder, seed in layout.items():
        write_noisy(_study(seed, 0.75, 0.6, 0.8, 0.03), tmp_path / folder / f"seed-{seed}")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_splits([tmp_path / f for f in layout] or [tmp_path])


def test_whether_the_anchors_were_corrupted_travels_with_each_split_and_splits_must_agree(tmp_path):
    import dataclasses

    from fedanchor.bench.noisy import NoisyStudy, write_noisy
    from fedanchor.bench.precision_study import load_splits, precision_markdown, precision_summary

    pipeline = dataclasses.replace(_study(0, 0.75, 0.6, 0.8, 0.03), anchors_corrupted=True)
    write_noisy(pipeline, tmp_path / "a" / "seed-0")
    read = NoisyStudy.from_dict(json.loads((tmp_path / "a" / "seed-0" / "noisy.json").read_text()))
    assert read.anchors_corrupted is True and "copy of the anchors corrupted too" in read.markdown()
    summary = precision_summary([read])
    assert summary["cases"][0]["anchors_corrupted"] is True
    assert "copy of the public anchors was corrupted too" in precision_markdown(summary)
    assert "anchors was corrupted" not in precision_markdown(precision_summary([_study(1, 0.75, 0.6, 0.8, 0.03)]))
    write_noisy(_study(1, 0.75, 0.6, 0.8, 0.03), tmp_path / "b" / "seed-1")
    with pytest.raises(ValueError, match="whether the anchors were corrupted"):
        load_splits([tmp_path / "a", tmp_path / "b"])


def test_the_readout_blocks_travel_with_each_split_and_splits_must_agree(tmp_path):
    import dataclasses

    from fedanchor.bench.noisy import write_noisy
    from fedanchor.bench.precision_study import load_splits, precision_markdown, precision_summary
    from fedanchor.config import with_overrides

    default = _study(0, 0.75, 0.6, 0.8, 0.03)
    second = _study(1, 0.75, 0.6, 0.8, 0.03)
    model_alone = dataclasses.replace(second, config=with_overrides(second.config, {"alignment.readout_blocks": ("model",)}))
    assert precision_summary([default])["cases"][0]["readout_blocks"] == ["base", "codebook", "model"]
    assert "block alone" not in precision_markdown(precision_summary([default]))
    summary = precision_summary([model_alone])
    assert summary["cases"][0]["readout_blocks"] == ["model"]
    assert "readout over the model block alone" in precision_markdown(summary)
    write_noisy(default, tmp_path / "a" / "seed-0")
    write_noisy(model_alone, tmp_path / "b" / "seed-1")
    with pytest.raises(ValueError, match="readout's blocks"):
        load_splits([tmp_path / "a", tmp_path / "b"])
    assert [s.config.alignment.readout_blocks for s in load_splits([tmp_path / "b"])] == [("model",)]


def test_a_study_run_by_worker_processes_has_the_figures_of_one_process(one_thread):
    """`--workers`: the study's federations run side by side in spawned processes, each seeded as the single process
    seeds it, so every run's weights and recall are those of the study run one federation after another."""
    config = bench_config("motion", quick=True, trunk="tiny", overrides={"data.sites": SITES, "train.local_steps": 4,
                                                                         "alignment.readout_repeats": 1})
    alone = noisy_site_study(config, modes=["garbage"], say=lambda _m: None, clean_only=True)
    messages: list[str] = []
    side_by_side = noisy_site_study(config, modes=["garbage"], say=messages.append, clean_only=True, workers=2)
    ended = [m for m in messages if "] ended: " in m]  # each end is said as it comes, the report follows in order
    assert len(ended) == 5 and ended[-1].startswith("   [5/5] ended: ")
    pairs = [(alone.reference, side_by_side.reference), (alone.clean_only, side_by_side.clean_only),
             (alone.reference_uniform, side_by_side.reference_uniform),
             *((alone.runs["garbage"][w], side_by_side.runs["garbage"][w]) for w in ("precision", "uniform"))]
    for one, other in pairs:
        assert (one.mode, one.weighting) == (other.mode, other.weighting)
        assert one.site_weights == other.site_weights and one.metrics == other.metrics
    with pytest.raises(ValueError, match="workers=0"):
        noisy_site_study(config, modes=["garbage"], say=lambda _m: None, workers=0)


def test_a_cut_off_study_resumes_from_the_federations_it_kept(tmp_path, one_thread):
    """Each federation is saved as it ends; a second start over the same folder reads back the runs whose fingerprint
    matches (bit for bit the same figures) and trains only what is missing or ran under another configuration."""
    from fedanchor.bench.noisy import RECORDS, record_name
    from fedanchor.config import with_overrides

    config = bench_config("motion", quick=True, trunk="tiny", overrides={"data.sites": SITES, "train.local_steps": 4,
                                                                         "alignment.readout_repeats": 1})
    records = tmp_path / RECORDS
    first = noisy_site_study(config, modes=["garbage"], say=lambda _m: None, records=records)
    kept = sorted(p.name for p in records.iterdir())
    assert kept == sorted(record_name(label) for label in (
        "clean reference", "garbage (severity 1) on accel-1, precision weighting",
        "garbage (severity 1) on accel-1, uniform weighting"))

    (records / record_name("garbage (severity 1) on accel-1, uniform weighting")).unlink()  # cut off before it ended
    messages: list[str] = []
    resumed = noisy_site_study(config, modes=["garbage"], say=messages.append, records=records)
    assert sum("ran earlier, read from" in m for m in messages) == 2
    assert any("2 of 3 federations ran earlier" in m for m in messages)
    for one, other in [(first.reference, resumed.reference),
                       *((first.runs["garbage"][w], resumed.runs["garbage"][w]) for w in ("precision", "uniform"))]:
        assert one.site_weights == other.site_weights and one.metrics == other.metrics

    other_config = with_overrides(config, {"train.local_steps": 5})  # another run: nothing saved counts for it
    messages.clear()
    noisy_site_study(other_config, modes=["garbage"], say=messages.append, records=records)
    assert not any("ran earlier" in m for m in messages)


def test_worker_processes_start_the_bad_sites_precision_runs_first():
    """A study cut off by a machine's time limit should have finished the runs it exists for: the bad site's precision
    runs start first, its uniform runs next, the clean references last; each group keeps the study's order."""
    from fedanchor.bench.noisy import _StudyRun

    def run(mode: str | None, weighting: str) -> _StudyRun:
        return _StudyRun(config=None, split=None, mode=mode, severity=1.0, weighting=weighting, noisy_site="accel-1",
                         anchors_corrupted=False, label=f"{mode} {weighting}")

    study = [run(None, "precision"), run(None, "uniform"), run("blur", "precision"), run("blur", "uniform"),
             run("garbage", "precision"), run("garbage", "uniform")]
    started = [job.label for job in sorted(study, key=_StudyRun.start_rank)]
    assert started == ["blur precision", "garbage precision", "blur uniform", "garbage uniform",
                       "None precision", "None uniform"]


@pytest.mark.parametrize("checks, shown", [
    ({}, "- / - / - / -"),
    ({"data_check/factor": 0.0123, "typicality_check/factor": 1.0}, "- / 0.012 / - / 1"),
    ({"typicality_check/factor": 2e-9, "checks/left_out": 1.0}, "- / - / - / 2e-09 (left out)"),
    ({"typicality_check/factor": 2e-9, "checks/vouched": 1.0}, "- / - / - / 2e-09 (vouched for)"),
])
def test_the_study_table_says_what_each_check_read_and_whether_the_site_was_left_out_or_vouched_for(checks, shown):
    from fedanchor.bench.noisy import _factors

    assert _factors(checks) == shown
