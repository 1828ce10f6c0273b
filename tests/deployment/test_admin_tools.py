"""The admin side and the process handling, without a federation: progress lines, results, the command, markers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedanchor.deploy import admin_api, processes

ROOT = Path(__file__).resolve().parents[2]
ADMIN = ROOT / "admin" / "fedanchor_admin.py"

# What show_stats(job_id, "server") answered for a running ScatterAndGather job (FLARE 2.9, seen on the loopback trial).
STATS = {"server": {"ScatterAndGather": {"phase": "train", "current_round": 1, "num_rounds": 3, "tasks": {"train": []}},
                    "ServerRunner": {"job_id": "j1", "status": "started", "workflow": "scatter_and_gather"}}}
STARTING = {"server": {"ScatterAndGather": {"phase": "_init_", "current_round": None, "num_rounds": 3, "tasks": {}}}}


class FakeSession:
    """Job metas in order, and show_stats answers (an exception for 'not running yet')."""

    def __init__(self, statuses, stats):
        self.statuses, self.stats = list(statuses), list(stats)

    def get_job_meta(self, job_id):
        return {"name": "fedanchor-x", "status": self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]}

    def show_stats(self, job_id, target):
        answer = self.stats.pop(0) if self.stats else STATS
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_watch_prints_a_line_per_status_and_round_change(monkeypatch):
    monkeypatch.setattr(admin_api, "STATS_DELAY", 0.0)
    done = {"server": dict(STATS["server"], ScatterAndGather={"phase": "train", "current_round": 3, "num_rounds": 3})}
    session = FakeSession(["SUBMITTED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "FINISHED:COMPLETED"],
                          [RuntimeError("job process still starting"), STARTING, STATS, STATS, done])
    lines: list[str] = []
    meta = admin_api.watch(session, "j1", echo=lines.append, poll=0.0)
    assert meta["status"] == admin_api.COMPLETED
    texts = [line.split("] ", 1)[1] for line in lines]
    assert texts == ["fedanchor-x SUBMITTED", "fedanchor-x RUNNING", "fedanchor-x RUNNING: round 2 of 3",
                     "fedanchor-x RUNNING: all 3 rounds aggregated", "fedanchor-x FINISHED:COMPLETED"]


def test_watch_gives_up_after_its_timeout():
    with pytest.raises(TimeoutError, match="abort_job j1"):
        admin_api.watch(FakeSession(["RUNNING"], []), "j1", echo=lambda line: None, timeout=0.01, poll=0.02)


def fake_result(folder: Path) -> Path:
    run = folder / "workspace"
    (run / "checkpoints").mkdir(parents=True)
    rounds = [{"round": 0, "site_metrics": {"hospital-a": {"loss/loss": 2.0, "cka_to_consensus": 0.5}},
               "eval": {"accel->gyro/recall@1": 0.25, "accel->gyro/recall@5": 0.5, "accel->gyro/recall@10": 0.75}}]
    (run / admin_api.SUMMARY_FILE).write_text(json.dumps({"rounds": rounds, "best_round": 0, "initial_eval": {}}))
    return folder


def test_read_result_finds_the_summary_and_checkpoints(tmp_path):
    result = admin_api.read_result(fake_result(tmp_path / "job"))
    assert result.checkpoints == tmp_path / "job/workspace/checkpoints"
    assert result.summary["best_round"] == 0
    with pytest.raises(FileNotFoundError, match="finished no round"):
        admin_api.read_result(tmp_path / "empty")


def test_the_admin_command_prints_metrics_and_asks_for_a_kit(tmp_path):
    shown = subprocess.run([sys.executable, str(ADMIN), "metrics", str(fake_result(tmp_path / "job"))],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "accel->gyro" in shown.stdout and "best round 1" in shown.stdout
    missing = subprocess.run([sys.executable, str(ADMIN), "submit", "jobs/motion"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "--kit" in missing.stderr
    with pytest.raises(FileNotFoundError, match="not an admin startup kit"):
        admin_api.kit_user(tmp_path)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="marked processes are found in Linux /proc")
def test_stop_signals_exactly_the_marked_processes(tmp_path):
    marker = "test-" + os.urandom(4).hex()
    env = processes.flare_env(tmp_path / "home", marker, threads=1)
    kit = tmp_path / "kit"
    (kit / "startup").mkdir(parents=True)
    # a stand-in for a participant: its script starts a child in a new session, as FLARE does with job processes
    (kit / "startup/sub_start.sh").write_text("setsid sleep 300 &\nexec sleep 300\n")
    participant = processes.start("site", kit, env)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not marked: must survive
    try:
        deadline = 50
        while len(processes.marked_processes(marker)) < 2 and deadline:
            deadline -= 1
            processes.time.sleep(0.1)
        marked = processes.marked_processes(marker)
        assert participant.process.pid in marked and len(marked) == 2 and bystander.pid not in marked
        processes.stop([participant], marker, grace=5)
        assert processes.marked_processes(marker) == [] and not participant.running
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
