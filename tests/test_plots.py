"""The pictures a run writes: recall, CKA and weights over rounds, and the held-out embedding map."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_png_drawn, tiny_config
from fedanchor.federation.loop import run_in_process
from fedanchor.plots import plot_embedding_map
from fedanchor.report import write_run

def test_a_run_writes_its_rounds_and_its_embedding_map(tmp_path):
    result = run_in_process(tiny_config(rounds=1), progress=None)
    assert set(result.embeddings) == {"accel", "gyro"} and len({len(z) for z in result.embeddings.values()}) == 1
    write_run(tmp_path, {"fedanchor": result})
    assert_png_drawn(tmp_path / "fedanchor-rounds.png", (15, 4.2))
    assert_png_drawn(tmp_path / "fedanchor-embeddings.png", (6.5, 6))


def test_embedding_map_refuses_modalities_of_different_widths(tmp_path):
    with pytest.raises(ValueError, match="one width"):
        plot_embedding_map({"a": torch.zeros(5, 3), "b": torch.zeros(5, 4)}, tmp_path / "x.png")


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


def test_a_step_bar_only_when_a_terminal_watches():
    from fedanchor.federation.progress import local_step_bar

    quiet = _Stream(tty=False)
    with local_step_bar("site-1 round 1", 4, quiet) as bar:
        assert bar is None
    assert quiet.text == ""
    tty = _Stream(tty=True)
    with local_step_bar("site-1 round 1", 4, tty) as bar:
        for step in range(1, 5):
            bar(step, 4, 0.5)
    assert "site-1 round 1" in tty.text and "/4" in tty.text  # drawn (tqdm rate-limits redraws), then cleared
