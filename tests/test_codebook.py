"""The private codebook (alignment/codebook.py): what leaves a site, how the server pools it, what the readout reads."""
import numpy as np
import pytest
import torch

from fedanchor.alignment.codebook import (ANCHOR_FORMS, FORM_CODES, FORMS, Codebook, CodebookProjection, assignment_scale, choose_anchor_codebooks,
                                          form_of_code, forms, kmeans, pool_centroids, site_centroids, soft_assignments,
                                          squared_distances, anchor_codebook)
from fedanchor.alignment.readout_choice import choose_readout, concatenated


def blobs(n_per: int, centres: np.ndarray, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), n_per)
    return centres[labels] + spread * rng.normal(size=(len(labels), centres.shape[1])), labels


def test_kmeans_finds_separated_clusters_and_weights_move_the_means():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points, labels = blobs(30, centres, 0.1, seed=0)
    found, assign = kmeans(points, 3, seed=0)
    # Each true cluster maps to one found centre, within the noise.
    for j in range(3):
        assert len(set(assign[labels == j])) == 1
        assert np.abs(found[assign[labels == j][0]] - centres[j]).max() < 0.1
    two = np.array([[0.0], [1.0]])
    assert kmeans(two, 1, weights=np.array([3.0, 1.0]))[0][0, 0] == pytest.approx(0.25)


@pytest.mark.parametrize("n, size, min_cluster, clusters", [
    (100, 160, 5, 20),  # about min_cluster items per cluster
    (100, 8, 5, 8),  # at most size
    (4, 160, 5, 0),  # too few items: nothing leaves
])
def test_site_centroids_average_at_least_min_cluster_items(n, size, min_cluster, clusters):
    points = np.random.default_rng(1).normal(size=(n, 3))
    centroids, counts = site_centroids(points, size, min_cluster)
    assert len(centroids) == len(counts) <= clusters
    assert (counts >= min_cluster).all()
    if clusters:  # small k-means clusters are dissolved into their neighbours: every item still counts
        assert counts.sum() == n and len(counts) >= 1 and centroids.shape[1] == 3


def test_site_centroids_refuse_single_record_clusters():
    with pytest.raises(ValueError, match="min_cluster=1.*one record"):
        site_centroids(np.zeros((10, 2)), min_cluster=1)


def test_pooling_keeps_every_centroid_under_the_size_and_clusters_them_above_it():
    a = (np.array([[0.0], [1.0]]), np.array([5.0, 5.0]))
    b = (np.array([[10.0]]), np.array([20.0]))
    assert pool_centroids([a, b], size=3).shape == (3, 1)
    pooled = np.sort(pool_centroids([a, b], size=2, seed=0)[:, 0])
    assert pooled == pytest.approx([0.5, 10.0])
    with pytest.raises(ValueError, match="no site sent"):
        pool_centroids([(np.zeros((0, 1)), np.zeros(0))])


def test_the_projection_standardises_on_the_anchors_and_keeps_leading_components():
    rng = np.random.default_rng(2)
    anchors = rng.normal(size=(50, 6)) * np.array([100.0, 1, 1, 1, 1, 0])  # one huge feature, one constant
    projection = CodebookProjection.fit(anchors, components=3)
    z = projection(anchors)
    assert z.shape == (50, 3)
    assert np.abs(z.mean(0)).max() < 1e-9
    assert np.isfinite(projection.linear).all()  # the constant feature does not divide by zero
    assert CodebookProjection.fit(anchors[:4], components=40).linear.shape[1] == 3  # at most anchors - 1


def test_soft_assignments_are_distributions_that_sharpen_with_a_smaller_scale():
    centres = np.array([[0.0], [1.0]])
    x = np.array([[0.2]])
    soft, sharp = soft_assignments(x, centres, 1.0), soft_assignments(x, centres, 0.01)
    assert soft.sum() == pytest.approx(1.0) and sharp.sum() == pytest.approx(1.0)
    assert 0.5 < soft[0, 0] < sharp[0, 0]
    assert assignment_scale(np.array([[0.0], [2.0]]), centres, temperature=0.5) == pytest.approx(0.5 * np.median([0, 1, 4, 1]))


