"""One round end to end in process: site updates, the server's checks, the merge and the broadcast."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch

from conftest import merge_coefficients, tiny_config, weighted_cores
from fedanchor.alignment.gram import from_upper_triangle
from fedanchor.config import config_from_dict, with_overrides
from fedanchor.federation import (ContributionRejected, FederatedServer, GlobalState, RoundFailed, SiteTrainer, SiteUpdate,
                                  make_split, run_in_process)
from fedanchor.federation.messages import CONSENSUS_KEY, adapter_key, is_core_or_magnitude
from fedanchor.federation.server import SILENCED_BELOW, VOUCHED
from fedanchor.federation.state import core_params, projector_params, shared_tensors
from fedanchor.model.homogeneous import build_model


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    sites = {s: SiteTrainer(config, s, d, split.anchors[d.spec.name], split.anchor_fingerprint, modalities, split.feature_stats)
             for s, d in split.private.items()}
    state = server.initial_state()
    updates = {s: t.train_round(state) for s, t in sites.items()}
    return config, split, server, sites, state, updates


def test_updates_carry_only_what_design_section_5_lists(setup):
    _, split, server, _, _, updates = setup
    for site, update in updates.items():
        arrays, meta = update.to_arrays()
        own = split.site_modality[site]
        for key in arrays:
            assert key in ("gram_upper", "codebook/centroids", "codebook/counts") or key.startswith(
                ("param/adapter/", "log_precision/adapter/", f"param/projector/{own}/")), key
            assert "delta" not in key, "delta_site must never leave the site"
        n = len(next(iter(split.anchors.values())))
        assert arrays["gram_upper"].shape == (n * (n + 1) // 2,)
        assert set(meta) == {"site", "modality", "round", "anchor_fingerprint", "n_samples", "uncertainty", "metrics",
                             "basis_digest"}  # the digest of the public global bases it trained on


def test_messages_round_trip_exactly(setup):
    *_, state, updates = setup
    for update in updates.values():
        again = SiteUpdate.from_arrays(*update.to_arrays())
        assert again.site == update.site and again.uncertainty == update.uncertainty
        for key in update.params:
            assert torch.equal(again.params[key], update.params[key])
        # The statistics are rounded to their float16 wire form when the update is made, so the wire loses nothing more.
        for key in update.precision:
            assert torch.equal(again.precision[key], update.precision[key])
        assert torch.equal(again.gram_upper, update.gram_upper)
        arrays, _ = update.to_arrays()
        assert all(v.dtype == np.float16 for k, v in arrays.items() if not k.startswith(("param/", "codebook/")))
        assert torch.equal(again.codebook_centroids, update.codebook_centroids) and update.codebook_counts.numel()
        assert torch.equal(again.codebook_counts, update.codebook_counts)
        assert all(v.dtype == np.float32 for k, v in arrays.items() if k.startswith("param/"))
    state_again = GlobalState.from_arrays(*state.to_arrays())
    assert state_again.round == state.round and set(state_again.tensors) == set(state.tensors)


def test_round_merges_and_changes_the_global_state(setup):
    _, _, server, _, state, updates = setup
    server.state = state
    server.start_round()
    for update in updates.values():
        server.accept(update)
    new = server.finish_round(min_sites=len(updates))
    assert new.round == state.round + 1
    changed = [k for k in state.tensors if is_core_or_magnitude(k) and not torch.equal(new.tensors[k], state.tensors[k])]
    assert changed, "the merge left every core unchanged"
    assert not torch.equal(new.tensors[CONSENSUS_KEY], state.tensors[CONSENSUS_KEY])
    assert sum(server.report.site_weights.values()) == pytest.approx(1.0)
    metrics = server.evaluate(new)
    assert any(k.endswith("/recall@1") for k in metrics)


def test_round_zero_centroids_become_every_modalitys_codebook_and_are_sent_once(setup):
    config, split, server, sites, state, updates = setup
    assert not state.codebooks() and set(state.codebook_projections()) == set(split.anchors)
    assert state.readout_blocks(config.alignment.readout_blocks) == ("base", "model")
    server.state = state
    server.start_round()
    for update in updates.values():
        assert update.codebook_counts.numel() and (update.codebook_counts >= config.alignment.codebook_min_cluster).all()
        server.accept(update)
    new = server.finish_round(min_sites=len(updates))
    books = new.codebooks()
    assert set(books) == set(split.anchors)
    for m, book in books.items():
        sent = sum(u.codebook_counts.numel() for u in updates.values() if u.modality == m)
        assert len(book.centres) == min(sent, config.alignment.codebook_size)
    assert new.readout_blocks(config.alignment.readout_blocks) == ("base", "codebook", "model")
    assert "readout/weight/codebook" in server.evaluate(new)
    site = next(iter(sites.values()))
    assert site.codebook_centroids(new)[1].numel() == 0  # built: nothing more leaves


def without_codebook(update: SiteUpdate) -> SiteUpdate:
    """The update as a site sends it once the codebook is built: the merge tests need no codebook build."""
    return dataclasses.replace(update, codebook_centroids=torch.zeros(0, 0), codebook_counts=torch.zeros(0))


def variant(update: SiteUpdate, state: GlobalState, site: str, *, move: float = 1.0, precision=None,
            n_samples: int | None = None, uncertainty: float | None = None, seed: int = 0) -> SiteUpdate:
    """Another site of the same modality: the real update's change of the cores scaled by ``move`` plus a little
    noise, and its own precisions, sample count and uncertainty."""
    g = torch.Generator().manual_seed(seed)
    params = {k: state.tensors[k] + move * (v - state.tensors[k]) + 1e-3 * torch.randn(v.shape, generator=g)
              if is_core_or_magnitude(k) else v for k, v in update.params.items()}
    return dataclasses.replace(without_codebook(update), site=site, params=params,
                               precision={k: precision(v) for k, v in update.precision.items()} if precision else dict(update.precision),
                               n_samples=n_samples or update.n_samples,
                               uncertainty=update.uncertainty if uncertainty is None else uncertainty)


def sharing(config, update: SiteUpdate, state: GlobalState, site: str, nats: float, **changes) -> SiteUpdate:
    """A ``variant`` of ``update`` whose reported private loss says its two views share ``nats`` (the information
    check's reading: log(2B - 1) - loss)."""
    chance = math.log(2 * min(config.train.batch_size, update.n_samples) - 1)
    sent = variant(update, state, site, **changes)
    return dataclasses.replace(sent, metrics={**sent.metrics, "loss/private": chance - nats})


def every_other(factor: float):
    """Multiply every other coefficient's precision by ``factor``: another pattern, not just another scale."""
    return lambda p: p * torch.where(torch.arange(p.numel()).reshape(p.shape) % 2 == 0, factor, 1.0).double()


MERGES = [  # which sites send what, built from the real accel (a) and gyro (g) updates and the state (s)
    ("one site per modality", lambda a, g, s: [a, g]),
    ("two accel sites of other precisions", lambda a, g, s: [a, variant(a, s, "accel-b", move=1.8, precision=every_other(math.e ** 2)), g]),
    ("uneven samples and uncertainty", lambda a, g, s: [a, variant(a, s, "accel-b", move=0.5, n_samples=9 * a.n_samples, uncertainty=0.25 * a.uncertainty),
                                                        variant(g, s, "gyro-b", move=1.5, n_samples=4 * g.n_samples, precision=every_other(0.1), seed=1), g]),
]


def run_round(server: FederatedServer, state: GlobalState, updates: list[SiteUpdate]) -> GlobalState:
    server.state = state
    server.start_round()
    for update in updates:
        server.accept(update)
    return server.finish_round(min_sites=len(updates))


@pytest.mark.parametrize("name,sites", MERGES, ids=[m[0] for m in MERGES])
def test_the_merged_weight_change_is_the_precision_weighted_mean_of_the_sites(setup, name, sites):
    """The server's merge is exact in the shared basis: U S V^T of the merged core (in the new state and in the model
    the server serves) equals sum_k U (C_k * S_k) V^T, C_k the coefficients the design gives each site."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    sent = sites(accel, gyro, state)
    new = run_round(server, state, sent)
    coefficients = merge_coefficients(sent, config.precision.sample_exponent)
    expected = weighted_cores(sent, coefficients)
    layers = server.model.adapters()
    for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
        torch.testing.assert_close(new.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
    for layer_name, layer in layers.items():
        u, v = (state.tensors[adapter_key(layer_name, part)].double() for part in ("U", "V"))
        assert torch.equal(new.tensors[adapter_key(layer_name, "U")], state.tensors[adapter_key(layer_name, "U")])  # fixed basis
        s_key = adapter_key(layer_name, "S")
        sites_mean = sum(u @ (coefficients[x.site][s_key] * x.params[s_key].double()) @ v.T for x in sent)
        merged = u @ new.tensors[s_key].double() @ v.T
        served = (layer.U.double() @ layer.S.detach().double() @ layer.V.double().T)
        torch.testing.assert_close(merged, sites_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(served, sites_mean, rtol=1e-5, atol=1e-6)
        if name != "one site per modality":  # the weights matter: the plain mean of the sites' changes is another matrix
            plain = sum(u @ x.params[s_key].double() @ v.T for x in sent) / len(sent)
            assert not torch.allclose(plain, sites_mean, rtol=1e-3, atol=1e-5)
    # each site's reported weight is its fraction of each tensor's total weight, averaged over the tensors; the
    # precisions are normalised by their mean per tensor, so that is the modality's share times the site's scalar
    # weight pi_k n_k**gamma over its modality's
    scalar = {u.site: u.uncertainty * float(u.n_samples) ** config.precision.sample_exponent for u in sent}
    mass = {u.site: float(u.n_samples) ** config.precision.sample_exponent for u in sent}
    for u in sent:
        peers = [v for v in sent if v.modality == u.modality]
        modality_share = sum(mass[v.site] for v in peers) / sum(mass.values())
        expected_weight = modality_share * scalar[u.site] / sum(scalar[v.site] for v in peers)
        assert server.report.site_weights[u.site] == pytest.approx(expected_weight, rel=1e-9)


@pytest.mark.parametrize("uncertainty_factor,n_factor", [(1.0, 1), (3.0, 1), (1.0, 4), (0.5, 9)])
def test_two_sites_of_one_modality_merge_to_their_precision_weighted_mean(setup, uncertainty_factor, n_factor):
    """Site a: uniform precision. Site b: precision e on every other coefficient, 1 on the rest (unit mean: 2e/(e+1)
    and 2/(e+1)), times f = uncertainty ratio x sample-count ratio ** 0.5. So, per coefficient,
    merged = (S_a + f w S_b) / (1 + f w), written out by hand."""
    config, _, server, _, state, updates = setup
    assert config.precision.sample_exponent == 0.5
    real = without_codebook(next(u for u in updates.values() if u.modality == "accel"))
    a = dataclasses.replace(real, precision={k: torch.ones_like(v) for k, v in real.precision.items()})
    b = variant(real, state, "accel-b", move=-0.7, precision=lambda p: torch.where(
        torch.arange(p.numel()).reshape(p.shape) % 2 == 0, math.e, 1.0).double(),
        uncertainty=uncertainty_factor * real.uncertainty, n_samples=n_factor * real.n_samples)
    new = run_round(server, state, [a, b])
    f = uncertainty_factor * n_factor ** 0.5
    e = math.e
    for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
        shape = state.tensors[key].shape
        even = (torch.arange(math.prod(shape)) % 2 == 0).reshape(shape)
        w = f * torch.where(even, 2 * e / (e + 1), 2 / (e + 1)).double()
        expected = (a.params[key].double() + w * b.params[key].double()) / (1 + w)
        torch.testing.assert_close(new.tensors[key].double(), expected, rtol=1e-5, atol=1e-6)
        plain = (a.params[key].double() + f * b.params[key].double()) / (1 + f)  # the same sites, precision ignored
        assert not torch.allclose(new.tensors[key].double(), plain, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize("ema", [0.0, 0.5, 0.9])
def test_the_consensus_blends_this_round_s_grams_with_the_last_by_the_ema(setup, ema):
    """K_bar = normalise(ema * K_prev + (1 - ema) * normalise(sum_m normalise(sum_{k in m} pi_k n_k**gamma K_k))),
    every kernel centred and unit-norm; it travels as float16."""
    config, split, _, _, state, updates = setup
    config = with_overrides(config, {"alignment.consensus_ema": ema})
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    server.resume(state)
    sent = [without_codebook(u) for u in updates.values()]
    new = run_round(server, state, sent)

    def centred_unit(k):
        k = k - k.mean(0, keepdim=True)
        k = k - k.mean(1, keepdim=True)
        return k / k.norm()
    per_modality: dict[str, torch.Tensor] = {}
    for u in sent:
        weight = u.uncertainty * u.n_samples ** config.precision.sample_exponent
        per_modality[u.modality] = per_modality.get(u.modality, 0) + weight * centred_unit(from_upper_triangle(u.gram_upper.double()))
    current = sum(config.alignment.modality_weights.get(m, 1.0) * k / k.norm() for m, k in per_modality.items())
    current = current / current.norm()
    previous = from_upper_triangle(state.tensors[CONSENSUS_KEY].double())
    expected = ema * centred_unit(previous) + (1 - ema) * current
    expected = expected / expected.norm()
    got = from_upper_triangle(new.tensors[CONSENSUS_KEY].double())
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-4)
    if ema > 0:  # the previous consensus counts: without it the kernel would be another
        assert (current - expected).abs().max() > 3e-3


def test_a_merge_that_embeds_the_anchors_as_nan_fails_and_the_last_good_model_is_served(setup):
    """Finite magnitudes 1e20 times the global ones pass the update checks (server.max_change raised to let them), but
    the merged model embeds the anchors as NaN: RoundFailed, and the server's model is the last good one again."""
    config, split, _, _, state, updates = setup
    config = with_overrides(config, {"server.max_change": 1e30})
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    server.resume(state)
    good = without_codebook(next(iter(updates.values())))
    huge = dataclasses.replace(good, params={k: v * 1e20 if k.endswith("/m") else v for k, v in good.params.items()})
    server.start_round()
    server.accept(huge)
    with pytest.raises(RoundFailed, match=r"embeds the .* anchors as NaN/Inf .* left unchanged"):
        server.finish_round()
    assert server.state is state
    served = shared_tensors(server.model)
    for key, value in state.shared_params().items():
        assert torch.equal(served[key], value), key
    assert all(bool(torch.isfinite(server.model.embed_all(m, d.items)).all()) for m, d in split.anchors.items())
    server.start_round()  # and the next round merges from it
    server.accept(good)
    assert server.finish_round().round == state.round + 1


def test_resume_refuses_a_state_of_another_anchor_set_and_names_both(setup):
    config, split, _, _, state, _ = setup
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    before = shared_tensors(server.model)
    moved = {k: v + 1.0 if is_core_or_magnitude(k) else v for k, v in state.tensors.items()}  # would change the model
    other = dataclasses.replace(state, anchor_fingerprint="ab" * 32, tensors=moved)
    with pytest.raises(ValueError, match=f"anchor set {'ab' * 6}, this job uses {split.anchor_fingerprint[:12]}"):
        server.resume(other)
    assert server.state is None
    assert all(torch.equal(v, before[k]) for k, v in shared_tensors(server.model).items())
    server.resume(dataclasses.replace(state, tensors=moved))  # the same tensors under the job's own anchor set load
    assert server.state.round == state.round
    assert all(torch.equal(v, moved[k]) for k, v in shared_tensors(server.model).items())


def held_bytes(*objects) -> int:
    """Bytes of every tensor and array reachable from ``objects`` (attributes, dicts, lists), each storage once."""
    seen, storages, total = set(), set(), 0
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, np.ndarray):
            total += obj.nbytes
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return total


