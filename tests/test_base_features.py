"""Training-free base features, and the server's readout over them and the model: chosen on anchors, never on test pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedanchor.data.scenario import ModalitySpec
from fedanchor.federation import FederatedServer, SiteTrainer, make_split
from fedanchor.flare.executor import anchor_validation
from fedanchor.flare.server_state import selection_metric
from fedanchor.model.base_features import base_features
from fedanchor.model.homogeneous import build_model


@pytest.fixture(scope="module")
def text_and_codes_model():
    config = tiny_config()
    modalities = {"report": ModalitySpec("report", "text"),
                  "findings": ModalitySpec("findings", "codes", vocab=("normal", "cardiomegaly", "effusion"))}
    return build_model(config, modalities)


@pytest.mark.parametrize("modality,items,expected", [
    ("findings", [[0], [1, 2], [2]], np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=float)),
], ids=["codes-multi-hot"])
def test_code_sets_are_multi_hot(text_and_codes_model, modality, items, expected):
    np.testing.assert_array_equal(base_features(text_and_codes_model, modality, items), expected)


def test_arrays_are_their_raw_values_flattened():
    config = tiny_config()
    split = make_split(config)
    model = build_model(config, {m: d.spec for m, d in split.anchors.items()}, split.feature_stats)
    items = split.anchors["accel"].items[:5]
    np.testing.assert_array_equal(base_features(model, "accel", items), np.asarray(items, dtype=np.float64).reshape(5, -1))


def test_text_features_are_the_frozen_trunk_whatever_the_adapters_learnt(text_and_codes_model):
    """The base block must not move with training: it is what a consortium has without the federation."""
    model = text_and_codes_model
    texts = ["heart size normal. lungs clear.", "mild cardiomegaly with a small left effusion and more words here"]
    before = base_features(model, "report", texts)
    with torch.no_grad():
        for layer in model.adapters().values():
            layer.S.add_(0.5)
    after = base_features(model, "report", texts)
    tok = model.tokenizer("report").hf_tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        adapted = model.trunk(**tok).last_hidden_state
    with torch.no_grad():
        for layer in model.adapters().values():
            layer.S.zero_()
    np.testing.assert_allclose(before, after, atol=1e-6)
    mask = tok["attention_mask"].unsqueeze(-1).double()
    adapted_pooled = ((adapted.double() * mask).sum(1) / mask.sum(1)).numpy()
    assert not np.allclose(adapted_pooled, after, atol=1e-3), "the adapters did change the trunk, yet not the base features"
    assert before.shape == (2, model.trunk.config.hidden_size)


def test_base_features_refuse_a_lone_string(text_and_codes_model):
    with pytest.raises(TypeError, match="not one string"):
        base_features(text_and_codes_model, "report", "one report")


@pytest.fixture(scope="module")
def served():
    config = tiny_config()
    split = make_split(config)
    modalities = {m: d.spec for m, d in split.anchors.items()}
    with_test = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats, split.test)
    without_test = FederatedServer(config, modalities, split.anchors, split.anchor_fingerprint, split.feature_stats)
    return config, split, with_test, without_test


def test_the_readout_and_the_selection_metric_do_not_depend_on_the_test_pairs(served):
    _, _, with_test, without_test = served
    a, b = with_test.initial_state(), without_test.initial_state()
    for key in a.tensors:
        if key.startswith("readout/"):
            assert torch.equal(a.tensors[key], b.tensors[key]), key
    scored, unscored = with_test.evaluate(a), without_test.evaluate(b)
    assert any(k.endswith("/recall@10") for k in scored) and not any(k.endswith("/recall@10") for k in unscored)
    assert selection_metric(scored) == selection_metric(unscored) == pytest.approx(scored["anchor_cv/mrr"])
    assert unscored["readout/weight/base"] == 1.0 and "readout/weight/model" in unscored


def test_the_state_carries_every_modality_s_scored_anchors_for_the_sites(served):
    config, split, server, _ = served
    state = server.initial_state()
    scored = state.scored_anchors()
    assert set(scored) == set(split.anchors)
    for m, z in scored.items():
        assert z.shape[0] == len(split.anchors[m]) and torch.allclose(z.norm(dim=1), torch.ones(len(z)), atol=1e-2)
        assert state.tensors[f"readout/{m}/anchors"].dtype == torch.float16


def test_a_site_validates_in_the_readout_space_with_its_own_base_features(served):
    config, split, server, _ = served
    state = server.initial_state()
    modalities = {m: d.spec for m, d in split.anchors.items()}
    site, private = next(iter(split.private.items()))
    trainer = SiteTrainer(config, site, private, split.anchors[private.spec.name], split.anchor_fingerprint, modalities,
                          split.feature_stats)
    metrics = anchor_validation(trainer, state)
    other = next(m for m in split.anchors if m != private.spec.name)
    # The site's own anchors in the readout space meet the server's: a site sees the server's scores on the anchors.
    mine = state.scored_anchors()[private.spec.name]
    theirs = state.scored_anchors()[other]
    server_top1 = float(((mine @ theirs.T).argmax(1) == torch.arange(len(mine))).double().mean())
    assert metrics[f"anchor/{private.spec.name}->{other}/recall@1"] == pytest.approx(server_top1, abs=0.07)


def test_the_demo_s_anchors_only_figure_is_the_bench_s_anchors_only_cca(served):
    """What make demo prints beside fedanchor is the same fit as the bench's anchors-only rival on the same split."""
    from fedanchor.bench.rivals import cca_rival, frozen_features

    config, split, server, _ = served
    anchor_f, test_f, _, _ = frozen_features(config, split, seed=0)
    cfg = config.alignment
    rival, _ = cca_rival(anchor_f, test_f, split, folds=cfg.readout_folds, seed=config.adapter.seed, repeats=cfg.readout_repeats)
    demo = server.anchors_only_eval()
    for key in ("accel->gyro/recall@10", "gyro->accel/semantic_recall@1"):
        assert demo[key] == pytest.approx(rival[key])
    assert demo["accel->gyro/recall@10"] > demo["accel->gyro/chance_recall@10"]
