"""The pictures a run writes: recall, CKA and weights over rounds, and the held-out embedding map."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedanchor.federation.loop import run_in_process
from fedanchor.plots import plot_embedding_map
from fedanchor.report import write_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_run_writes_its_rounds_and_its_embedding_map(tmp_path):
    result = run_in_process(tiny_config(rounds=1), progress=None)
    assert set(result.embeddings) == {"accel", "gyro"} and len({len(z) for z in result.embeddings.values()}) == 1
    write_run(tmp_path, {"fedanchor": result})
    assert (tmp_path / "fedanchor-rounds.png").read_bytes()[:8] == PNG
    assert (tmp_path / "fedanchor-embeddings.png").read_bytes()[:8] == PNG


def test_embedding_map_refuses_modalities_of_different_widths(tmp_path):
    with pytest.raises(ValueError, match="one width"):
        plot_embedding_map({"a": torch.zeros(5, 3), "b": torch.zeros(5, 4)}, tmp_path / "x.png")