ROUND_STATE = [
    ("the merge and consensus sums", lambda server: [
        [(m._num, m._den) for m in [*server._merges.values(), *server._projector_merges.values(), server._gradient_merge]],
        server._consensus._sums]),
    ("everything the round holds", lambda server: [
        server._merges, server._projector_merges, server._gradient_merge, server._consensus, server._modality_mass,
        server._codebook_parts]),
]


@pytest.mark.parametrize("what,held", ROUND_STATE, ids=["sums", "everything"])
def test_the_server_holds_running_sums_not_the_updates(setup, what, held):
    """As bench/scale.py server_peak does: perturbed copies of one real update, each under its own site name; after 2
    and after 8 of them the tensors the round's accumulators hold take the same bytes. (The copies send no codebook
    centroids: the codebook pools every site's centroids once, in the round before it is built, by design. The
    information and typicality checks, off here, hold the round's updates instead: the next test.)"""
    config, split, _, _, state, updates = setup
    config = with_overrides(config, {"precision.information_check": False, "precision.typicality_check": False})
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    server.resume(state)
    update = without_codebook(next(iter(updates.values())))
    sizes = {}
    for n in (2, 8):
        server.start_round()
        g = torch.Generator().manual_seed(0)
        for k in range(n):
            params = {key: v + 1e-4 * torch.randn(v.shape, generator=g) for key, v in update.params.items()}
            server.accept(dataclasses.replace(update, site=f"site-{k}", params=params))
        assert len(server.report.accepted) == n
        sizes[n] = held_bytes(*held(server))
    one_update = sum(v.nbytes for v in update.to_arrays()[0].values())
    assert sizes[2] >= one_update  # the sums were found: at least one update's worth, in float64
    assert sizes[8] == sizes[2], f"{what}: {sizes[2]} bytes after 2 sites, {sizes[8]} after 8"


