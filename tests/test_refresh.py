"""Rank-adaptive basis refresh: the schedule, the projected gradients, augmentation, truncation, and a federation
that refreshes its bases and still merges exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from conftest import merge_coefficients, tiny_config, weighted_cores
from fedanchor.adapters import GeoLoRALinear
from fedanchor.adapters.refresh import augment_basis, refresh_phase, truncate
from fedanchor.config import with_overrides
from fedanchor.federation import ContributionRejected, FederatedServer, SiteTrainer, make_split
from fedanchor.federation.messages import SiteUpdate, adapter_key


def layer_with_core(d_in: int, d_out: int, rank: int, seed: int = 0) -> GeoLoRALinear:
    layer = GeoLoRALinear(nn.Linear(d_in, d_out), rank, "random", torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.S.normal_(std=0.5, generator=torch.Generator().manual_seed(seed + 1))
    return layer


@pytest.mark.parametrize("every, phases", [
    (0, ["fixed"] * 6),
    (2, ["gradients", "augmented"] * 3),
    (3, ["fixed", "gradients", "augmented"] * 2),
    (5, ["fixed", "fixed", "fixed", "gradients", "augmented", "fixed"]),
])
def test_refresh_schedule(every, phases):
    assert [refresh_phase(r, every) for r in range(6)] == phases


def test_refresh_every_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="use 0 .* or at least 2"):
        refresh_phase(0, 1)
    with pytest.raises(ValueError, match="refresh_every=1"):
        with_overrides(tiny_config(), {"adapter.refresh_every": 1})
    with pytest.raises(ValueError, match="set adapter.refresh_every=0 under differential privacy"):
        with_overrides(tiny_config(), {"adapter.refresh_every": 3, "privacy.dp": True})


CASES = [(16, 16, 2), (24, 12, 4), (12, 24, 3), (10, 10, 4)]  # d_in, d_out, rank (the last: 2r > d - r)


@pytest.mark.parametrize("d_in,d_out,rank", CASES)
def test_projected_gradients_are_those_of_the_dense_update(d_in, d_out, rank):
    """G V and G^T U from the probe equal autograd's gradient of the loss with respect to U S V^T, projected."""
    layer = layer_with_core(d_in, d_out, rank)
    x, target = torch.randn(9, d_in), torch.randn(9, d_out)
    fast = layer(x)
    layer.start_gradient_probe()
    probed = layer(x)
    torch.testing.assert_close(probed, fast, atol=1e-5, rtol=1e-5)  # the probe does not change the function
    ((probed - target) ** 2).sum().backward()
    grad_u, grad_v = layer.stop_gradient_probe()
    assert layer.grad_probe is None

    delta = (layer.U @ layer.S @ layer.V.T).detach().requires_grad_(True)  # the dense reference
    direction = layer.weight + delta
    out = x @ (direction * (layer.m * torch.exp(layer.delta) / direction.norm(dim=1))[:, None]).T + layer.bias
    ((out - target) ** 2).sum().backward()
    torch.testing.assert_close(grad_u, delta.grad @ layer.V, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_v, delta.grad.T @ layer.U, atol=1e-4, rtol=1e-4)
    # and G V is exactly the gradient the core's own factorisation sees: dL/dS = U^T G V
    layer.S.grad = None
    ((layer(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.S.grad, layer.U.T @ grad_u, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d_in,d_out,rank", CASES)
@pytest.mark.parametrize("gradient", ["random", "zero", "inside"])
def test_augmentation_keeps_the_function_and_the_old_basis(d_in, d_out, rank, gradient):
    layer = layer_with_core(d_in, d_out, rank)
    g = torch.Generator().manual_seed(5)
    grad_u = {"random": torch.randn(d_out, rank, generator=g), "zero": torch.zeros(d_out, rank),
              "inside": layer.U @ torch.randn(rank, rank, generator=g)}[gradient]  # "inside": nothing new to add
    grad_v = torch.randn(d_in, rank, generator=g) if gradient == "random" else torch.zeros(d_in, rank)
    u_hat, v_hat, s_hat = augment_basis(layer.U, layer.V, layer.S.detach(), grad_u, grad_v)
    extra = min(rank, d_out - rank, d_in - rank)
    assert u_hat.shape == (d_out, rank + extra) and v_hat.shape == (d_in, rank + extra) and s_hat.shape == (rank + extra,) * 2
    assert torch.equal(u_hat[:, :rank], layer.U) and torch.equal(v_hat[:, :rank], layer.V)
    torch.testing.assert_close(u_hat.T @ u_hat, torch.eye(rank + extra), atol=1e-5, rtol=0)
    torch.testing.assert_close(v_hat.T @ v_hat, torch.eye(rank + extra), atol=1e-5, rtol=0)
    torch.testing.assert_close(u_hat @ s_hat @ v_hat.T, layer.U @ layer.S.detach() @ layer.V.T, atol=1e-6, rtol=0)
    if gradient == "random":  # the new columns span what the gradient adds to the old basis
        residual = grad_u[:, :extra] - layer.U @ (layer.U.T @ grad_u[:, :extra])
        torch.testing.assert_close(u_hat @ (u_hat.T @ residual), residual, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tolerance", [0.0, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("d_in,d_out,rank", CASES)
def test_truncation_keeps_the_function_within_the_tolerance(tolerance, d_in, d_out, rank):
    """||U S V^T - U' S' V'^T|| <= tau ||U S V^T||, with the fewest singular values that achieve it."""
    layer = layer_with_core(d_in, d_out, rank)
    u_hat, v_hat, _ = augment_basis(layer.U, layer.V, layer.S.detach(), torch.randn(d_out, rank), torch.randn(d_in, rank))
    size = u_hat.shape[1]
    # a trained augmented core with a decaying spectrum
    spectrum = torch.tensor([2.0 ** -i for i in range(size)])
    q1, q2 = torch.linalg.qr(torch.randn(size, size))[0], torch.linalg.qr(torch.randn(size, size))[0]
    s_hat = q1 @ torch.diag(spectrum) @ q2.T
    before = u_hat @ s_hat @ v_hat.T
    cut = truncate(u_hat, v_hat, s_hat, tolerance, rank_max=size)
    after = cut.u @ cut.s @ cut.v.T
    error = float((before - after).norm() / before.norm())
    assert error <= tolerance + 1e-5 and cut.discarded == pytest.approx(error, abs=1e-5)
    tails = [float(spectrum[k:].norm() / spectrum.norm()) for k in range(size + 1)]
    assert cut.rank == max(1, min(k for k in range(size + 1) if tails[k] <= tolerance + 1e-7))
    torch.testing.assert_close(cut.u.T @ cut.u, torch.eye(cut.rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(cut.v.T @ cut.v, torch.eye(cut.rank), atol=1e-5, rtol=0)
    # installed in the layer, of another rank: the layer resizes and computes what its dense weight says
    x = torch.randn(6, d_in)
    with torch.no_grad():
        layer.set_basis(cut.u, cut.v, cut.s)
        assert layer.rank == cut.rank and layer.S.shape == (cut.rank, cut.rank)
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)


def test_truncation_caps_the_rank_and_handles_an_untrained_core():
    u_hat, v_hat = torch.linalg.qr(torch.randn(20, 8))[0], torch.linalg.qr(torch.randn(20, 8))[0]
    cut = truncate(u_hat, v_hat, torch.diag(torch.ones(8)), tolerance=0.0, rank_max=3)
    assert cut.rank == 3 and cut.discarded == pytest.approx((5 / 8) ** 0.5)
    zero = truncate(u_hat, v_hat, torch.zeros(8, 8), tolerance=0.1, rank_max=4)
    assert zero.rank == 4 and torch.equal(zero.u, u_hat[:, :4]) and float(zero.s.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="refresh_tolerance"):
        truncate(u_hat, v_hat, torch.eye(8), tolerance=1.0, rank_max=3)


def test_set_basis_refuses_a_basis_that_does_not_fit():
    layer = layer_with_core(16, 12, 2)
    with pytest.raises(ValueError, match="do not fit this layer"):
        layer.set_basis(torch.randn(16, 3), torch.randn(16, 3))
    with pytest.raises(ValueError, match="core shape"):
        layer.set_basis(torch.randn(12, 3), torch.randn(16, 3), torch.zeros(2, 2))


# -- a federation that refreshes its bases ---------------------------------------------
@pytest.fixture(scope="module")
def refreshing():
    config = with_overrides(tiny_config(), {"adapter.refresh_every": 2, "adapter.refresh_tolerance": 0.3,
                                            "adapter.rank_max": 6, "rounds": 3})
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    sites = {s: SiteTrainer(config, s, d, split.anchors[d.spec.name], split.anchor_fingerprint, modalities, split.feature_stats)
             for s, d in split.private.items()}
    states, reports, updates = [server.initial_state()], [], []
    for _ in range(config.rounds):
        server.start_round()
        round_updates = {s: t.train_round(states[-1]) for s, t in sites.items()}
        for update in round_updates.values():
            server.accept(update)
        states.append(server.finish_round())
        reports.append(server.report)
        updates.append(round_updates)
    return config, server, sites, states, reports, updates


def ranks(state) -> dict[str, int]:
    return {k.split("/")[1]: int(v.shape[0]) for k, v in state.tensors.items() if k.startswith("adapter/") and k.endswith("/S")}


def test_a_refresh_augments_then_truncates_every_layer(refreshing):
    config, _, _, states, reports, updates = refreshing
    # round 0 gathers projected gradients from every site; the bases grow, the function does not change
    assert all(u.basis_gradients for u in updates[0].values())
    assert reports[0].basis["phase"] == "gradients"
    grown = ranks(states[1])
    assert all(r > rank_before for r, rank_before in zip(grown.values(), ranks(states[0]).values()))
    # round 1 trains the augmented cores and truncates them within the tolerance, at most rank_max
    assert all(update.params[adapter_key(layer, "S")].shape == (r, r)
               for update in updates[1].values() for layer, r in grown.items())
    assert not any(u.basis_gradients for u in updates[1].values())
    assert reports[1].basis["phase"] == "augmented"
    assert all(d <= config.adapter.refresh_tolerance + 1e-6 for d in reports[1].basis["discarded"].values())
    assert all(1 <= r <= config.adapter.rank_max for r in ranks(states[2]).values())
    assert ranks(states[2]) == reports[1].basis["ranks"]
    # the sites trained in round 2 at the truncated ranks, and the server accepted them all (T=2: round 2 gathers
    # gradients for the next refresh again)
    assert len(reports[2].accepted) == len(updates[2]) and not reports[2].rejected
    assert all(update.params[adapter_key(layer, "S")].shape == (r, r)
               for update in updates[2].values() for layer, r in ranks(states[2]).items())
    assert reports[2].basis["phase"] == "gradients"
    for state in states:
        for key, value in state.tensors.items():
            if key.endswith(("/U", "/V")):
                torch.testing.assert_close(value.T @ value, torch.eye(value.shape[1]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("round_", [0, 1, 2], ids=["gradients: augmented", "augmented: truncated", "gradients again"])
def test_the_server_s_merge_is_exact_through_a_refresh(refreshing, round_):
    """What the server merged in each round of a refreshing federation, in the bases of the state it sent out and
    the bases of the state it made: U' S' V'^T == sum_k U (C_k * S_k) V^T, C_k the design's coefficients for each
    site. Exact where the bases were augmented (the function is kept); within the truncation's tolerance, and
    exactly what the report says it discarded, where they were truncated."""
    config, _, _, states, reports, updates = refreshing
    sent, made = states[round_], states[round_ + 1]
    sites = list(updates[round_].values())
    coefficients = merge_coefficients(sites, config.precision.sample_exponent)
    torch.testing.assert_close({k: v.double() for k, v in made.tensors.items() if k.endswith("/m")},
                               {k: v for k, v in weighted_cores(sites, coefficients).items() if k.endswith("/m")},
                               rtol=1e-5, atol=1e-6)
    phase = reports[round_].basis["phase"]
    for layer in ranks(sent):
        s_key = adapter_key(layer, "S")
        u, v = (sent.tensors[adapter_key(layer, part)].double() for part in ("U", "V"))
        expected = sum(u @ (coefficients[x.site][s_key] * x.params[s_key].double()) @ v.T for x in sites)
        u2, s2, v2 = (made.tensors[adapter_key(layer, part)].double() for part in ("U", "S", "V"))
        merged = u2 @ s2 @ v2.T
        if phase == "gradients":
            assert u2.shape[1] > u.shape[1]  # the basis grew ...
            torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)  # ... and the merge is exact in it
        else:
            error = float((merged - expected).norm() / expected.norm())
            assert error <= config.adapter.refresh_tolerance + 1e-6
            assert error == pytest.approx(reports[round_].basis["discarded"][layer], abs=1e-5)


def test_basis_gradients_are_refused_outside_a_gradient_round_and_required_in_one(refreshing):
    config, _, sites, states, _, updates = refreshing
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    server = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    server.initial_state()
    server.start_round()  # round 0: a gradient round
    update = next(iter(updates[0].values()))
    with pytest.raises(ContributionRejected, match="G V and G\\^T U of every layer are needed"):
        server.accept(dataclasses.replace(update, basis_gradients={}))
    bad = dict(update.basis_gradients)
    key = next(iter(bad))
    bad[key] = bad[key][:, :1]
    with pytest.raises(ContributionRejected, match="basis gradient .* has shape"):
        server.accept(dataclasses.replace(update, basis_gradients=bad))
    nan = {k: v.clone() for k, v in update.basis_gradients.items()}
    nan[key][0, 0] = float("nan")
    with pytest.raises(ContributionRejected, match="not a finite"):
        server.accept(dataclasses.replace(update, basis_gradients=nan))
    server.accept(update)
    # the wire keeps them exactly
    again = SiteUpdate.from_arrays(*update.to_arrays())
    assert all(torch.equal(again.basis_gradients[k], v) for k, v in update.basis_gradients.items())
