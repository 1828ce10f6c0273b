"""Differential privacy of the upload: clipping, Gaussian noise, the accountant, and what a DP site sends."""
from __future__ import annotations

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from conftest import tiny_config
from fedanchor.dp import clip, gaussian_release, privacy_spent, privatize_change
from fedanchor.federation.loop import run_in_process
from fedanchor.federation.messages import is_core_or_magnitude


@pytest.mark.parametrize("norm,bound", [(0.5, 1.0), (3.0, 1.0), (100.0, 0.05)])
def test_clip_bounds_the_norm_and_keeps_the_direction(norm, bound):
    v = torch.randn(50, dtype=torch.float64)
    v = v / v.norm() * norm
    c = clip(v, bound)
    assert float(c.norm()) == pytest.approx(min(norm, bound))
    assert torch.allclose(c / c.norm(), v / v.norm())


def test_release_noise_has_the_configured_scale():
    generator = torch.Generator().manual_seed(0)
    released = gaussian_release(torch.zeros(200_000), bound=0.5, noise_multiplier=2.0, generator=generator)
    assert float(released.double().std()) == pytest.approx(1.0, rel=0.01)  # std = z * C


def test_change_is_clipped_jointly_over_all_keys():
    received = {"a": torch.zeros(3, 4), "b": torch.ones(5)}
    params = {"a": torch.full((3, 4), 10.0), "b": torch.full((5,), 11.0)}
    out = privatize_change(params, received, bound=1.0, noise_multiplier=1e-9, generator=torch.Generator().manual_seed(1))
    change = torch.cat([(out[k] - received[k]).reshape(-1) for k in sorted(out)])
    assert float(change.norm()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(KeyError, match="no received value"):
        privatize_change({"c": torch.zeros(1)}, received, 1.0, 1.0, torch.Generator())


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (1.0, 10), (4.0, 10)])
def test_epsilon_comes_from_the_rdp_accountant_at_half_the_noise_multiplier(z, rounds):
    spent = privacy_spent(z, rounds, 1e-5)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(z / 2), count=2 * rounds)
    assert spent.epsilon == pytest.approx(accountant.get_epsilon(1e-5))
    assert spent.releases == 2 * rounds and spent.noise_multiplier == z / 2


def test_more_noise_or_fewer_rounds_spend_less():
    assert privacy_spent(4.0, 5, 1e-5).epsilon < privacy_spent(1.0, 5, 1e-5).epsilon
    assert privacy_spent(1.0, 2, 1e-5).epsilon < privacy_spent(1.0, 5, 1e-5).epsilon


@pytest.mark.parametrize("reading", ["training", "received"])
def test_a_dp_site_sends_noised_cores_uniform_precision_and_only_public_metrics(reading):
    config = tiny_config(rounds=2, privacy={"dp": True, "noise_multiplier": 2.0, "clip_update": 0.1},
                         precision={"information_reading": reading})
    result = run_in_process(config, progress=None)
    assert len(result.rounds) == 2 and not result.rounds[-1].rejected
    epsilons = []
    for record in result.rounds:
        for reported in record.site_metrics.values():
            # Nothing of the server's checks either: no centroids under DP (no data check), no private loss (no
            # information check), and the anchor check is off by default. What is reported is what the site sent.
            metrics = dict(reported)
            assert set(metrics) == {"seconds", "dp/epsilon", "dp/delta", "dp/rounds"}
            # what the accountant gives for this many rounds at this noise (round r is the (r + 1)-th release)
            assert metrics["dp/epsilon"] == pytest.approx(privacy_spent(2.0, record.round + 1, config.privacy.delta).epsilon)
            assert metrics["dp/rounds"] == record.round + 1 and metrics["dp/delta"] == config.privacy.delta
        epsilons.append(next(iter(record.site_metrics.values()))["dp/epsilon"])
        assert all(u == 1.0 for u in record.site_uncertainty.values())
    assert epsilons[1] > epsilons[0]
    assert epsilons[1] == pytest.approx(privacy_spent(2.0, 2, config.privacy.delta).epsilon)
    state = result.final_state
    assert all(bool(torch.isfinite(v).all()) for k, v in state.tensors.items() if is_core_or_magnitude(k))


def test_dp_without_noise_is_refused():
    with pytest.raises(ValueError, match="needs noise"):
        tiny_config(privacy={"dp": True, "noise_multiplier": 0.0})
