"""A crashed server (or site) resumes from its last checkpoint and reproduces the uninterrupted run bit for bit."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedanchor.federation import FederatedServer, SiteTrainer
from fedanchor.federation.loop import make_split
from fedanchor.flare.persistor import load_state, save_state

ROUNDS = 3


def world(config, split):
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    sites = {s: SiteTrainer(config, s, d, split.anchors[d.spec.name], split.anchor_fingerprint, modalities, split.feature_stats)
             for s, d in split.private.items()}
    return server, sites


def run_rounds(server, sites, state, rounds):
    for _ in range(rounds):
        server.start_round()
        for trainer in sites.values():
            server.accept(trainer.train_round(state))
        state = server.finish_round(min_sites=len(sites))
    return state


def assert_identical(a, b):
    assert a.round == b.round and set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


@pytest.mark.parametrize("adapter", [{}, {"refresh_every": 2, "refresh_tolerance": 0.3, "rank_max": 6}],
                         ids=["fixed basis", "after a basis refresh"])
def test_resumed_server_and_restarted_sites_reproduce_the_uninterrupted_run(tmp_path, adapter):
    """With a refresh, the checkpoint after round 2 holds truncated bases of other ranks than a fresh model's."""
    config = tiny_config(rounds=ROUNDS, adapter=adapter)
    split = make_split(config)
    server, sites = world(config, split)
    uninterrupted = run_rounds(server, sites, server.initial_state(), ROUNDS)

    server, sites = world(config, split)
    state = run_rounds(server, sites, server.initial_state(), ROUNDS - 1)
    save_state(tmp_path / "round-0002.safetensors", state)
    deltas = {name: trainer.local_state() for name, trainer in sites.items()}  # what each site keeps on its disk
    del server, sites  # the crash: nothing in memory survives

    server, sites = world(config, split)
    server.resume(load_state(tmp_path / "round-0002.safetensors"))
    for name, trainer in sites.items():
        trainer.load_local_state(deltas[name])
    resumed = run_rounds(server, sites, server.state, 1)
    assert_identical(resumed, uninterrupted)


def test_a_site_that_loses_its_delta_diverges_so_the_delta_file_matters(tmp_path):
    config = tiny_config(rounds=2)
    split = make_split(config)
    server, sites = world(config, split)
    uninterrupted = run_rounds(server, sites, server.initial_state(), 2)
    server, sites = world(config, split)
    state = run_rounds(server, sites, server.initial_state(), 1)
    _, fresh_sites = world(config, split)  # restarted without their delta files
    again = run_rounds(server, fresh_sites, state, 1)
    assert any(not torch.equal(again.tensors[k], uninterrupted.tensors[k]) for k in again.tensors if k.endswith("/S"))
