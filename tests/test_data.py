"""Tests for fedanchor.data: bundled scenarios, the federated split, views, corruptions."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedanchor.data import (
    CORRUPTIONS,
    SCENARIOS,
    ModalityData,
    anchor_fingerprint,
    augment,
    corrupt,
    load_scenario,
    split_scenario,
)

# scenario -> (min items, {modality: (kind, shape)}, n semantic classes or None, sites, n_anchors, n_test)
CASES = {
    "xray": (3900, {"report": ("text", ()), "findings": ("codes", ())}, None,
             {"h1": "report", "h2": "findings", "h3": "report"}, 200, 500),
    "digits": (2000, {"pixels": ("image", (16, 15)), "zernike": ("vector", (47,))}, 10,
               {"a": "pixels", "b": "zernike", "c": "zernike"}, 100, 400),
    "motion": (80, {"accel": ("signal", (3, 100)), "gyro": ("signal", (3, 100))}, 4,
               {"s1": "accel", "s2": "gyro", "s3": "gyro"}, 10, 20),
}
EXACT_N = {"digits": 2000, "motion": 80}


def _split(name: str, seed: int = 0, cap: int | None = None):
    _, _, _, sites, n_anchors, n_test = CASES[name]
    return split_scenario(load_scenario(name), sites, n_anchors, n_test, seed, max_private_per_site=cap)


def _items_equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return list(a) == list(b)


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_shapes_kinds_lengths(name):
    min_n, modalities, n_classes, *_ = CASES[name]
    s = load_scenario(name)
    assert s.name == name and list(s.modalities) == list(modalities)
    assert len(s) >= min_n and len(s) == EXACT_N.get(name, len(s))
    assert s.licence and "\n" not in s.licence
    for m, (kind, shape) in modalities.items():
        d = s.data[m]
        assert d.spec.kind == kind and d.spec.shape == shape and len(d) == len(s)
        assert d.sample_ids == s.data[next(iter(s.data))].sample_ids
        assert d.semantic_labels.dtype == np.int64
        assert d.semantic_labels.min() >= 0 and d.semantic_labels.max() < len(s.semantic_names)
        if kind == "text":
            assert all(isinstance(t, str) and t and "  " not in t for t in d.items)
        elif kind == "codes":
            assert all(c and list(c) == sorted(set(c)) and max(c) < len(d.spec.vocab) for c in d.items)
        else:
            assert d.items.dtype == np.float32 and d.items.shape == (len(s), *shape)
    if n_classes is not None:
        assert len(s.semantic_names) == n_classes
    assert load_scenario(name) is s  # cached


def test_xray_codes_and_semantics():
    s = load_scenario("xray")
    vocab = s.modalities["findings"].vocab
    assert list(vocab) == sorted(vocab) and "normal" in vocab and "cardiomegaly" in vocab
    assert all(v == v.lower().strip() and "/" not in v for v in vocab)
    assert s.data["report"].sample_ids[0].startswith("CXR")
    # The semantic label is exactly the code set.
    for codes, label in zip(s.data["findings"].items[:500], s.data["findings"].semantic_labels[:500]):
        assert s.semantic_names[label] == "|".join(vocab[c] for c in codes)


def test_unknown_scenario():
    with pytest.raises(ValueError, match="unknown scenario 'mnist'.*xray"):
        load_scenario("mnist")


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("cap", [None, 7])
def test_split_disjoint_and_complete(name, cap):
    s = load_scenario(name)
    _, _, _, sites, n_anchors, n_test = CASES[name]
    sp = _split(name, cap=cap)
    assert sp.site_modality == dict(sites) and set(sp.private) == set(sites)
    anchor_ids = set(sp.anchors[next(iter(sp.anchors))].sample_ids)
    test_ids = set(sp.test[next(iter(sp.test))].sample_ids)
    assert len(anchor_ids) == n_anchors and len(test_ids) == n_test
    for group in (sp.anchors, sp.test):
        assert list(group) == list(s.modalities)
        ids = [d.sample_ids for d in group.values()]
        assert all(i == ids[0] for i in ids)  # paired
    site_ids = {site: set(d.sample_ids) for site, d in sp.private.items()}
    all_sets = [anchor_ids, test_ids, *site_ids.values()]
    assert sum(map(len, all_sets)) == len(set().union(*all_sets))  # pairwise disjoint
    for site, d in sp.private.items():
        assert d.spec.name == sites[site]
    sizes = [len(d) for d in sp.private.values()]
    left = len(s) - n_anchors - n_test
    if cap is None:
        assert sum(sizes) == left and max(sizes) - min(sizes) <= 1
        assert set().union(*all_sets) == set(s.data[next(iter(s.data))].sample_ids)
    else:
        assert sizes == [min(cap, len(range(k, left, len(sites)))) for k in range(len(sites))]


@pytest.mark.parametrize("name", SCENARIOS)
def test_split_rows_match_scenario(name):
    s = load_scenario(name)
    sp = _split(name)
    row = {sid: i for i, sid in enumerate(s.data[next(iter(s.data))].sample_ids)}
    for site, d in sp.private.items():
        ref = s.data[d.spec.name].subset([row[i] for i in d.sample_ids])
        assert _items_equal(d.items, ref.items)
        assert np.array_equal(d.semantic_labels, ref.semantic_labels)


@pytest.mark.parametrize("name", SCENARIOS)
def test_split_deterministic_and_fingerprint(name):
    a, b, c = _split(name, seed=3), _split(name, seed=3), _split(name, seed=4)
    assert a.anchor_fingerprint == b.anchor_fingerprint == anchor_fingerprint(a.anchors)
    assert len(a.anchor_fingerprint) == 64
    for site in a.private:
        assert a.private[site].sample_ids == b.private[site].sample_ids
        assert _items_equal(a.private[site].items, b.private[site].items)
    assert a.anchor_fingerprint != c.anchor_fingerprint

    changed = copy.deepcopy(a.anchors)
    first = next(iter(changed))
    d = changed[first]
    if isinstance(d.items, np.ndarray):
        d.items[0].flat[0] += 1.0
    elif d.spec.kind == "text":
        d.items[0] = d.items[0] + " extra"
    else:
        d.items[0] = tuple(sorted(set(d.items[0]) ^ {0}))
    assert anchor_fingerprint(changed) != a.anchor_fingerprint
    assert anchor_fingerprint(a.anchors) == a.anchor_fingerprint  # original untouched


@pytest.mark.parametrize("name", SCENARIOS)
def test_feature_stats_from_anchors_only(name):
    sp = _split(name)
    expected_axes = {"vector": (0,), "image": (0, 1, 2), "signal": (0, 2)}
    arrays = [m for m, d in sp.anchors.items() if d.spec.is_array]
    assert sorted(sp.feature_stats) == sorted(arrays)
    for m in arrays:
        x = sp.anchors[m].items.astype(np.float64)
        axes = expected_axes[sp.anchors[m].spec.kind]
        mean, std = sp.feature_stats[m]
        np.testing.assert_allclose(mean, x.mean(axis=axes, keepdims=True)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(std, np.maximum(x.std(axis=axes, keepdims=True)[0], 1e-6), rtol=1e-5, atol=1e-5)
        assert np.all(std >= 1e-6)
        np.broadcast_shapes(mean.shape, sp.anchors[m].spec.shape)  # broadcastable to one item
        full = load_scenario(name).data[m].items.astype(np.float64)
        assert not np.allclose(mean, full.mean(axis=axes, keepdims=True)[0], rtol=1e-4, atol=1e-6)


THREE_SITES = {"h1": "report", "h2": "findings", "h3": "report"}
BAD_ARGS = [
    ({"h1": "image"}, 200, 500, 0, None, r"site 'h1'.*'image'.*\['report', 'findings'\]"),
    ({}, 200, 500, 0, None, "non-empty mapping"),
    ({"": "report"}, 200, 500, 0, None, "empty"),
    ({"a": "report", "a ": "findings"}, 200, 500, 0, None, "unique"),
    ({"h1": "report"}, 1, 500, 0, None, "n_anchors=1"),
    ({"h1": "report"}, 200, 0, 0, None, "n_test=0"),
    (THREE_SITES, 2000, 1925, 0, None, r"leaves 2 of 3927 samples for 3 sites.*lower n_test or n_anchors"),
    ({"h1": "report"}, 200, 500, -1, None, "seed=-1"),
    ({"h1": "report"}, 200, 500, 0, 0, "max_private_per_site=0"),
    ({"h1": "report"}, 200.0, 500, 0, None, "n_anchors must be an integer"),
]


@pytest.mark.parametrize("sites,n_anchors,n_test,seed,cap,match", BAD_ARGS)
def test_split_bad_arguments(sites, n_anchors, n_test, seed, cap, match):
    with pytest.raises(ValueError, match=match):
        split_scenario(load_scenario("xray"), sites, n_anchors, n_test, seed, max_private_per_site=cap)


@pytest.mark.parametrize("name", SCENARIOS)
def test_augment_types_shapes_and_difference(name):
    s = load_scenario(name)
    for m, d in s.data.items():
        batch = d.subset(np.arange(64))
        before = copy.deepcopy(batch.items)
        a = augment(d.spec, batch.items, np.random.default_rng(0))
        b = augment(d.spec, batch.items, np.random.default_rng(1))
        assert _items_equal(batch.items, before)  # input untouched
        assert type(a) is type(batch.items) and len(a) == len(batch)
        if isinstance(a, np.ndarray):
            assert a.shape == batch.items.shape and a.dtype == batch.items.dtype
            one = augment(d.spec, batch.items[0], np.random.default_rng(0))
            assert one.shape == d.spec.shape
        elif d.spec.kind == "text":
            assert all(isinstance(t, str) and len(t.split()) >= min(3, len(o.split())) for t, o in zip(a, batch.items))
            assert all(set(t.split()) <= set(o.split()) for t, o in zip(a, batch.items))
        else:
            assert all(isinstance(c, tuple) and c and list(c) == sorted(set(c)) for c in a)
        assert not _items_equal(a, batch.items) and not _items_equal(a, b)
        same = augment(d.spec, batch.items, np.random.default_rng(0))
        assert _items_equal(a, same)  # same generator state, same view
        assert _items_equal(augment(d.spec, batch.items, np.random.default_rng(0), strength=0.0), batch.items)


def test_augment_bad_strength():
    spec = load_scenario("motion").modalities["accel"]
    with pytest.raises(ValueError, match="strength=-1.0"):
        augment(spec, np.zeros((2, 3, 100), np.float32), np.random.default_rng(0), strength=-1)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("mode", CORRUPTIONS)
def test_corrupt_changes_copy_only(name, mode):
    sp = _split(name, cap=200)
    for site, d in sp.private.items():
        before = copy.deepcopy(d)
        out = corrupt(d, mode, 1.0, seed=5)
        assert isinstance(out, ModalityData) and out is not d and out.spec == d.spec
        kept = len(out) if mode == "small" else len(d)  # a small site keeps its first items, unchanged
        assert kept < len(d) if mode == "small" else True
        assert out.sample_ids == d.sample_ids[:kept] and np.array_equal(out.semantic_labels, d.semantic_labels[:kept])
        assert len(out) == kept and type(out.items) is type(d.items)
        if isinstance(out.items, np.ndarray):
            assert out.items.shape == (kept, *d.items.shape[1:]) and out.items.dtype == d.items.dtype
        assert not _items_equal(out.items, d.items)
        assert _items_equal(d.items, before.items) and d.sample_ids == before.sample_ids
        assert _items_equal(corrupt(d, mode, 1.0, seed=5).items, out.items)  # deterministic
        assert _items_equal(corrupt(d, mode, 0.0, seed=5).items, d.items)  # severity 0 is a no-op


def test_corrupt_unknown_mode():
    d = load_scenario("motion").data["gyro"]
    with pytest.raises(ValueError, match="unknown corruption mode 'smudge'.*noise"):
        corrupt(d, "smudge", 1.0, 0)


def test_cached_scenario_is_read_only():
    d = load_scenario("digits").data["zernike"]
    with pytest.raises(ValueError):
        d.items[0, 0] = 1.0
    sub = d.subset([0, 1])
    sub.items[0, 0] = 123.0  # subsets are writable copies
    assert d.items[0, 0] != 123.0
