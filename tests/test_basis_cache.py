"""U and V go down only to sites that do not hold them: a site's update names the bases it trained on."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedanchor.federation import FederatedServer, SiteTrainer, make_split, run_in_process
from fedanchor.federation.messages import GlobalState, basis_digest, is_basis
from fedanchor.federation.site import BasisNotHeld


def world(config):
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    sites = {s: SiteTrainer(config, s, d, split.anchors[d.spec.name], split.anchor_fingerprint, modalities, split.feature_stats)
             for s, d in split.private.items()}
    return server, sites


def one_round(server, sites, state):
    server.start_round()
    for name, trainer in sites.items():
        server.accept(trainer.train_round(server.state_for(name, state)))
    return server.finish_round()


def test_a_site_that_trained_on_the_bases_gets_the_next_state_without_them():
    server, sites = world(tiny_config())
    state = server.initial_state()
    first = {name: server.state_for(name, state) for name in sites}
    assert all(s is state for s in first.values())  # nobody holds anything yet
    server.start_round()
    for name, trainer in sites.items():
        update = trainer.train_round(first[name])
        assert update.basis_digest == state.basis_digest() == trainer.basis_digest
        server.accept(update)
    state = server.finish_round()
    site = next(iter(sites))
    light = server.state_for(site, state)
    assert not light.has_basis() and light.basis_digest() == state.basis_digest()
    basis_bytes = sum(v.numel() * 4 for k, v in state.tensors.items() if is_basis(k))
    assert server.bytes_down[site] == state.nbytes() - basis_bytes and basis_bytes > state.nbytes() / 4
    # the round trains exactly as it would have on the whole state
    whole = sites[site].train_round(state)
    twin = world(tiny_config())[1][site]
    twin.train_round(first[site])  # the same history: round 0 on the whole state
    lighter = twin.train_round(light)
    assert all(torch.equal(lighter.params[k], whole.params[k]) for k in whole.params)


def test_the_record_is_dropped_on_sending_so_a_site_that_lost_its_bases_gets_them_next_round():
    server, sites = world(tiny_config())
    state = one_round(server, sites, server.initial_state())
    site, trainer = next(iter(sites.items()))
    light = server.state_for(site, state)
    restarted = world(tiny_config())[1][site]  # a site restarted: its model holds nothing it was sent
    with pytest.raises(BasisNotHeld, match="does not hold"):
        restarted.train_round(light)
    assert server.state_for(site, state) is state  # nothing re-recorded: whole again
    assert set(server.bytes_down) == {site}  # this round's counts only: the others were not sent round 1 yet
    stranger = GlobalState(state.round, state.anchor_fingerprint, light.tensors, {**light.meta, "basis_digest": "0" * 64})
    with pytest.raises(BasisNotHeld, match="round 1 came without its bases"):
        trainer.train_round(stranger)


def test_after_a_basis_refresh_the_bases_go_down_again_and_fixed_bases_stay_home():
    fixed = run_in_process(tiny_config(rounds=3), progress=None, evaluate_each_round=False)
    downs = [sum(r.bytes_down.values()) for r in fixed.rounds]
    assert downs[0] > downs[1] == downs[2]  # round 0 whole, then without U and V
    refreshed = run_in_process(tiny_config(rounds=4, adapter={"refresh_every": 3}), progress=None, evaluate_each_round=False)
    downs = [sum(r.bytes_down.values()) for r in refreshed.rounds]
    # round 1 gathers gradients (bases unchanged before it), round 2 runs on augmented bases, round 3 on truncated ones
    assert downs[1] < downs[0] and downs[2] > downs[1] and downs[3] > downs[1]


def test_the_digest_names_every_basis_and_nothing_else():
    tensors = {"adapter/a/U": torch.ones(4, 2), "adapter/a/V": torch.ones(3, 2), "adapter/a/S": torch.ones(2, 2)}
    digest = basis_digest(tensors)
    assert digest == basis_digest({**tensors, "adapter/a/S": torch.zeros(2, 2)})  # cores do not count
    assert digest != basis_digest({**tensors, "adapter/a/U": torch.ones(4, 2) * 1.0001})
    assert digest != basis_digest({**tensors, "adapter/a/V": torch.ones(2, 3)})  # same bytes, another shape
    assert basis_digest({"adapter/a/S": torch.ones(2, 2)}) is None
    with pytest.raises(ValueError, match="only travel whole"):
        GlobalState(0, "f" * 64, {"adapter/a/S": torch.ones(2, 2)}).without_basis()
