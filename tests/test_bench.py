"""`fedanchor bench` writes results.json, results.md and a PNG with every method (shape, not numbers)."""
from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from conftest import assert_png_drawn
from fedanchor.bench.runner import FED_RIVALS, METHODS
from fedanchor.cli import main


def bench_cli(*args: str) -> int:
    """``fedanchor bench`` on one torch thread (what the suite's 2-core machine wants), the caller's threads restored,
    with one pass of the readout's k-fold choice (the automatic reshuffles on 16 anchors cost seconds per fit)."""
    threads = torch.get_num_threads()
    try:
        return main(["bench", "--threads", "1", "--set", "alignment.readout_repeats=1", *args])
    finally:
        torch.set_num_threads(threads)


def test_bench_quick_motion_writes_every_method(tmp_path, capsys):
    started = time.perf_counter()
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--out", str(tmp_path))
    elapsed = time.perf_counter() - started
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for name, method in results["methods"].items():
        metrics = method["metrics"]
        for direction in ("accel->gyro", "gyro->accel"):
            for k in (1, 5, 10):
                for key in (f"recall@{k}", f"semantic_recall@{k}", f"chance_recall@{k}", f"chance_semantic_recall@{k}"):
                    assert f"{direction}/{key}" in metrics, (name, direction, key)
        assert method["seconds"] > 0
        federated = name in FED_RIVALS or name.startswith("fedanchor")
        assert (method["bytes_up"] is not None) == federated, name
        if federated and name != "local only":
            assert len(method["bytes_up"]) == len(method["bytes_down"]) == results["config"]["rounds"]
            assert all(b > 0 for rnd in method["bytes_up"] for b in rnd.values())
            assert all(b >= 0 for rnd in method["bytes_down"] for b in rnd.values())
    assert all(b == 0 for rnd in results["methods"]["local only"]["bytes_up"] for b in rnd.values())
    # the model ceiling measures the model itself: its block alone, never the base features' CCA in its place
    ceiling = results["methods"]["ceiling (all true pairs)"]["metrics"]
    assert ceiling["readout/weight/model"] > 0 and "readout/weight/base" not in ceiling
    # each method's wall seconds are its own part of the bench's, which is its part of the call's
    assert sum(m["seconds"] for m in results["methods"].values()) <= results["seconds"] <= elapsed
    sizes = results["bytes"]
    assert sizes["fedavg_lora_over_fedanchor_up"] > 1 and sizes["full_finetune_over_fedanchor_up"] > 100
    assert set(results["gap_closed"]["methods"]) == set(METHODS)
    md = (tmp_path / "results.md").read_text()
    assert "| method | accel->gyro inst R@1/5/10 |" in md and "| chance |" in md
    assert "## Gap closed" in md and "gap closed (semantic)" in md
    assert "## Bytes per site per round" in md and "FedProto" in md and "CreamFL" in md
    assert_png_drawn(tmp_path / "recall.png", (max(8, 0.8 * len(results["methods"])), 4.8))  # a bar pair per method


def test_bench_several_seeds_report_the_spread(tmp_path):
    methods = ["--method", "ceiling CCA (all true pairs)", "--method", "anchors-only CCA", "--method", "anchors-only ASIF"]
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--seeds", "0", "1", *methods, "--out", str(tmp_path))
    assert code == 0
    assert (tmp_path / "seed-0" / "results.json").exists() and (tmp_path / "seed-1" / "results.md").exists()
    spread = json.loads((tmp_path / "spread.json").read_text())
    assert spread["anchors-only CCA"]["semantic"]["n"] == 2 and spread["anchors-only CCA"]["semantic"]["sd"] >= 0
    assert "± " in (tmp_path / "spread.md").read_text()


def test_bench_noisy_study_needs_two_sites_of_a_modality(tmp_path, capsys):
    code = main(["bench", "--scenario", "motion", "--trunk", "tiny", "--quick", "--threads", "1", "--noisy",
                 "--method", "anchors-only CCA", "--out", str(tmp_path)])
    assert code == 2 and "two sites" in capsys.readouterr().err