def test_a_codebook_block_is_the_assignment_and_its_point_on_the_manifold():
    projection = CodebookProjection(np.zeros(2), np.eye(2))
    book = Codebook(projection, np.array([[0.0, 0.0], [4.0, 0.0]]), scale=0.01)
    out = book(np.array([[3.9, 0.0]]))
    assert out.shape == (1, 4)
    assert out[0, :2] == pytest.approx([0.0, 1.0], abs=1e-6)
    assert out[0, 2:] == pytest.approx([4.0, 0.0], abs=1e-5)


def test_private_centroids_give_the_readout_what_the_anchors_alone_cannot():
    """Two modalities whose shared signal is a nonlinear function (which of many clusters an item is in): a
    hundred anchors alone cannot place the clusters, a codebook fitted on plentiful private items can; the readout
    chooses the block by anchor cross-validation and retrieves held-out partners better with it."""
    rng = np.random.default_rng(3)
    k, dim = 24, 6
    centres_a, centres_b = rng.normal(size=(k, dim)) * 3, rng.normal(size=(k, dim)) * 3

    def pairs(n: int):
        label = rng.integers(k, size=n)
        return (centres_a[label] + rng.normal(size=(n, dim)), centres_b[label] + rng.normal(size=(n, dim)))

    anchors, test, private = pairs(60), pairs(200), pairs(2000)
    books = {}
    for m, (a, p) in enumerate(zip(anchors, private)):
        projection = CodebookProjection.fit(a, components=dim)
        centroids, counts = site_centroids(projection(p), size=48, min_cluster=5, seed=0)
        centres = pool_centroids([(centroids, counts)], size=48)
        books[m] = Codebook(projection, centres, assignment_scale(projection(a), centres))

    def recall(blocks_of):
        readout, choice = choose_readout({m: blocks_of(m, anchors[m]) for m in books}, seed=0, repeats=1)
        z = {m: readout.apply(m, torch.from_numpy(x)) for m, x in concatenated({m: blocks_of(m, test[m]) for m in books}).items()}
        sims = torch.nn.functional.normalize(z[0], dim=-1) @ torch.nn.functional.normalize(z[1], dim=-1).T
        hits = (sims.topk(10, dim=1).indices == torch.arange(len(sims))[:, None]).any(1)
        return float(hits.float().mean()), choice

    plain, _ = recall(lambda m, x: {"base": x})
    with_book, choice = recall(lambda m, x: {"base": x, "codebook": books[m](x)})
    assert choice.weights["codebook"] > 0
    assert with_book > plain + 0.02


def preferring(index: int):
    """A score that ranks the ``index``-th candidate it is asked about best, and records every candidate."""
    seen = []

    def score(books):
        seen.append(books)
        return -abs(len(seen) - 1 - index), 0.0
    return score, seen


def test_the_anchor_codebook_is_chosen_by_the_score():
    rng = np.random.default_rng(5)
    anchor_base = {"a": rng.normal(size=(50, 4)), "b": rng.normal(size=(50, 3))}
    projections = {m: CodebookProjection.fit(x, components=3) for m, x in anchor_base.items()}
    pick = len(ANCHOR_FORMS) + 3  # candidates: 5, 10 (N/10, N/5) then all 50 anchors as centres, each in every form
    score, seen = preferring(pick)
    anchor_books, chosen = choose_anchor_codebooks(projections, anchor_base, score)
    temperature, form = ANCHOR_FORMS[3]
    assert len(seen) == 3 * len(ANCHOR_FORMS) and {f for _, f in ANCHOR_FORMS} == set(FORM_CODES)
    assert (chosen["centroids"], chosen["temperature"], chosen["form"]) == (10, temperature, FORM_CODES[form])
    assert anchor_books is seen[pick] and len(anchor_books["b"].centres) == 10 and anchor_books["b"].form == form
    everyone = seen[2 * len(ANCHOR_FORMS)]["a"]  # the third size: every anchor is a centre, not a k-means of them
    assert everyone.centres == pytest.approx(projections["a"](anchor_base["a"]))


