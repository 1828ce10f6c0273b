"""The pure parts of the server memory study (bench/server_memory.py): the slope, the round lines, /proc's VmRSS.

No deployment and no torch work: well under a second.
"""
from __future__ import annotations

import math
import random
import resource
from datetime import datetime
from pathlib import Path

import pytest

from fedanchor.bench.server_memory import (Sample, between_rounds, cleans_after, mean_round_seconds, parse_gc_rounds,
                                           proc_status_kib, recommend, round_lines, rss_by_round, rss_mib, slope,
                                           summarize, workflow_lines)

linux_proc = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux /proc")


def _noisy(n: int, per_round: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [300.0 + per_round * r + rng.uniform(-3.0, 3.0) for r in range(n)]


@pytest.mark.parametrize("ys, expected, tolerance", [
    ([412.0] * 20, 0.0, 1e-12),                               # flat
    ([300.0 + 1.5 * r for r in range(20)], 1.5, 1e-9),       # rising 1.5 MiB a round
    ([500.0 - 0.25 * r for r in range(20)], -0.25, 1e-9),    # falling
    (_noisy(50, 0.0, seed=1), 0.0, 0.08),                     # flat under +-3 MiB noise
    (_noisy(50, 0.8, seed=2), 0.8, 0.08),                     # a leak under the same noise
])
def test_slope_is_the_least_squares_fit(ys, expected, tolerance):
    assert slope(list(range(len(ys))), ys) == pytest.approx(expected, abs=tolerance)


def test_slope_against_a_hand_computed_case():
    # x = 1, 2, 3; y = 1, 2, 4: mean x 2, mean y 7/3; sxy = (-1)(-4/3) + 0 + (1)(5/3) = 3; sxx = 2 -> 1.5
    assert slope([1, 2, 3], [1, 2, 4]) == pytest.approx(1.5)


@pytest.mark.parametrize("xs, ys", [([5, 5, 5], [1, 2, 3]), ([1], [1]), ([1, 2], [1])])
def test_slope_refuses_what_has_no_slope(xs, ys):
    with pytest.raises(ValueError):
        slope(xs, ys)


LOG = """\
2026-12-02 06:48:20,425 - FedAnchorAggregator - INFO - [identity=server, run=abc, wf=scatter_and_gather]: accepted hospital-a (accel) for round 0: 12 KiB
2026-12-02 06:48:21,500 - FedAnchorAggregator - INFO - [identity=server, run=abc, wf=scatter_and_gather]: fedanchor round 1: 2.1s | loss hospital-a:0.9 | weight hospital-a:0.33 | accel->gyro R@1/5/10 0.1/0.2/0.3
2026-12-02 06:48:23,750 - FedAnchorAggregator - INFO - [identity=server, run=abc]: fedanchor round 2: 2.0s | loss -
2026-12-02 06:48:25,000 - ScatterAndGather - INFO - [identity=server, run=abc]: Round 2 started.
fedanchor round 12: 1.9s | a line without FLARE's timestamp (the simulator's console)
2026-12-02 06:48:26,000 - FedAnchorExecutor - INFO - fedanchor site hospital-a round 3: loss 0.8
"""


def test_round_lines_give_each_merged_round_and_its_time():
    found = round_lines(LOG)
    assert [r for r, _ in found] == [1, 2, 12]  # not "Round 2 started", not a site's "fedanchor site ... round 3"
    first = datetime(2026, 12, 2, 6, 48, 21).timestamp() + 0.5
    assert found[0][1] == pytest.approx(first)
    assert found[1][1] - found[0][1] == pytest.approx(2.25)
    assert found[2][1] is None


def test_mean_round_seconds_is_the_steady_state_period():
    assert mean_round_seconds({1: 100.0, 2: 102.0, 3: 104.5, 11: 120.0}) == pytest.approx(2.0)
    assert math.isnan(mean_round_seconds({1: 100.0}))


def test_rss_by_round_takes_each_rounds_median_and_skips_before_the_first():
    samples = [Sample(0, 0, 50.0), Sample(1, 1, 300.0), Sample(2, 1, 340.0), Sample(3, 1, 301.0), Sample(4, 3, 305.0)]
    assert rss_by_round(samples) == {1: 301.0, 3: 305.0}


def test_summarize_and_recommend_tell_a_leak_from_a_flat_server():
    def run(gc: int, per_round: float) -> dict:
        samples = [Sample(2.0 * r + k, r, 400.0 + per_round * r + k) for r in range(1, 31) for k in (0, 1)]
        return summarize(gc, samples, {r: 100.0 + 2.5 * r for r in range(1, 31)}, rounds=30, hwm_mib=450.0)

    leaking, flat = run(0, 1.0), run(10, 0.0)
    assert leaking["slope_mib_per_round"] == pytest.approx(1.0)
    assert flat["slope_mib_per_round"] == pytest.approx(0.0)
    assert leaking["rss_after_round_5_mib"] == pytest.approx(405.5)
    assert leaking["rss_after_last_round_mib"] == pytest.approx(430.5)
    assert leaking["mean_round_s"] == pytest.approx(2.5)
    assert recommend([leaking, flat])["memory_gc_rounds"] == 10
    assert recommend([run(0, 0.1), flat])["memory_gc_rounds"] == 0
    assert recommend([leaking])["memory_gc_rounds"] is None


def test_parse_gc_rounds():
    assert parse_gc_rounds("0,1,10") == [0, 1, 10]
    for bad in ("", "1,x", "-1", "1,1"):
        with pytest.raises(ValueError, match="--gc-rounds"):
            parse_gc_rounds(bad)


@linux_proc
def test_vmrss_of_this_process_is_its_resident_memory():
    ballast = bytearray(64 * 1024 * 1024)  # touched, so resident: 64 MiB more than before
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    now = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    assert 64 < now <= peak + 1  # a Python process holding 64 MiB; never above its own peak
    assert proc_status_kib("self", "VmHWM") / 1024.0 == pytest.approx(peak, rel=0.05)
    del ballast
    with pytest.raises(KeyError):
        proc_status_kib("self", "NoSuchField")


def test_between_rounds_times_the_workflows_gap_and_knows_when_it_cleaned():
    text = "\n".join(f"2026-12-02 06:50:{sec:02d},{ms:03d} - ScatterAndGather - INFO - [identity=server]: Round {k} {kind}."
                     for k, kind, sec, ms in [(0, "started", 0, 0), (0, "finished", 5, 0), (1, "started", 5, 400),
                                              (1, "finished", 10, 0), (2, "started", 10, 50), (2, "finished", 15, 0)])
    marks = workflow_lines(text + "\nRound 7 started. (no timestamp: left out)")
    assert len(marks) == 6
    gaps = between_rounds(marks)
    assert list(gaps) == [0, 1] and gaps[0] == pytest.approx(0.4) and gaps[1] == pytest.approx(0.05)
    # ScatterAndGather cleans after incrementing its round, when (round + 1) % period == 0
    assert [k for k in range(12) if cleans_after(k, 4)] == [2, 6, 10]
    assert all(cleans_after(k, 1) for k in range(5)) and not any(cleans_after(k, 0) for k in range(5))
    figures = summarize(1, [Sample(1, 1, 300.0)], {1: 0.0, 2: 5.0}, rounds=2, gaps=gaps)
    assert figures["cleanups"] == 2 and figures["between_rounds_with_cleanup_s"] == pytest.approx(0.225)