def test_bench_speed_times_a_local_step_against_peft_lora(tmp_path):
    started = time.perf_counter()
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--speed", "--out", str(tmp_path))
    elapsed = time.perf_counter() - started
    assert code == 0
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["modalities"]) == {"accel", "gyro"}
    # step_speed times 10 steps per method and modality, one after another, and reports their median: at least 5 of
    # them took that long, so 5 medians of each fit in the call's wall time
    assert 5 * sum(r["fedanchor_s_per_step"] + r["peft_lora_s_per_step"] for r in result["modalities"].values()) <= elapsed
    items = 2 * result["batch"] + result["anchor_batch"]  # two views of a private batch, and an anchor batch
    for r in result["modalities"].values():
        assert r["fedanchor_s_per_step"] > 0 and r["peft_lora_s_per_step"] > 0
        assert r["ratio"] == pytest.approx(r["peft_lora_s_per_step"] / r["fedanchor_s_per_step"])
        assert r["samples_per_s"] == pytest.approx(items / r["fedanchor_s_per_step"])
        assert r["lora_samples_per_s"] == pytest.approx(2 * result["batch"] / r["peft_lora_s_per_step"])
    assert "ratio (LoRA / fedanchor)" in (tmp_path / "speed.md").read_text()


def test_server_peak_folds_updates_as_they_arrive_and_the_table_reads_them(tmp_path):
    from fedanchor.bench.runner import bench_config
    from fedanchor.bench.scale import growth_per_site, scale_markdown, server_peak, write_site_update

    config = bench_config("motion", quick=True, trunk="tiny", overrides={"train.local_steps": 4, "precision.window": 2})
    update_path = write_site_update(config, tmp_path / "update")
    row = server_peak(config, 3, update_path)
    assert row["sites"] == 3 and row["peak_after_mib"] >= row["peak_before_mib"] > 0
    flat = [{"sites": n, "peak_before_mib": 100.0, "peak_after_mib": 100.0 + 0.5 * n, "seconds": 0.1} for n in (2, 4, 8)]
    assert growth_per_site(flat) == pytest.approx(0.5)
    assert "Growth per added site: 0.500 MiB" in scale_markdown(flat, None)
    from fedanchor.bench.scale import _phases

    in_process, simulator = _phases(8.0, [5.0, 6.0, 7.0]), _phases(20.0, [12.0, 13.5, 15.0])
    assert simulator == {"wall_s": 20.0, "startup_s": 10.5, "per_round_s": 1.5, "tail_s": 5.0}
    table = scale_markdown([dict(row, sites=0), row], {"job": "jobs/motion", "rounds": 3, "in_process": in_process,
                                                       "simulator": simulator, "ratio": 2.5, "per_round_ratio": 1.5})
    assert "| 3 |" in table and "2.50 overall, 1.50 per round" in table and "| simulator | 20.0 | 10.5 | 1.50 | 5.0 |" in table
    from fedanchor.bench.scale import bytes_vs_anchors

    rows = bytes_vs_anchors(config, counts=(8, 16))
    by = {(r["modality"], r["anchors"]): r for r in rows}
    for modality in ("accel", "gyro"):
        # the update grows by exactly the float16 Gram's growth: 16*17/2 - 8*9/2 = 100 values, 200 bytes
        assert by[(modality, 16)]["bytes_up"] - by[(modality, 8)]["bytes_up"] == 200