@pytest.mark.parametrize("form", sorted(FORM_CODES))
def test_a_codebook_travels_in_the_global_state_and_reads_back_the_same_block(form):
    from fedanchor.federation.messages import CODEBOOK_PREFIX, GlobalState
    rng = np.random.default_rng(6)
    anchors = rng.normal(size=(30, 4))
    projection = CodebookProjection.fit(anchors, components=3)
    book = Codebook(projection, rng.normal(size=(8, 3)), scale=0.7, form=form)
    tensors = {f"{CODEBOOK_PREFIX}x/mean": torch.from_numpy(projection.mean).float(),
               f"{CODEBOOK_PREFIX}x/linear": torch.from_numpy(projection.linear).float(),
               f"{CODEBOOK_PREFIX}x/centres": torch.from_numpy(book.centres).float(),
               f"{CODEBOOK_PREFIX}x/scale": torch.tensor([book.scale]),
               f"{CODEBOOK_PREFIX}x/form": torch.tensor([FORM_CODES[form]])}
    back = GlobalState(1, "fingerprint", tensors).codebooks()["x"]
    assert back(anchors).shape == (30, 8 + 3 * (form == "assignment+position"))
    assert back.form == form and back(anchors) == pytest.approx(book(anchors), abs=1e-3)


def test_the_kernel_form_whitens_its_landmarks_and_does_not_depend_on_their_order():
    """At the centres themselves the whitened kernel features are K K^(-1/2) = K^(1/2): their Gram is K. Reordering
    the centres permutes the features, and the Gram of any items is unchanged (what the readout sees)."""
    rng = np.random.default_rng(8)
    projection = CodebookProjection(np.zeros(3), np.eye(3))
    centres = rng.normal(size=(6, 3))
    book = Codebook(projection, centres, scale=2.0, form="kernel")
    features = book(centres)
    kernel = np.exp(-squared_distances(centres, centres) / 2.0)
    assert features @ features.T == pytest.approx(kernel, abs=1e-6)
    items = rng.normal(size=(10, 3))
    order = rng.permutation(6)
    shuffled = Codebook(projection, centres[order], scale=2.0, form="kernel")
    assert shuffled(items) @ shuffled(items).T == pytest.approx(book(items) @ book(items).T, abs=1e-8)


def test_an_unknown_codebook_form_is_refused_with_the_known_ones():
    projection = CodebookProjection(np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="unknown; use one of"):
        Codebook(projection, np.zeros((2, 2)), scale=1.0, form="spline")
    with pytest.raises(ValueError, match="newer fedanchor"):
        form_of_code(7.0)


def test_a_fixed_temperature_still_leaves_the_position_part_to_cross_validation():
    assert forms(0.4) == ((0.4, "assignment+position"), (0.4, "assignment")) and forms(0.0) == FORMS
    assert all(form != "kernel" for _, form in FORMS)  # the private codebook's choice leaves the kernel out


@pytest.mark.parametrize("flag, form", [(None, "assignment+position"), (1.0, "assignment+position"), (0.0, "assignment")])
def test_a_state_from_before_the_kernel_form_reads_its_codebook_as_written(flag, form):
    from fedanchor.federation.messages import CODEBOOK_PREFIX, GlobalState
    rng = np.random.default_rng(7)
    anchors = rng.normal(size=(20, 4))
    projection = CodebookProjection.fit(anchors, components=3)
    centres = rng.normal(size=(5, 3))
    tensors = {f"{CODEBOOK_PREFIX}x/mean": torch.from_numpy(projection.mean).float(),
               f"{CODEBOOK_PREFIX}x/linear": torch.from_numpy(projection.linear).float(),
               f"{CODEBOOK_PREFIX}x/centres": torch.from_numpy(centres).float(),
               f"{CODEBOOK_PREFIX}x/scale": torch.tensor([0.5])}
    if flag is not None:  # the older 0/1 position flag; None: written before forms were chosen at all
        tensors[f"{CODEBOOK_PREFIX}x/position"] = torch.tensor([flag])
    book = GlobalState(1, "fingerprint", tensors).codebooks()["x"]
    assert book.form == form and book(anchors).shape == (20, 5 + 3 * (form == "assignment+position"))


def test_every_anchor_as_a_centre_counts_repeated_items_once():
    """Identical anchors (the same code set twice) would give the block identical columns: one centre each."""
    anchor_base = np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    projection = CodebookProjection(np.zeros(2), np.eye(2))
    book = anchor_codebook(projection, anchor_base, len(anchor_base), 1.0, "kernel")
    assert book.centres.tolist() == [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]
