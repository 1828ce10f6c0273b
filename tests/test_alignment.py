"""Centred kernel alignment, the consensus over sites, and the anchor losses."""
from __future__ import annotations

import pytest
import torch

from fedanchor.alignment import (GramConsensus, anchor_info_nce, centred_gram, cka, feature_cka, from_upper_triangle,
                                 two_view_contrastive, upper_triangle)


def random_rotation(p: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


SHAPES = [(10, 4), (30, 16), (64, 8)]


@pytest.mark.parametrize("n,p", SHAPES)
def test_cka_is_one_on_identical_inputs(n, p):
    x = torch.randn(n, p, dtype=torch.float64)
    assert feature_cka(x, x).item() == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("n,p", SHAPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 250.0])
def test_cka_is_invariant_to_rotation_and_isotropic_scaling(n, p, scale):
    x, y = torch.randn(n, p, dtype=torch.float64), torch.randn(n, p, dtype=torch.float64)
    base = feature_cka(x, y)
    transformed = feature_cka(scale * x @ random_rotation(p, n), y)
    assert transformed.item() == pytest.approx(base.item(), abs=1e-10)


def test_cka_is_invariant_to_translation_and_low_on_unrelated_data():
    x = torch.randn(200, 8, dtype=torch.float64)
    assert feature_cka(x + 5.0, x).item() == pytest.approx(1.0, abs=1e-10)
    assert feature_cka(x, torch.randn(200, 8, dtype=torch.float64)).item() < 0.3


def test_centred_gram_is_centred_and_unit_norm():
    k = centred_gram(torch.randn(12, 5, dtype=torch.float64))
    assert k.norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(k.sum(0), torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [2, 5, 40])
def test_upper_triangle_round_trip(n):
    k = centred_gram(torch.randn(n, 3, dtype=torch.float64))
    packed = upper_triangle(k)
    assert packed.numel() == n * (n + 1) // 2
    torch.testing.assert_close(from_upper_triangle(packed), k)


def test_upper_triangle_of_wrong_length_is_refused():
    with pytest.raises(ValueError, match="not the upper triangle"):
        from_upper_triangle(torch.zeros(7))


def weighted_cka(candidate, kernels, weights):
    return sum(w * cka(candidate, k) for k, w in zip(kernels, weights))


@pytest.mark.parametrize("n_sites,seed", [(2, 0), (3, 1), (5, 2)])
def test_consensus_maximises_weighted_cka_to_sites(n_sites, seed):
    torch.manual_seed(seed)
    n = 16
    shared = torch.randn(n, 4, dtype=torch.float64)
    kernels = [centred_gram(shared + 0.8 * torch.randn(n, 4, dtype=torch.float64)) for _ in range(n_sites)]
    weights = (torch.rand(n_sites, dtype=torch.float64) + 0.2).tolist()
    consensus = GramConsensus(ema=0.0)
    for k, w in zip(kernels, weights):
        consensus.add("text", k, w)
    best = consensus.combine().double()
    best_score = weighted_cka(best, kernels, weights)
    # no site's own kernel, and no random perturbation of the consensus, does better
    for k in kernels:
        assert weighted_cka(k, kernels, weights) <= best_score + 1e-9
    for trial in range(50):
        noise = torch.randn(n, n, dtype=torch.float64)
        candidate = best + 0.05 * (trial % 5 + 1) * (noise + noise.T)
        assert weighted_cka(candidate, kernels, weights) <= best_score + 1e-9
    # and gradient ascent from a random start converges to the same score, not above it
    candidate = torch.randn(n, n, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([candidate], lr=0.05)
    for _ in range(300):
        loss = -weighted_cka(candidate + candidate.T, kernels, weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert -loss.item() <= best_score + 1e-6
    assert -loss.item() == pytest.approx(best_score.item(), abs=1e-3)


def test_consensus_weights_modalities_and_blends_with_previous_round():
    a, b = centred_gram(torch.randn(8, 3)), centred_gram(torch.randn(8, 3))
    only_a = GramConsensus({"text": 1.0, "codes": 0.0}, ema=0.0)
    only_a.add("text", a)
    only_a.add("codes", b)
    torch.testing.assert_close(only_a.combine(), a.float(), atol=1e-6, rtol=0)
    blended = GramConsensus(ema=0.5)
    blended.add("text", a)
    out = blended.combine(previous=b)
    assert 0 < cka(out, a) < 1 and 0 < cka(out, b) < 1


def _centred_unit(kernel):
    kernel = kernel - kernel.mean(0, keepdim=True)
    kernel = kernel - kernel.mean(1, keepdim=True)
    return kernel / kernel.norm()


@pytest.mark.parametrize("ema", [0.0, 0.25, 0.5, 0.9])
def test_consensus_ema_blends_the_previous_consensus_with_the_new_one(ema):
    """combine(previous) = normalise(ema * centre_normalise(previous) + (1 - ema) * K_new), K_new =
    normalise(sum_m beta_m normalise(sum_{k in m} w_k K_k)), each K_k centred and unit-norm; ema 0 ignores previous."""
    g = torch.Generator().manual_seed(7)
    n = 9
    sites = [("text", 0.7), ("text", 2.0), ("codes", 1.3)]
    kernels = [(lambda z: z @ z.T)(torch.randn(n, 3, generator=g, dtype=torch.float64)) for _ in sites]
    previous = torch.randn(n, n, generator=g, dtype=torch.float64)
    previous = previous + previous.T + 5.0  # neither centred nor unit-norm: combine must do both
    consensus = GramConsensus({"text": 1.0, "codes": 0.5}, ema=ema)
    for (modality, weight), kernel in zip(sites, kernels):
        consensus.add(modality, kernel, weight)
    text = 0.7 * _centred_unit(kernels[0]) + 2.0 * _centred_unit(kernels[1])
    codes = 1.3 * _centred_unit(kernels[2])
    new = 1.0 * text / text.norm() + 0.5 * codes / codes.norm()
    new = new / new.norm()
    expected = ema * _centred_unit(previous) + (1 - ema) * new
    expected = expected / expected.norm()
    torch.testing.assert_close(consensus.combine(previous).double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(consensus.combine().double(), new, atol=1e-6, rtol=0)  # the first round: no previous
    if ema > 0:
        assert (expected - new).abs().max() > 1e-3  # the previous consensus moved it


def test_consensus_refuses_bad_weights_and_empty_rounds():
    consensus = GramConsensus()
    with pytest.raises(ValueError, match="no kernels"):
        consensus.combine()
    with pytest.raises(ValueError, match="must be positive"):
        consensus.add("text", torch.eye(3), 0.0)


def test_anchor_info_nce_prefers_matching_targets():
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    matched = anchor_info_nce(z, z.clone(), 0.1)
    shuffled = anchor_info_nce(z, z[torch.randperm(16)], 0.1)
    assert matched < shuffled


def test_two_view_contrastive_is_low_for_identical_views():
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    other = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert two_view_contrastive(z, z, 0.1) < two_view_contrastive(z, other, 0.1)


def test_two_view_contrastive_treats_identical_items_as_positives():
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    z = torch.cat([z[:2], z[:1], z[3:]])  # items 0 and 2 are the same input
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert two_view_contrastive(z, z, 0.1, same) < two_view_contrastive(z, z, 0.1)