def test_bench_refresh_compares_fixed_and_refreshed_bases_at_equal_bytes(tmp_path, capsys):
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--refresh", "--refresh-every", "2", "--set", "rounds=2",
                     "--out", str(tmp_path))
    assert code == 0
    study = json.loads((tmp_path / "refresh.json").read_text())
    fixed, refreshed = study["rows"][:-1], study["rows"][-1]
    assert [row["rank"] for row in fixed] == [4, 6, 8] and refreshed["refresh_every"] == 2
    assert all(row["refresh_every"] == 0 and row["final_ranks"]["max"] == row["rank"] for row in fixed)
    assert refreshed["final_ranks"]["max"] <= 4
    # a refresh costs bytes: the projected gradients go up once, and fixed bytes grow with the rank
    assert refreshed["bytes_up"] > fixed[0]["bytes_up"] and fixed[0]["bytes_up"] < fixed[-1]["bytes_up"]
    assert study["equal_bytes"]["fixed"] in {row["method"] for row in fixed}
    assert "At equal bytes" in (tmp_path / "refresh.md").read_text()
    assert main(["bench", "--scenario", "motion", "--trunk", "tiny", "--quick", "--refresh", "--set", "rounds=2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "no refresh would complete" in capsys.readouterr().err


def test_several_seeds_write_the_scenario_summary_with_each_split_s_sign(tmp_path):
    methods = ["--method", "ceiling CCA (all true pairs)", "--method", "anchors-only CCA", "--method", "fedanchor"]
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--seeds", "0", "1", *methods, "--out", str(tmp_path))
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["motion"]
    assert summary["splits"] == 2 and summary["best_anchors_only"] == "anchors-only CCA"
    assert summary["ceiling"] == "ceiling CCA (all true pairs)"
    ours, rival = summary["methods"]["fedanchor"], summary["methods"]["anchors-only CCA"]
    for level, key in (("instance", "instance_recall@10"), ("semantic", "semantic_recall")):
        per_split = zip(ours["per_split"][level], rival["per_split"][level])
        assert ours["signs"][level] == [(a > b) - (a < b) for a, b in per_split]
        assert ours[key] == pytest.approx(sum(ours["per_split"][level]) / 2)
    merged = tmp_path / "all.json"
    from fedanchor.bench.summary import main as merge_main
    assert merge_main([str(tmp_path / "summary.json"), "--out", str(merged)]) == 0
    assert json.loads(merged.read_text()) == {"motion": summary}
    table = merged.with_suffix(".md").read_text()
    assert "## motion: 2 splits" in table and "| **fedanchor** |" in table and "gap closed" in table
    with pytest.raises(ValueError, match="repeats scenario"):
        merge_main([str(tmp_path / "summary.json"), str(tmp_path / "summary.json"), "--out", str(merged)])

    # Splits run apart, one folder each, summarise to the same figures as the one run over both.
    from fedanchor.bench.splits import main as splits_main
    apart = tmp_path / "apart"
    assert splits_main([str(tmp_path / "seed-1"), str(tmp_path / "seed-0"), "--out", str(apart)]) == 0
    assert json.loads((apart / "summary.json").read_text()) == json.loads((tmp_path / "summary.json").read_text())
    assert (apart / "seed-0" / "results.md").is_file() and (apart / "spread.md").read_text().count("± ") >= 6
    shutil.copytree(tmp_path / "seed-0", tmp_path / "again")
    with pytest.raises(SystemExit) as refused:
        splits_main([str(tmp_path / "seed-0"), str(tmp_path / "again"), "--out", str(apart)])
    assert refused.value.code == 2
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "seed-1", other)
    results = json.loads((other / "results.json").read_text())
    results["config"]["data"]["n_test"] += 1  # a split run with other settings
    (other / "results.json").write_text(json.dumps(results))
    from fedanchor.bench.splits import load_splits
    with pytest.raises(ValueError, match="data.n_test"):
        load_splits([tmp_path / "seed-0", other])

    # A split's methods run apart (a rival added later) merge into that split: the same summary as one run of all.
    for seed in (0, 1):
        whole = json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())
        for part, names in (("rivals", ["anchors-only CCA", "ceiling CCA (all true pairs)"]), ("ours", ["fedanchor"])):
            folder = tmp_path / "parts" / f"{part}-{seed}"
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps({**whole, "methods": {n: whole["methods"][n] for n in names}}))
    merged_parts = tmp_path / "merged-parts"
    assert splits_main([str(f) for f in sorted((tmp_path / "parts").iterdir())] + ["--out", str(merged_parts)]) == 0
    assert json.loads((merged_parts / "summary.json").read_text()) == json.loads((tmp_path / "summary.json").read_text())
    merged_methods = json.loads((merged_parts / "seed-0" / "results.json").read_text())["methods"]
    assert list(merged_methods) == ["ceiling CCA (all true pairs)", "anchors-only CCA", "fedanchor"]  # the bench's order
    results = json.loads((tmp_path / "parts" / "ours-1" / "results.json").read_text())
    results["config"]["train"]["lr"] *= 2  # the same split with other settings: not merged
    (tmp_path / "parts" / "ours-1" / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="split seed 1 with other settings.*train.lr"):
        load_splits([tmp_path / "parts" / "rivals-1", tmp_path / "parts" / "ours-1"])


