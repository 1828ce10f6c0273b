"""The fedanchor command and the pictures it writes."""
from __future__ import annotations

import json

from conftest import assert_png_drawn
from fedanchor.cli import main
from fedanchor.plots import plot_rounds
from fedanchor.report import round_table

TINY = ["--scenario", "motion", "--trunk", "tiny", "--rounds", "1", "--set", "data.n_anchors=16", "--set", "data.n_test=24",
        "--set", "train.local_steps=8", "--set", "train.batch_size=8", "--set", "alignment.anchor_batch=8"]


def test_run_prints_recall_and_writes_results(tmp_path, capsys):
    assert main(["run", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accel->gyro" in out and "semantic" in out and "chance" in out
    results = json.loads((tmp_path / "results.json").read_text())
    rounds = results["fedanchor"]["rounds"]
    assert len(rounds) == 1 and "accel->gyro/recall@10" in rounds[0]["eval"]
    table = round_table(rounds, results["fedanchor"]["initial_eval"])
    assert "cka site-1" in table and len(table.splitlines()) == 4
    png = plot_rounds(rounds, tmp_path / "rounds.png", initial_eval=results["fedanchor"]["initial_eval"])
    assert_png_drawn(png, (15, 4.2))  # three panels: recall, CKA to the consensus, site weights


def test_a_bad_key_is_named_and_exits_2(capsys):
    assert main(["run", *TINY, "--set", "train.lrr=0.1"]) == 2
    assert "unknown key 'lrr'" in capsys.readouterr().err


def test_simulate_refuses_a_folder_that_is_not_a_job(tmp_path, capsys):
    assert main(["simulate", str(tmp_path)]) == 2
    assert "not a FLARE job folder" in capsys.readouterr().err


def test_the_configuration_reference_is_current():
    from pathlib import Path

    from fedanchor.config_reference import config_reference

    page = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert page.read_text() == config_reference(), "docs/CONFIG.md is stale: run `make docs`"
    assert "| `privacy.noise_multiplier` |" in page.read_text() and "|  |" not in page.read_text()


def test_simulate_refuses_a_job_folder_its_recipe_would_not_run_as_it_is(tmp_path, capsys):
    """`fedanchor simulate` runs a folder through its FedAnchorRecipe: what the recipe cannot express is named, not
    dropped (here a component added by hand)."""
    from fedanchor.flare.recipe import FedAnchorRecipe

    job = FedAnchorRecipe.from_demo("motion").export_folder(tmp_path / "job")
    server_file = job / "app/config/config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["components"].append({"id": "mine", "path": "fedanchor.flare.cross_site.CrossSiteTable", "args": {}})
    server_file.write_text(json.dumps(server))
    assert main(["simulate", str(job), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "components/mine (only in the folder)" in err and "FedAnchorRecipe" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_submit_names_a_kit_that_is_not_there(tmp_path, capsys):
    assert main(["submit", "--kit", str(tmp_path / "no-kit"), "--job", "hospitals-motion"]) == 2
    assert "no-kit is not an admin startup kit" in capsys.readouterr().err