def test_with_the_information_check_the_round_is_held_to_its_end_and_merges_exactly_as_folded_on_arrival(setup):
    """Four accel sites and gyro; with the information and typicality checks on, accepting folds nothing until the
    round's end (their factors come from the round's own reports), then the held updates are folded and released.
    Where no check takes say (every site reports the same) the merged state is the one the server folding each
    update on arrival (checks off) makes, to the last bit; where one takes a site's say, its weight falls this round."""
    config, split, _, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))

    def merged(check: bool, nats: dict[str, float]) -> tuple[GlobalState, FederatedServer]:
        server = FederatedServer(with_overrides(config, {"precision.information_check": check,
                                                         "precision.typicality_check": check}),
                                 {m: d.spec for m, d in split.anchors.items()}, split.anchors, split.anchor_fingerprint,
                                 split.feature_stats)
        server.resume(state)
        server.start_round()
        for k, (site, value) in enumerate(nats.items()):
            server.accept(sharing(config, accel, state, site, value, seed=k))
        server.accept(gyro)
        assert (len(server._held), len(server._merges)) == ((len(nats) + 1, 0) if check else (0, 2))
        new = server.finish_round()
        assert server._held == []
        return new, server

    same = dict.fromkeys(("a1", "a2", "a3", "a4"), 1.0)
    held, _ = merged(True, same)
    folded, _ = merged(False, same)
    for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
        torch.testing.assert_close(held.tensors[key], folded.tensors[key], rtol=0, atol=0)
    _, server = merged(True, {**same, "a4": 0.0})
    weights = server.report.site_weights
    assert weights["a4"] < 1e-3 * weights["a1"] and server.report.site_metrics["a4"]["information_check/factor"] < 1e-3


def corrupt_nan(u):
    key = next(k for k in u.params if k.endswith("/S"))
    u.params[key] = u.params[key].clone().fill_(float("nan"))


def corrupt_shape(u):
    key = next(k for k in u.params if k.endswith("/m"))
    u.params[key] = u.params[key][:-1]


def drop_key(u):
    u.params.pop(next(iter(u.params)))


def extra_key(u):
    u.params["adapter/trunk.encoder.layer.0.attention.self.query/delta"] = torch.zeros(3)


