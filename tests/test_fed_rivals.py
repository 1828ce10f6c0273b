"""The federated rivals of bench/fed_rivals.py on the tiny trunk and the motion scenario (shape and bytes, not numbers)."""
from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import pytest
import torch

from fedanchor.bench import fed_rivals as fr
from fedanchor.bench.rivals import score_models
from fedanchor.bench.runner import bench_config
from fedanchor.config import with_overrides
from fedanchor.federation.loop import make_split, run_in_process
from fedanchor.federation.state import projector_params
from fedanchor.model.homogeneous import build_model

RIVALS = {
    "fedavg_lora": fr.fedavg_lora,
    "fedavg_lora+anchor": partial(fr.fedavg_lora, anchor_term=True),
    "fedproto": fr.fedproto,
    "creamfl": fr.creamfl,
}
DIRECTIONS = ("accel->gyro", "gyro->accel")
FLOAT = 4  # bytes of a float32
INT = 8  # bytes of an int64


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only oversubscribe
    config = bench_config("motion", quick=True, trunk="tiny", overrides={"train.local_steps": 4, "train.device": "cpu"})
    try:
        yield config, make_split(config)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def timed_runs(setup):
    """Each rival's run, and the wall seconds of the call that made it."""
    config, split = setup
    runs, walls = {}, {}
    for name, rival in RIVALS.items():
        started = time.perf_counter()
        runs[name] = rival(config, split)
        walls[name] = time.perf_counter() - started
    return runs, walls


@pytest.fixture(scope="module")
def runs(timed_runs):
    return timed_runs[0]


@pytest.fixture(scope="module")
def fedanchor_run(setup):
    config, split = setup
    torch.manual_seed(config.train.seed)
    return run_in_process(config, progress=None, split=split)


def _sizes(setup) -> dict[str, int]:
    """Independent counts (in floats) of what the messages should hold, from build_model's layers."""
    config, split = setup
    modalities = {m: d.spec for m, d in split.anchors.items()}
    model = build_model(config, modalities, split.feature_stats)
    lora = sum(layer.rank * (layer.in_features + layer.out_features) for layer in model.adapters().values())
    out = {"lora": lora, "p": config.trunk.embed_dim, "n_anchors": len(split.anchors["accel"])}
    for m in modalities:
        out[f"projector/{m}"] = sum(p.numel() for p in projector_params(model, m).values())
    return out


@pytest.mark.parametrize("name", list(RIVALS))
def test_rival_scores_like_the_bench_and_records_bytes(name, setup, timed_runs):
    config, split = setup
    run = timed_runs[0][name]
    untrained = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
    assert set(run.metrics) == set(score_models({m: untrained for m in split.test}, split, config))  # the keys of the bench's common scoring
    for direction in DIRECTIONS:
        for k in (1, 5, 10):
            assert f"{direction}/recall@{k}" in run.metrics and f"{direction}/semantic_recall@{k}" in run.metrics
    assert all(math.isfinite(v) for v in run.metrics.values()), run.metrics
    assert len(run.bytes_up) == len(run.bytes_down) == config.rounds
    for r, (up, down) in enumerate(zip(run.bytes_up, run.bytes_down)):
        assert set(up) == set(down) == set(split.private)
        assert all(b > 0 for b in up.values())
        if name == "fedproto" and r == 0:
            assert all(b == 0 for b in down.values())  # the server has no prototypes before the first uploads
        else:
            assert all(b > 0 for b in down.values())
    assert 0 < run.seconds <= timed_runs[1][name]  # its own wall time, within the call's
    assert run.notes["rounds"] == config.rounds


@pytest.mark.parametrize("name, up, down", [
    # up and down in floats (+ int64 entries for FedProto), per site, from independent counts
    ("fedavg_lora", lambda s, m, k: s["lora"] + s[f"projector/{m}"],
     lambda s, m, k, r: s["lora"] + s["projector/accel"] + s["projector/gyro"]),
    ("fedavg_lora+anchor", lambda s, m, k: s["lora"] + s[f"projector/{m}"],
     lambda s, m, k, r: s["lora"] + s["projector/accel"] + s["projector/gyro"] + s["n_anchors"] * s["p"]),
    ("creamfl", lambda s, m, k: s["n_anchors"] * s["p"], lambda s, m, k, r: 2 * s["n_anchors"] * s["p"]),
    ("fedproto", lambda s, m, k: k * s["p"] + 2 * k * INT / FLOAT, lambda s, m, k, r: 0 if r == 0 else 4 * s["p"] + 4 * INT / FLOAT),
])
def test_message_sizes(name, up, down, setup, runs):
    _, split = setup
    sizes = _sizes(setup)
    run = runs[name]
    for r in range(len(run.bytes_up)):
        for site, private in split.private.items():
            held = len(np.unique(private.semantic_labels))
            assert run.bytes_up[r][site] == FLOAT * up(sizes, private.spec.name, held), (name, r, site)
            assert run.bytes_down[r][site] == FLOAT * down(sizes, private.spec.name, held, r), (name, r, site)


