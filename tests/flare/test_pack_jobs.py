"""A consortium's own federation in FLARE: a pack of modalities fedanchor does not bundle, `job new`, the simulator;
and a site that holds another version of the pack refuses the job before training."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedanchor.cli import main as fedanchor_main
from fedanchor.data.pack import load_pack
from fedanchor.flare import jobs
from fedanchor.flare.shareable import FedAnchorShareableGenerator
from test_simulator import fake_ctx

ROOT = Path(__file__).resolve().parents[2]
SITES = {"hospital-a": "ecg", "hospital-b": "labs", "hospital-c": "ecg"}
TINY = ["--trunk", "tiny", "--set", "train.local_steps=8", "--set", "train.batch_size=8",
        "--set", "alignment.readout_repeats=1", "--set", "precision.site_scalar_samples=2"]


@pytest.fixture
def example(tmp_path) -> Path:
    """The worked example of docs/PACKS.md: docs/examples/make_pack.py's pack and site folders, and its job."""
    subprocess.run([sys.executable, str(ROOT / "docs/examples/make_pack.py"), str(tmp_path)], check=True, capture_output=True)
    assert fedanchor_main(["pack", "check", str(tmp_path / "pack")]) == 0
    assert fedanchor_main(["job", "new", "--pack", str(tmp_path / "pack"), *[f"--site={s}={m}" for s, m in SITES.items()],
                           "--out", str(tmp_path / "job"), "--rounds", "2", *TINY]) == 0
    return tmp_path


def test_a_site_holding_another_version_of_the_pack_refuses_the_job(example, caplog):
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.signal import Signal

    from fedanchor.flare.executor import FedAnchorExecutor
    from fedanchor.flare.persistor import FedAnchorPersistor
    from fedanchor.flare.server_state import FedAnchorServerComponent

    config = jobs.read_job_config(example / "job")
    server_ctx = fake_ctx(example / "server", "server", {"fedanchor_server": FedAnchorServerComponent(config=config)})
    task = FedAnchorShareableGenerator().learnable_to_shareable(FedAnchorPersistor().load_model(server_ctx), server_ctx)
    # hospital-a's copy of the pack differs in one validation value
    other = example / "hospital-a-pack"
    shutil.copytree(example / "pack", other)
    x = np.load(other / "validation/labs.npy")
    x[0, 0] += 0.5
    np.save(other / "validation/labs.npy", x)
    site_ctx = fake_ctx(example / "hospital-a", "hospital-a")
    (example / "hospital-a/local/fedanchor_site.json").write_text(json.dumps(
        {"pack": str(other), "data": {"source": "folder", "path": str(example / "sites/{site}")}}))
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    with caplog.at_level("ERROR"):
        reply = executor.execute("train", task, site_ctx, Signal())
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    theirs, ours = load_pack(other).fingerprint, config["data"]["pack_fingerprint"]
    assert f"fingerprint {theirs[:16]}, the job expects {ours[:16]}" in caplog.text
    assert not list((example / "hospital-a").rglob("delta_site-*.safetensors"))  # nothing was trained


def test_a_pack_job_without_a_site_data_folder_is_refused_with_the_fix(example, caplog):
    from nvflare.apis.event_type import EventType

    from fedanchor.flare.executor import FedAnchorExecutor

    site_ctx = fake_ctx(example / "hospital-b", "hospital-b")
    executor = FedAnchorExecutor(config=jobs.read_job_config(example / "job"))
    with caplog.at_level("ERROR"):
        executor.handle_event(EventType.START_RUN, site_ctx)
    assert "holds no private data" in caplog.text and '"source": "folder"' in caplog.text


@pytest.mark.slow
def test_the_worked_example_runs_in_the_flare_simulator_on_the_packs_validation_pairs(example):
    from fedanchor.simulate import simulate

    lines: list[str] = []
    summary = simulate(example / "job", example / "run", site_data=example / "sites", echo=lines.append, timeout=900)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for record in summary["rounds"]:
        assert record["accepted"] == sorted(SITES), record  # every site contributed every round
    assert summary["evaluated_on"] == "the pack's 60 public validation pairs"
    final = summary["final_eval"]
    assert {"ecg->labs/recall@10", "labs->ecg/recall@10"} <= set(final)
    # far above chance (10 of 60): the pack's pairs are informative and the federation kept them so
    assert min(final["ecg->labs/recall@10"], final["labs->ecg/recall@10"]) > 0.5, final
    assert summary["config"]["data"]["pack_fingerprint"] == load_pack(example / "pack").fingerprint


def test_a_sites_pack_path_does_not_turn_a_bundled_job_into_a_pack_job(example):
    """`pack` in fedanchor_site.json says where this machine keeps a pack job's pack; on a job of a bundled scenario
    the site trains on the bundled anchors as before."""
    from nvflare.apis.event_type import EventType

    from fedanchor.flare.executor import FedAnchorExecutor

    config = jobs.read_job_config(ROOT / "jobs" / "motion")
    site_ctx = fake_ctx(example / "site-1", "site-1")
    (example / "site-1/local/fedanchor_site.json").write_text(json.dumps({"pack": str(example / "pack")}))
    executor = FedAnchorExecutor(config=config)
    executor.handle_event(EventType.START_RUN, site_ctx)
    trainer = executor._site()
    assert trainer.modality == "accel" and trainer.anchor_fingerprint != load_pack(example / "pack").fingerprint