BAD_UPDATES = [
    ("nan", corrupt_nan, "NaN or Inf"),
    ("shape", corrupt_shape, "has shape"),
    ("missing key", drop_key, "keys differ"),
    ("extra key (delta)", extra_key, "keys differ"),
    ("fingerprint", lambda u: setattr(u, "anchor_fingerprint", "0" * 64), "anchor fingerprint"),
    ("round", lambda u: setattr(u, "round", 7), "for round 7"),
    ("gram", lambda u: setattr(u, "gram_upper", u.gram_upper[:-1]), "upper triangle"),
    ("uncertainty", lambda u: setattr(u, "uncertainty", -1.0), "uncertainty"),
    ("private loss", lambda u: setattr(u, "metrics", {**u.metrics, "loss/private": float("nan")}), "private loss is nan"),
    ("int dtype", lambda u: u.params.update({k: v.long() for k, v in u.params.items() if k.endswith("/S")}), "dtype"),
    ("codebook centroid of too few items", lambda u: setattr(u, "codebook_counts", torch.full_like(u.codebook_counts, 2.0)),
     "at least alignment.codebook_min_cluster"),
    ("codebook centroids of another width", lambda u: setattr(u, "codebook_centroids", u.codebook_centroids[:, :-1]),
     "codebook centroids have shape"),
    ("typicality mean without its spread", lambda u: setattr(u, "metrics", {k: v for k, v in u.metrics.items()
                                                                           if k != "typicality/energy/sd"}),
     "mean/sd pairs"),
    ("typicality not finite", lambda u: setattr(u, "metrics", {**u.metrics, "typicality/energy/mean": float("inf")}),
     "typicality numbers .* must be finite"),
    ("typicality of too few items", lambda u: setattr(u, "n_samples", 3), "over 3 private items"),
    ("typicality without a statistic its kind has", lambda u: setattr(u, "metrics", {
        k: v for k, v in u.metrics.items() if not k.startswith("typicality/roughness/")}), "a signal site sends"),
    ("typicality spread negative", lambda u: setattr(u, "metrics", {**u.metrics, "typicality/energy/sd": -1.0}),
     "spreads >= 0"),
]


@pytest.mark.parametrize("name,mutate,reason", BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_bad_updates_are_rejected_with_a_reason_and_the_round_goes_on(setup, name, mutate, reason):
    _, _, server, _, state, updates = setup
    server.state = state
    server.start_round()
    bad_site, good_site = list(updates)
    bad = dataclasses.replace(updates[bad_site], params=dict(updates[bad_site].params))
    mutate(bad)
    with pytest.raises(ContributionRejected, match=reason):
        server.accept(bad)
    assert bad_site in server.report.rejected
    server.accept(updates[good_site])
    assert server.finish_round(min_sites=1).round == state.round + 1


@pytest.mark.parametrize("scale,accepted", [(1.0, True), (3.0, True), (1e3, False)])
def test_an_update_far_larger_than_the_others_is_rejected_as_an_outlier(setup, scale, accepted):
    config, split, _, _, state, updates = setup
    config = with_overrides(config, {"server.outlier_min_reference": 1})
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    server.state = state
    server.start_round()
    first, second = list(updates)
    server.accept(updates[first])
    params = {k: state.tensors[k] + scale * (v - state.tensors[k]) if is_core_or_magnitude(k) else v
              for k, v in updates[second].params.items()}
    update = dataclasses.replace(updates[second], params=params)
    if accepted:
        server.accept(update)
    else:
        with pytest.raises(ContributionRejected, match="server.outlier_factor"):
            server.accept(update)
        assert "median" in server.report.rejected[second]


def test_a_round_without_enough_valid_sites_fails_loudly(setup):
    _, _, server, _, state, updates = setup
    server.state = state
    server.start_round()
    server.accept(next(iter(updates.values())))
    with pytest.raises(RoundFailed, match="at least 2 needed"):
        server.finish_round(min_sites=2)


def test_a_site_refuses_a_job_with_other_anchors(setup):
    _, _, _, sites, state, _ = setup
    other = dataclasses.replace(state, anchor_fingerprint="f" * 64)
    with pytest.raises(ValueError, match="install the anchor file"):
        next(iter(sites.values())).train_round(other)


def test_delta_site_stays_local_and_round_trips(setup):
    trainer = next(iter(setup[3].values()))
    local = trainer.local_state()
    assert local and all(k.endswith("/delta") for k in local)
    assert any(v.abs().sum() > 0 for v in local.values()), "delta_site did not train"
    trainer.load_local_state({k: torch.zeros_like(v) for k, v in local.items()})
    assert all(v.abs().sum() == 0 for v in trainer.local_state().values())
    trainer.load_local_state(local)


def test_in_process_loop_reports_every_round():
    config = tiny_config(rounds=2)
    result = run_in_process(config, progress=None)
    assert len(result.rounds) == 2
    for record in result.rounds:
        assert set(record.site_weights) == {"site-1", "site-2"} and not record.rejected
        assert "accel->gyro/recall@1" in record.eval and "gyro->accel/semantic_recall@10" in record.eval
    # bytes up, counted from the model: float32 cores, magnitudes and the site's projector, their float16
    # log-precisions, the float16 Gram upper triangle; in round 0 also float32 codebook centroids and their counts
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    model = build_model(config, modalities, split.feature_stats)
    cores = sum(p.numel() for p in core_params(model).values())
    n = config.data.n_anchors
    site_modality = {s: d.spec.name for s, d in split.private.items()}
    plain = {s: 4 * (cores + sum(p.numel() for p in projector_params(model, m).values())) + 2 * cores + 2 * n * (n + 1) // 2
             for s, m in site_modality.items()}
    assert result.rounds[1].bytes_up == plain  # the codebook was built in round 0: nothing more of it leaves
    for site, m in site_modality.items():
        width = result.final_state.tensors[f"codebook/{m}/linear"].shape[1]
        extra = result.rounds[0].bytes_up[site] - plain[site]
        assert extra > 0 and extra % (4 * (width + 1)) == 0, (site, extra, width)  # whole centroids with their counts


@pytest.mark.parametrize("values,match", [
    ({"trunk": {"nmae": "tiny"}}, "unknown config key"),
    ({"precision": {"method": "magic"}}, "precision.method"),
    ({"rounds": 0}, "rounds=0"),
    ({"train": {"local_steps": 2}, "precision": {"window": 8}}, "raise local_steps"),
    ({"precision": {"information_reading": "first_step"}}, "information_reading='first_step' is unknown; use 'received'"),
    ({"precision": {"information_draws": 0}}, "information_draws=0 must be at least 1"),
    ({"precision": {"vouched_sites": "site-1"}}, r"'precision.vouched_sites' is a list; got 'site-1': write e.g. \[\"site-1\"\]"),
    ({"precision": {"vouched_sites": ["a", "a"]}}, "name each site once"),
    ({"data": {"sites": {"a": "accel", "b": "gyro"}}, "precision": {"vouched_sites": ["c"]}},
     r"names \['c'\], not sites of data.sites \(a, b\)"),
])
def test_config_errors_name_the_key_and_the_fix(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(values)


def test_dotted_overrides():
    config = with_overrides(config_from_dict({}), {"alignment.lambda_cka": 0.0, "data.scenario": "digits"})
    assert config.alignment.lambda_cka == 0.0 and config.data.scenario == "digits"
    with pytest.raises(ValueError, match="unknown key"):
        with_overrides(config, {"alignment.lambda_ckaa": 1})


@pytest.mark.parametrize("setting, expected", [("auto", None), ("off", None), ("bf16", torch.bfloat16)])
def test_autocast_on_a_cpu_only_when_asked(setting, expected):
    from fedanchor.federation.site import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), setting) is expected