@pytest.mark.parametrize("rival,ours,expected", [
    ([0.2, 0.4, 0.6], [0.4, 0.5, 0.6], {"25": pytest.approx(50.0), "50": pytest.approx(70.71, rel=1e-3), "100": pytest.approx(100.0)}),
    ([0.2, 0.4, 0.6], [0.1, 0.2, 0.9], {"25": "<= 25", "50": "<= 25", "100": "> 100"}),
    ([0.3, 0.2, 0.5], [0.3, 0.35, 0.5], {"25": "<= 25", "50": pytest.approx(50 * 2 ** (1 / 4), rel=1e-3), "100": pytest.approx(100.0)}),
], ids=["interpolated", "bounds", "rival-not-monotone"])
def test_effective_anchors_read_the_rival_s_curve(rival, ours, expected):
    from fedanchor.bench.anchors import effective_anchors

    points = [{"anchors": n, "best anchors-only/instance": r, "fedanchor/instance": o}
              for n, r, o in zip((25, 50, 100), rival, ours)]
    assert effective_anchors(points, "instance") == expected


def test_anchor_budget_runs_both_methods_at_every_count(tmp_path):
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--anchors", "8", "16",
                     "--out", str(tmp_path))
    assert code == 0
    study = json.loads((tmp_path / "anchors.json").read_text())
    assert [p["anchors"] for p in study["points"]] == [8, 16]
    for p in study["points"]:  # the curve effective anchors read is the better rival at each count and level
        for level in ("instance", "semantic"):
            assert p[f"best anchors-only/{level}"] == max(p[f"anchors-only CCA/{level}"],
                                                           p[f"anchors-only CCA + anchor codebook/{level}"])
    assert set(study["effective_anchors"]) == {"instance", "semantic"}
    assert "| 16 |" in (tmp_path / "anchors.md").read_text()
    assert main(["bench", "--scenario", "motion", "--trunk", "tiny", "--anchors", "16", "--out", str(tmp_path)]) == 2


def test_the_demo_lines_compare_with_the_anchors_only_cca_and_flag_chance():
    from fedanchor.report import comparison_lines

    ours = {"a->b/recall@10": 0.5, "a->b/chance_recall@10": 0.1, "a->b/semantic_recall@10": 0.3,
            "a->b/chance_semantic_recall@10": 0.4}
    rival = {"a->b/recall@10": 0.4, "a->b/semantic_recall@10": 0.35}
    lines = comparison_lines(ours, rival)
    assert lines[0] == "a->b instance R@10: fedanchor 0.500 vs anchors-only 0.400 (+0.100)"
    assert lines[1] == "a->b semantic R@10: fedanchor 0.300 vs anchors-only 0.350 (-0.050)"
    assert lines[-1].startswith("at or below chance: a->b semantic R@10")


