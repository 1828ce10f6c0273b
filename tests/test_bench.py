"""`fedanchor bench` writes results.json, results.md and a PNG with every method (shape, not numbers)."""
from __future__ import annotations

import json

import torch

from fedanchor.bench.runner import METHODS
from fedanchor.cli import main


def test_bench_quick_motion_writes_every_method(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "--scenario", "motion", "--trunk", "tiny", "--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == set(METHODS)
    for name, method in results["methods"].items():
        metrics = method["metrics"]
        for direction in ("accel->gyro", "gyro->accel"):
            for k in (1, 5, 10):
                for key in (f"recall@{k}", f"semantic_recall@{k}", f"chance_recall@{k}", f"chance_semantic_recall@{k}"):
                    assert f"{direction}/{key}" in metrics, (name, direction, key)
        assert method["seconds"] >= 0
        federated = name == "local only" or name.startswith("fedanchor")
        assert (method["bytes_up"] is not None) == federated, name
        if federated:
            assert len(method["bytes_up"]) == results["config"]["rounds"]
            assert all(b > 0 for rnd in method["bytes_up"] for b in rnd.values())
    assert set(results["gap_closed"]["methods"]) == set(METHODS)
    md = (tmp_path / "results.md").read_text()
    assert "| method | accel->gyro inst R@1/5/10 |" in md and "| chance |" in md
    assert "## Gap closed" in md and "gap closed (semantic)" in md
    assert "## Not yet run" in md and "FedProto" in md and "CreamFL" in md
    png = tmp_path / "recall_at_10.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