def test_autocast_on_a_gpu_without_bf16_falls_back_or_says_so(monkeypatch):
    from fedanchor.federation.site import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    assert autocast_dtype(torch.device("cuda"), "auto") is None
    with pytest.raises(RuntimeError, match="V100 has no bfloat16; set train.autocast"):
        autocast_dtype(torch.device("cuda"), "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16


def test_a_bf16_autocast_round_trains_and_sends_float32():
    config = tiny_config(train={"autocast": "bf16"})
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    state = server.initial_state()
    site, private = next(iter(split.private.items()))
    trainer = SiteTrainer(config, site, private, split.anchors[private.spec.name], split.anchor_fingerprint, modalities,
                          split.feature_stats)
    update = trainer.train_round(state)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in update.params.values())
    assert any(not torch.equal(update.params[k], state.tensors[k]) for k in update.params if k.endswith("/S"))
    server.start_round()
    server.accept(update)
    with pytest.raises(ValueError, match="train.autocast='fp16' is unknown"):
        with_overrides(config, {"train.autocast": "fp16"})


def test_a_check_factor_weighs_a_site_within_its_modality_and_its_modalitys_share_and_the_merge_stays_exact(setup):
    """A check's factor a_k (here the anchor check's, 0.25 for one site) multiplies the site's weight within its
    modality and its part of its modality's mass: the merge equals the design's coefficients with a_k, and a factor
    near 0 gives the merge of the federation without that site."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    sent = [accel, variant(accel, state, "accel-b", move=1.8), gyro]
    gamma = config.precision.sample_exponent
    for factor, expected_sites in ((0.25, sent), (1e-12, [accel, gyro])):
        server.anchor_factors = {"accel-b": factor}
        merged = run_round(server, state, sent)
        expected = weighted_cores(expected_sites, merge_coefficients(expected_sites, gamma, {"accel-b": factor}))
        for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
            torch.testing.assert_close(merged.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
        assert server.report.site_weights["accel-b"] < server.report.site_weights[accel.site]
    accel_mass, gyro_mass = (float(u.n_samples) ** gamma for u in (accel, gyro))
    assert server.report.site_weights[gyro.site] == pytest.approx(gyro_mass / (accel_mass + gyro_mass))  # one accel site
    server.anchor_factors = {}


def test_the_information_check_weighs_sites_by_what_their_views_share_and_the_merge_stays_exact(setup):
    """Three accel sites report their private two-view loss. The information their views share (log(2B - 1) - loss)
    sets each one's factor for the round: the median site and a better one keep 1, a site sharing 0.3 of the
    median keeps 0.6 of its say (its share of half the median); gyro, alone in its modality, is not judged. The factor enters the merge as the
    design's a_k: the merge equals its coefficients."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    sent = [sharing(config, accel, state, "a1", 1.0, move=1.0), sharing(config, accel, state, "a2", 1.2, move=1.4),
            sharing(config, accel, state, "a3", 0.3, move=1.8), gyro]
    run_round(server, state, sent)
    assert server.information_factors == pytest.approx({"a1": 1.0, "a2": 1.0, "a3": 0.6}), server.information_factors
    assert server.report.site_metrics["a3"]["information_check/nats"] == pytest.approx(0.3)
    assert server.check_factor(gyro.site) == 1.0
    with_factor = run_round(server, state, sent)
    assert server.report.site_metrics["a3"]["information_check/factor"] == pytest.approx(0.6)
    expected = weighted_cores(sent, merge_coefficients(sent, config.precision.sample_exponent, server.information_factors))
    for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
        torch.testing.assert_close(with_factor.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
    server.information_factors = {}


@pytest.mark.parametrize("kind, spec, judged", [
    ("signal", {}, True), ("image", {"shape": (8, 8)}, True), ("text", {"shape": ()}, False),
    ("codes", {"shape": (), "vocab": ("a", "b")}, False), ("vector", {"shape": (8,)}, False)])
def test_the_information_check_judges_only_kinds_whose_views_move_an_item(setup, kind, spec, judged):
    """The same three sites, a3's views sharing 0.3 of the median's nats, read as each kind: a shifted image or a
    rolled signal leaves random items' views nothing in common, so a3 keeps 0.6 of its say; a text, codes or vector
    view keeps most of an item in place (random reports' views share more than real ones'), so nobody is judged."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    sent = [sharing(config, accel, state, "a1", 1.0, move=1.0), sharing(config, accel, state, "a2", 1.2, move=1.4),
            sharing(config, accel, state, "a3", 0.3, move=1.8), gyro]
    # what a site measures of its items depends on their kind: the typicality check (off here) reads no statistics
    sent = [dataclasses.replace(u, metrics={k: v for k, v in u.metrics.items() if not k.startswith("typicality/")})
            for u in sent]
    modalities = server.modalities
    server.modalities = {**modalities, "accel": dataclasses.replace(modalities["accel"], kind=kind, **spec)}
    server.config = with_overrides(config, {"precision.typicality_check": False})  # it reads items of the true kind
    server.information_factors = {}
    try:
        run_round(server, state, sent)
    finally:
        server.modalities, server.config = modalities, config
    assert ("information_check/nats" in server.report.site_metrics["a3"]) is judged
    assert server.information_factors.get("a3", 1.0) == pytest.approx(0.6 if judged else 1.0)
    server.information_factors = {}


@pytest.mark.parametrize("reading", ["received", "training"])
def test_the_information_check_reads_the_loss_its_reading_names(setup, reading):
    """Sites report two private losses: the received model's (loss/private_received) and the round's mean
    (loss/private). Site a3's views share nothing under the model it received but much after its own steps (a site
    that learned its own noise). The check reads the one precision.information_reading names: with "received" a3
    keeps 0.2 of its say (0.1 of the median, a fifth of half of it), with "training" all of it."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    chance = math.log(2 * min(config.train.batch_size, accel.n_samples) - 1)

    def reporting(site: str, received_nats: float, training_nats: float, move: float) -> SiteUpdate:
        sent = variant(accel, state, site, move=move)
        return dataclasses.replace(sent, metrics={**sent.metrics, "loss/private_received": chance - received_nats,
                                                  "loss/private": chance - training_nats})

    sent = [reporting("a1", 1.0, 1.0, 1.0), reporting("a2", 1.0, 1.0, 1.4), reporting("a3", 0.1, 1.2, 1.8), gyro]
    server.config = with_overrides(config, {"precision.information_reading": reading})
    server.information_factors = {}
    try:
        run_round(server, state, sent)
    finally:
        server.config = config
    expected = {"received": {"a1": 1.0, "a2": 1.0, "a3": 0.2}, "training": {"a1": 1.0, "a2": 1.0, "a3": 1.0}}[reading]
    assert server.information_factors == pytest.approx(expected), server.information_factors


