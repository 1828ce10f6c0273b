"""GeoLoRA: the function it computes, its basis, and why merging LoRA factors is not exact. The exactness of the
server's own merge in the shared basis is tested on FederatedServer rounds (test_federation.py, test_refresh.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fedanchor.adapters import GeoLoRALinear, inject_geolora

CASES = [  # d_in, d_out, rank, basis init
    (16, 16, 2, "svd"),
    (24, 12, 4, "random"),
    (12, 24, 3, "svd"),
]


@pytest.mark.parametrize("d_in,d_out,rank,init", CASES)
def test_identity_at_initialisation(d_in, d_out, rank, init):
    base = nn.Linear(d_in, d_out)
    layer = GeoLoRALinear(base, rank, init, torch.Generator().manual_seed(0))
    x = torch.randn(5, d_in)
    torch.testing.assert_close(layer(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out,rank,init", CASES)
def test_fast_forward_matches_dense_weight(d_in, d_out, rank, init):
    layer = GeoLoRALinear(nn.Linear(d_in, d_out), rank, init, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.S.normal_(std=0.3)
        layer.m.mul_(1.5)
        layer.delta.normal_(std=0.1)
    x = torch.randn(7, d_in)
    expected = x @ layer.dense_weight().T + layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out,rank,init", CASES)
def test_basis_is_orthonormal(d_in, d_out, rank, init):
    layer = GeoLoRALinear(nn.Linear(d_in, d_out), rank, init, torch.Generator().manual_seed(2))
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.V.T @ layer.V, torch.eye(rank), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_sites", [2, 3])
def test_averaging_peft_lora_factors_is_not_exact(n_sites):
    """What FedAvg on a PEFT adapter does: A and B averaged separately adds cross terms."""
    from peft import LoraConfig, get_peft_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(4)
    deltas, factors = [], []
    for _ in range(n_sites):
        peft_model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=4, target_modules=["proj"], lora_dropout=0.0))
        lora = peft_model.base_model.model.proj
        with torch.no_grad():
            lora.lora_A["default"].weight.normal_()
            lora.lora_B["default"].weight.normal_()
        a, b = lora.lora_A["default"].weight.clone(), lora.lora_B["default"].weight.clone()
        factors.append((a, b))
        deltas.append(b @ a * lora.scaling["default"])
    mean_a = torch.stack([a for a, _ in factors]).mean(0)
    mean_b = torch.stack([b for _, b in factors]).mean(0)
    averaged_factors = mean_b @ mean_a
    true_mean = torch.stack(deltas).mean(0)
    error = (averaged_factors - true_mean).norm() / true_mean.norm()
    assert error > 0.1, f"averaging LoRA factors should not reproduce the mean update (relative error {error:.3g})"


def test_inject_replaces_only_targets_and_fails_loudly_on_no_match():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    adapted = inject_geolora(model, ["2"], rank=2)
    assert list(adapted) == ["2"] and isinstance(model[2], GeoLoRALinear) and isinstance(model[0], nn.Linear)
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_geolora(nn.Sequential(nn.Linear(4, 4)), ["query"], rank=2)


def test_rank_above_layer_size_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        GeoLoRALinear(nn.Linear(4, 3), rank=5)