def test_bench_precision_writes_the_cases_in_the_documented_shape(tmp_path, capsys):
    """`--precision`: per corruption the bad site's weight ratio (a garbage site: 0, left out, and precision scores
    what the federation without it scores), what uniform averaging lost against the federation without it, what
    precision weighting recovered, and the clean check (one split: no split sd, so null in the JSON); each split's
    noisy study. The averaging over splits is checked in test_noisy.py."""
    code = bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--precision", "--seeds", "0",
                     "--noisy-mode", "garbage", "--set", "train.local_steps=8", "--out", str(tmp_path))
    assert code == 0
    summary = json.loads((tmp_path / "precision.json").read_text())
    case, = summary["cases"]
    for key in ("scenario", "corruption", "weight_ratio", "recovery_instance", "recovery_semantic",
                "uniform_hurt_instance", "uniform_hurt_semantic", "splits"):
        assert key in case, key
    assert case["scenario"] == "motion" and case["corruption"] == "garbage" and case["splits"] == 1
    assert case["bad_site"] == "site-a1" and case["weight_ratio_per_split"] == [0.0], case  # left out of every round
    assert case["recall_precision"] == case["recall_clean_only"], case  # so the federation is the one without it
    assert set(summary["clean"]) == {"instance", "semantic"} and summary["seeds"] == [0]
    assert summary["clean"]["instance"]["split_sd"] is None and summary["clean"]["instance"]["within_one_sd"] is None
    for seed in (0,):
        noisy = json.loads((tmp_path / f"seed-{seed}" / "noisy.json").read_text())
        assert set(noisy["clean_only"]["site_weights"][-1]) == {"site-a2", "site-a3", "site-g1"}  # without the bad site
        assert noisy["reference_uniform"]["method"] == "uniform"
    assert "| garbage (s=1) | site-a1 |" in (tmp_path / "precision.md").read_text()
    # Each federation was kept as it ended; the same command again reads all five back and writes the same summary.
    assert len(list((tmp_path / "seed-0" / "federations").glob("*.json"))) == 5
    capsys.readouterr()
    assert bench_cli("--scenario", "motion", "--trunk", "tiny", "--quick", "--precision", "--seeds", "0",
                     "--noisy-mode", "garbage", "--set", "train.local_steps=8", "--out", str(tmp_path)) == 0
    assert "5 of 5 federations ran earlier" in capsys.readouterr().out
    again = json.loads((tmp_path / "precision.json").read_text())
    assert again["cases"] == summary["cases"] and again["clean"] == summary["clean"]


def test_the_typicality_study_reads_each_corruptions_verdict_without_training(tmp_path):
    """On motion's precision-study sites: random recordings put the bad site far past the allowed z (factor under
    0.05) while the clean sites keep their say; a site of 2 recordings sends nothing and is not judged. The study
    writes its table and picture."""
    from fedanchor.bench.typicality_study import typicality_study, write_typicality

    study = typicality_study("motion", [0], ["garbage", "small"], say=lambda line: None)
    garbage, small, clean = study["cases"]["garbage"], study["cases"]["small"], study["cases"]["clean"]
    assert garbage["bad_z"][0] > 5 and garbage["bad_factor"][0] < 0.05 and garbage["clean_min_factor"][0] == 1.0
    assert math.isnan(small["bad_z"][0]) and small["bad_factor"][0] == 1.0
    assert clean["clean_max_z"][0] < study["allowed_z"] and clean["clean_min_factor"][0] == 1.0
    paths = write_typicality(study, tmp_path, "the command")
    table = paths["md"].read_text()
    assert "| small | not judged" in table and "| garbage | " in table and "the command" in table
    assert json.loads(paths["json"].read_text())["bad_site"] == "site-a1"
    assert_png_drawn(paths["png"], (7, 3.6))


def test_the_typicality_study_reads_a_corruption_in_the_bad_sites_pipeline(tmp_path):
    """A gain in the bad site's records alone moves its energy; in its pipeline (its copy of the anchors rescaled
    too) energy cannot see it, and the level of its copy of the anchors does: it stays past the allowed z either way,
    and the clean sites keep their say."""
    from fedanchor.bench.typicality_study import typicality_study, write_typicality

    records = typicality_study("motion", [0], ["gain"], say=lambda line: None)
    pipeline = typicality_study("motion", [0], ["gain"], say=lambda line: None, anchors_corrupted=True)
    assert not records["anchors_corrupted"] and pipeline["anchors_corrupted"]
    for study in (records, pipeline):
        gain = study["cases"]["gain"]
        assert gain["bad_z"][0] > 4 and gain["clean_min_factor"][0] == 1.0, gain
    assert "copy of the public anchors passed through it too" in write_typicality(pipeline, tmp_path)["md"].read_text()