def test_the_received_reading_is_one_more_metric_and_leaves_the_round_as_it_was(setup):
    """With precision.information_reading="received" a site reports its received model's two-view loss, taken before
    its steps, beside everything a site without it sends, and the rest of its update is the same to the last bit:
    the reading draws its batches and views from a generator of its own and runs without gradients or dropout."""
    config, split, _, _, state, _ = setup
    modalities = {m: d.spec for m, d in split.anchors.items()}
    site, data = next((s, d) for s, d in split.private.items() if d.spec.name == "accel")
    sent = {}
    for reading in ("training", "received"):
        cfg = with_overrides(config, {"precision.information_reading": reading})
        trainer = SiteTrainer(cfg, site, data, split.anchors["accel"], split.anchor_fingerprint, modalities, split.feature_stats)
        sent[reading] = trainer.train_round(state)
    plain, reading = sent["training"], sent["received"]
    assert set(reading.metrics) - set(plain.metrics) == {"loss/private_received"}
    chance = math.log(2 * min(config.train.batch_size, len(data)) - 1)
    assert 0 < reading.metrics["loss/private_received"] < 2 * chance, reading.metrics
    for key, value in plain.params.items():
        torch.testing.assert_close(reading.params[key], value, rtol=0, atol=0)
    for key, value in plain.precision.items():
        torch.testing.assert_close(reading.precision[key], value, rtol=0, atol=0)
    assert reading.metrics["loss/private"] == plain.metrics["loss/private"]


def test_the_information_check_keeps_the_centroids_of_a_site_whose_views_share_nothing_out_of_the_codebook(setup):
    """Round 0 with the codebook still to build: three accel sites send centroids, one of them (far off, at +100)
    reporting a private loss at chance (its views share nothing). The check leaves it out of the round, so the
    codebook, built once, is pooled from the two others' centroids only; with the check off all three sites'
    centroids enter it."""
    config, _, server, _, state, updates = setup
    accel, gyro = (next(u for u in updates.values() if u.modality == m) for m in ("accel", "gyro"))
    chance = math.log(2 * min(config.train.batch_size, accel.n_samples) - 1)

    def reporting(site: str, nats: float, shift: float) -> SiteUpdate:
        return dataclasses.replace(accel, site=site, metrics={**accel.metrics, "loss/private": chance - nats},
                                   codebook_centroids=accel.codebook_centroids + shift)

    sent = [reporting("a1", 1.0, 0.0), reporting("a2", 1.2, 0.01), reporting("a3", 0.0, 100.0), gyro]
    centres = {}
    for check in (True, False):
        server.config = with_overrides(config, {"precision.information_check": check})
        server.information_factors = {}
        centres[check] = run_round(server, state, sent).codebooks()["accel"].centres
    server.config = config
    assert server.check_factor("a3") == 1.0  # the check was off in the last round
    per_site = len(accel.codebook_counts)
    assert len(centres[True]) == 2 * per_site and np.abs(centres[True]).max() < 50, centres[True]
    assert len(centres[False]) == 3 * per_site and np.abs(centres[False]).max() > 50


def test_the_anchor_check_scores_every_update_on_the_anchors_and_sets_the_next_rounds_factors():
    """With precision.anchor_check on and three accel sites, the server scores each accel update on public anchors at
    the end of the round (one loss per site in the round report, the same anchors and views for all), and the worst
    accel site gets a factor below 1 for the next round while the median one keeps 1; gyro, alone in its modality,
    is not scored and keeps 1."""
    config = tiny_config(data={"sites": {"a1": "accel", "a2": "accel", "a3": "accel", "g1": "gyro"}},
                         precision={"anchor_check": True})
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    state = server.initial_state()
    server.start_round()
    for site, data in split.private.items():
        trainer = SiteTrainer(config, site, data, split.anchors[data.spec.name], split.anchor_fingerprint, modalities,
                              split.feature_stats)
        server.accept(trainer.train_round(server.state_for(site, state)))
    server.finish_round()
    losses = {s: m["anchor_check/loss"] for s, m in server.report.site_metrics.items() if "anchor_check/loss" in m}
    assert set(losses) == {"a1", "a2", "a3"}, "g1 is alone in its modality: nothing to compare it with, so not scored"
    assert all(math.isfinite(v) and v > 0 for v in losses.values()) and len(set(losses.values())) == 3, losses
    # scoring the updates left the server's model at the global state it serves (each check reloads it)
    in_model = shared_tensors(server.model)
    for key, value in server.state.shared_params().items():
        torch.testing.assert_close(in_model[key], value.to(in_model[key].dtype))
    accel = sorted(("a1", "a2", "a3"), key=losses.get)
    factors = {s: m["anchor_check/factor"] for s, m in server.report.site_metrics.items() if "anchor_check/factor" in m}
    assert factors[accel[1]] == 1.0 and factors[accel[2]] <= 1.0 and factors["g1"] == 1.0, (losses, factors)