def test_fedproto_uploads_at_most_one_prototype_per_class(setup, runs):
    _, split = setup
    p = setup[0].trunk.embed_dim
    n_classes = len(np.unique(np.concatenate([d.semantic_labels for d in split.private.values()])))
    bound = n_classes * p * FLOAT + 2 * n_classes * INT  # prototypes + class ids and counts
    assert all(b <= bound for rnd in runs["fedproto"].bytes_up for b in rnd.values())
    # FedProto alone sends class ids: the one rival flagged as using labels the others never see
    assert {n: r.notes.get("label_privileged", False) for n, r in runs.items()} == {n: n == "fedproto" for n in RIVALS}


def test_creamfl_uploads_one_embedding_per_anchor(setup, runs):
    config, split = setup
    n = len(next(iter(split.anchors.values())))
    assert all(b == n * config.trunk.embed_dim * FLOAT for rnd in runs["creamfl"].bytes_up for b in rnd.values())


def test_fedavg_merge_averages_factors_separately():
    generator = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 5, generator=generator) for _ in range(2)]  # r x d_in
    b = [torch.randn(4, 2, generator=generator) for _ in range(2)]  # d_out x r
    n = [3.0, 1.0]
    merged = fr.fedavg_merge([{"lora/l/A": a[k], "lora/l/B": b[k]} for k in range(2)], n)
    torch.testing.assert_close(merged["lora/l/A"], (3 * a[0] + a[1]) / 4)
    torch.testing.assert_close(merged["lora/l/B"], (3 * b[0] + b[1]) / 4)
    exact = (3 * b[0] @ a[0] + b[1] @ a[1]) / 4
    assert not torch.allclose(merged["lora/l/B"] @ merged["lora/l/A"], exact, atol=1e-3)  # the known inexact merge


def test_fedavg_lora_server_merges_every_site_by_n(setup, monkeypatch):
    _, split = setup
    calls = []
    merge = fr.fedavg_merge

    def spy(updates, weights):
        calls.append(([dict(u) for u in updates], list(weights)))
        return merge(updates, weights)

    monkeypatch.setattr(fr, "fedavg_merge", spy)
    spy_cfg = bench_config("motion", quick=True, trunk="tiny",
                           overrides={"train.local_steps": 2, "rounds": 1, "train.device": "cpu", "precision.method": "uniform"})
    fr.fedavg_lora(spy_cfg, split)
    sizes = _sizes(setup)
    lora_updates, lora_weights = calls[0]
    assert lora_weights == [len(d) for d in split.private.values()]
    assert all(sum(t.numel() for t in u.values()) == sizes["lora"] for u in lora_updates)
    assert {k.rsplit("/", 1)[-1] for k in lora_updates[0]} == {"A", "B"}
    assert len(calls) == 1 + len({d.spec.name for d in split.private.values()})  # factors, then one per modality's projector


def test_full_finetune_dwarfs_fedanchor(setup, fedanchor_run):
    config, split = setup
    full = fr.full_finetune_bytes(config, split)
    fedanchor_up = max(b for r in fedanchor_run.rounds for b in r.bytes_up.values())
    assert full > 100 * fedanchor_up
    state = fedanchor_run.final_state
    assert state.nbytes() == sum(t.numel() * t.element_size() for t in state.tensors.values())
    # the broadcast (bases included) outweighs one site's update and stays far below the whole model
    assert fedanchor_up < state.nbytes() < full / 10


@pytest.mark.parametrize("call, match", [
    (lambda c, s: fr.fedavg_lora(with_overrides(c, {"alignment.lambda_cross": 0.0}), s, anchor_term=True), "lambda_cross"),
    (lambda c, s: fr.full_finetune_bytes(c, s, site="nowhere"), "not in the split"),
    (lambda c, s: fr.fedproto(c, "not a split"), "FederatedSplit"),
    (lambda c, s: fr.fedavg_merge([{"x": torch.ones(1)}], [1.0, 2.0]), "one weight"),
    (lambda c, s: fr.fedavg_merge([{"x": torch.ones(1)}, {"y": torch.ones(1)}], [1.0, 2.0]), "keys that differ"),
])
def test_argument_checks(call, match, setup):
    config, split = setup
    with pytest.raises((ValueError, TypeError), match=match):
        call(config, split)


def test_local_only_sends_nothing_and_scores_each_modality_with_its_own_site(setup):
    config, split = setup
    run = fr.local_only(config, split)
    assert all(b == 0 for rnd in run.bytes_up + run.bytes_down for b in rnd.values())
    assert len(run.bytes_up) == config.rounds and set(run.bytes_up[0]) == set(split.private)
    assert set(run.notes["evaluated_with"]) == set(split.test)
    assert all(math.isfinite(v) for v in run.metrics.values())