def test_the_data_check_takes_a_garbage_sites_say_and_keeps_its_centroids_out_of_the_codebook():
    """Three pixel sites, one of them holding random images of the right shape, the data check alone on (the round is
    not held: the factor weighs the next): the garbage site's centroids lie far from the public anchors, so its data
    factor falls below 0.5 (it weighs less, or is left out of the next round) and the codebook is pooled from the
    clean pixel sites only; the clean sites and the lone zernike site keep factor 1."""
    from fedanchor.data.corrupt import corrupt

    config = tiny_config(data={"scenario": "digits", "n_anchors": 32, "n_test": 50, "max_private_per_site": 64,
                               "sites": {"clean-1": "pixels", "clean-2": "pixels", "garbage": "pixels", "vector": "zernike"}},
                         precision={"information_check": False, "typicality_check": False})
    assert config.precision.data_check
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    state = server.initial_state()
    server.start_round()
    sent = {}
    for site, data in split.private.items():
        data = corrupt(data, "garbage", 1.0, seed=0) if site == "garbage" else data
        trainer = SiteTrainer(config, site, data, split.anchors[data.spec.name], split.anchor_fingerprint, modalities,
                              split.feature_stats)
        update = trainer.train_round(server.state_for(site, state))
        sent[site] = len(update.codebook_counts)
        server.accept(update)
    state = server.finish_round()
    garbage = server.silenced.get("garbage") or {"data_check/factor": server.data_factors["garbage"]}
    assert garbage["data_check/factor"] < 0.5, garbage
    assert all(server.data_factors.get(s, 1.0) == 1.0 for s in ("clean-1", "clean-2", "vector")), server.data_factors
    distances = server.data_distances
    assert distances["garbage"] > max(distances["clean-1"], distances["clean-2"]), distances
    assert server.report.site_metrics["garbage"]["data_check/distance"] == distances["garbage"]
    assert len(state.codebooks()["pixels"].centres) == sent["clean-1"] + sent["clean-2"], sent


def test_a_silenced_site_leaves_the_federation_it_would_be_without_it_to_the_last_bit():
    """Three accel sites and a gyro site, one accel site holding random recordings of the right shape. The checks
    leave it out of every round (weight 0), and its peers are judged without it, so the global model after two rounds
    is, tensor for tensor and bit for bit, that of the federation without the site."""
    config = tiny_config(data={"sites": {"a1": "accel", "a2": "accel", "a3": "accel", "g1": "gyro"}})
    split = make_split(config)
    torch.manual_seed(0)
    with_garbage = run_in_process(config, progress=None, corruptions={"a1": ("garbage", 1.0)}, split=split,
                                  evaluate_each_round=False)
    rest = split.without("a1")
    with pytest.raises(ValueError, match="not one of this split's sites"):
        split.without("a4")
    torch.manual_seed(0)
    without = run_in_process(with_overrides(config, {"data.sites": rest.site_modality}), progress=None, split=rest,
                             evaluate_each_round=False)
    assert [r.site_weights["a1"] for r in with_garbage.rounds] == [0.0] * config.rounds
    assert all(r.site_metrics["a1"]["checks/left_out"] == 1.0 for r in with_garbage.rounds)
    assert with_garbage.final_state.tensors.keys() == without.final_state.tensors.keys()
    for key, value in without.final_state.tensors.items():
        assert torch.equal(with_garbage.final_state.tensors[key], value), key
    assert with_garbage.final_eval == without.final_eval


@pytest.mark.parametrize("metrics, shown", [
    ({}, "a:0.50 b:0.50"),
    ({"anchor_check/factor": 1.0, "data_check/factor": 1.0}, "a:0.50 b:0.50"),
    ({"anchor_check/factor": 0.25}, "a:0.50 (anchor check 0.25) b:0.50"),
    ({"anchor_check/factor": 1.0, "data_check/factor": 0.0123}, "a:0.50 (data check 0.012) b:0.50"),
    ({"anchor_check/factor": 0.5, "data_check/factor": 0.1}, "a:0.50 (anchor check 0.5, data check 0.1) b:0.50"),
    ({"information_check/factor": 0.3, "data_check/factor": 1.0}, "a:0.50 (information check 0.3) b:0.50"),
    ({"typicality_check/factor": 0.002, "typicality_check/z": 8.2}, "a:0.50 (typicality check 0.002) b:0.50"),
    ({"typicality_check/factor": 0.002, "information_check/factor": 0.5, "checks/left_out": 1.0},
     "a:0.50 (left out: information check 0.5, typicality check 0.002) b:0.50"),
    ({"typicality_check/factor": 0.002, "checks/vouched": 1.0}, "a:0.50 (vouched for: typicality check 0.002) b:0.50"),
    ({"typicality_check/factor": 1.0, "checks/vouched": 1.0}, "a:0.50 b:0.50"),
])
def test_the_round_line_says_which_check_took_say_from_a_site(metrics, shown):
    from fedanchor.federation.loop import RoundRecord, format_round

    record = RoundRecord(0, 1.0, {"a": metrics, "b": {}}, {"a": 0.5, "b": 0.5}, {}, {}, {}, {})
    assert f"| weight {shown} |" in format_round(record)


def far_off(update: SiteUpdate, shift: float) -> SiteUpdate:
    """``update`` reporting items ``shift`` nats more energetic than it holds (the typicality check's reading)."""
    return dataclasses.replace(update, metrics={**update.metrics, "typicality/energy/mean":
                                                update.metrics["typicality/energy/mean"] + shift})


def test_the_typicality_check_leaves_out_a_far_off_site_in_the_round_it_reads_and_in_the_next_it_misses(setup):
    """Three accel sites, one reporting items far more energetic than its peers and the anchors. With the
    information check off the server still holds the round, and the site (typicality factor under 0.05) is left out
    of this very round: the merge is the federation of the others, exactly as the design's coefficients say, its
    weight 0, and its peers, two left, are not judged. In the next round it sends nothing: its report keeps it out."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    sent = [variant(accel, state, "a1", move=1.0), variant(accel, state, "a2", move=1.4),
            far_off(variant(accel, state, "a3", move=1.8), 6.0), gyro]
    server.config = with_overrides(config, {"precision.information_check": False})
    server.information_factors, server.typicality_reports = {}, {}
    try:
        assert server.holds_round()
        merged = run_round(server, state, sent)
        assert set(server.silenced) == {"a3"} and server.silenced["a3"]["typicality_check/factor"] < 0.05, server.silenced
        assert server.typicality_factors == {}, "a1 and a2 alone are too few to judge"
        kept = [sent[0], sent[1], gyro]
        expected = weighted_cores(kept, merge_coefficients(kept, config.precision.sample_exponent))
        for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
            torch.testing.assert_close(merged.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
        assert server.report.site_weights["a3"] == 0.0 and server.report.site_metrics["a3"]["checks/left_out"] == 1.0
        run_round(server, state, kept)
        assert set(server.silenced) == {"a3"}
    finally:
        server.config, server.typicality_reports, server.typicality_factors, server.silenced = config, {}, {}, {}


def test_the_checks_leave_out_bad_sites_the_worst_first_and_judge_the_rest_without_them(setup):
    """Five accel sites, two reporting items far more energetic than their peers (one twice as far). The farther is
    left out first; judged again without it, the other is left out too; the three clean sites, judged among
    themselves, keep their whole say, and the merge is the federation of the clean sites, as the design's
    coefficients say. A round the far site has to itself fails: nothing is left to merge."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    clean = [variant(accel, state, f"a{i}", move=1.0 + 0.2 * i) for i in range(1, 4)]
    sent = [*clean, far_off(variant(accel, state, "far", move=1.9), 6.0),
            far_off(variant(accel, state, "farther", move=2.0), 12.0), gyro]
    server.information_factors, server.typicality_reports = {}, {}
    try:
        merged = run_round(server, state, sent)
        assert list(server.silenced) == ["farther", "far"], server.silenced
        assert server.typicality_factors == {"a1": 1.0, "a2": 1.0, "a3": 1.0}, server.typicality_factors
        kept = [*clean, gyro]
        expected = weighted_cores(kept, merge_coefficients(kept, config.precision.sample_exponent, server.information_factors))
        for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
            torch.testing.assert_close(merged.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
        with pytest.raises(RoundFailed, match=r"left out every site that contributed \(\['far'\]"):
            run_round(server, state, [sent[3]])  # alone in a round, still judged against the reports it is kept with
    finally:
        server.typicality_reports, server.typicality_factors, server.silenced, server.information_factors = {}, {}, {}, {}


def test_a_site_vouched_for_keeps_its_say_and_the_report_shows_what_the_checks_read(setup, caplog):
    """Three clean accel sites and one reporting items far more energetic than its peers (a known other scanner),
    which the consortium vouches for (precision.vouched_sites). The typicality check reads it as far off as ever and
    the round report says so, but it is not left out and keeps its whole say: the merge is that of every site, as the
    design's coefficients say with its factor 1. Without the voucher the same round leaves it out."""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    clean = [variant(accel, state, f"a{i}", move=1.0 + 0.2 * i) for i in range(1, 4)]
    sent = [*clean, far_off(variant(accel, state, "far", move=1.9), 6.0), gyro]
    server.information_factors, server.typicality_reports = {}, {}
    try:
        run_round(server, state, sent)
        assert list(server.silenced) == ["far"], "the voucher, not the data, must be what keeps the site in"
        server.config = with_overrides(config, {"precision.vouched_sites": ["far", "farr"]})
        server.typicality_reports, server.silenced = {}, {}
        with caplog.at_level(logging.WARNING, logger="fedanchor"):
            merged = run_round(server, state, sent)
        assert "precision.vouched_sites names 'farr', which sent no accepted update" in caplog.text
        assert "names 'far'," not in caplog.text
        assert server.silenced == {} and server.check_factor("far") == 1.0
        assert server.typicality_factors["far"] < SILENCED_BELOW, server.typicality_factors
        shown = server.report.site_metrics["far"]
        assert shown[VOUCHED] == 1.0 and shown["typicality_check/factor"] < SILENCED_BELOW, shown
        factors = {u.site: server.check_factor(u.site) for u in sent}
        expected = weighted_cores(sent, merge_coefficients(sent, config.precision.sample_exponent, factors))
        for key in [k for k in state.tensors if is_core_or_magnitude(k)]:
            torch.testing.assert_close(merged.tensors[key].double(), expected[key], rtol=1e-5, atol=1e-6)
        assert server.report.site_weights["far"] > 0
    finally:
        server.config, server.typicality_reports, server.typicality_factors, server.silenced = config, {}, {}, {}
        server.information_factors = {}


def test_a_site_whose_peers_are_too_few_to_judge_again_keeps_its_verdict(setup):
    """Three accel sites: a1 clean but its two views share nothing (the information check's worst case), "far"
    reporting items far more energetic than its peers and the anchors. a1 is left out first; a2 and "far" are then
    too few to be judged again, and a check that cannot judge has not cleared anyone: "far" keeps the typicality
    verdict it had beside a1 and is left out too, and a2 keeps its say. (Before, the clean site silenced by one check
    freed the bad site another check had found.)"""
    config, _, server, _, state, updates = setup
    accel, gyro = (without_codebook(next(u for u in updates.values() if u.modality == m)) for m in ("accel", "gyro"))
    batch = min(config.train.batch_size, accel.n_samples)
    blind = math.log(2 * batch - 1) + 1.0  # a two-view loss above chance: no information
    a1 = variant(accel, state, "a1", move=1.0)
    sent = [dataclasses.replace(a1, metrics={**a1.metrics, "loss/private": blind}),
            variant(accel, state, "a2", move=1.4), far_off(variant(accel, state, "far", move=1.8), 6.0), gyro]
    server.information_factors, server.typicality_reports = {}, {}
    try:
        assert server.holds_round()
        run_round(server, state, sent)
        assert list(server.silenced) == ["a1", "far"], server.silenced
        assert server.silenced["far"]["typicality_check/factor"] < SILENCED_BELOW, server.silenced
        assert server.report.site_weights["far"] == 0.0 == server.report.site_weights["a1"]
        assert server.report.site_weights["a2"] > 0
    finally:
        server.typicality_reports, server.typicality_factors, server.silenced, server.information_factors = {}, {}, {}, {}


def test_under_dp_the_server_refuses_typicality_numbers(setup):
    config, _, server, _, state, updates = setup
    accel = without_codebook(next(u for u in updates.values() if u.modality == "accel"))
    assert any(k.startswith("typicality/") for k in accel.metrics)
    server.config = with_overrides(config, {"privacy.dp": True})
    try:
        server.state = state
        server.start_round()
        with pytest.raises(ContributionRejected, match="under differential privacy"):
            server.accept(accel)
    finally:
        server.config = config


@pytest.mark.parametrize("mode, anchors_too, bad_anchors_changed", [
    ("garbage", False, False),
    ("garbage", True, True),
    ("shuffle", True, True),
    ("small", True, False),  # the public anchors are whole: a small site has fewer records, not fewer anchors
])
def test_a_corruption_in_a_sites_pipeline_reaches_its_copy_of_the_anchors_and_nobody_elses(mode, anchors_too,
                                                                                            bad_anchors_changed):
    from fedanchor.federation.loop import site_inputs

    config = tiny_config(data={"sites": {"a1": "accel", "a2": "accel", "g1": "gyro"}})
    split = make_split(config)
    inputs = site_inputs(split, {"a1": (mode, 1.0)}, corrupt_anchors=anchors_too, seed=0)
    public = np.asarray(split.anchors["accel"].items)
    bad_private, bad_anchors = inputs["a1"]
    assert bad_private is not split.private["a1"]
    assert np.array_equal(np.asarray(bad_anchors.items), public) != bad_anchors_changed
    assert bad_anchors.sample_ids == split.anchors["accel"].sample_ids
    for site in ("a2", "g1"):
        private, anchors = inputs[site]
        assert anchors is split.anchors[private.spec.name] and private is split.private[site]
    with pytest.raises(ValueError, match=r"not sites of this split"):
        site_inputs(split, {"a9": ("noise", 1.0)})
