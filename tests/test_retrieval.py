"""engine.retrieval: the hierarchical vote against a plain loop written from its definition, the tie rules one by
one, and retrieve() over a search index."""

import math

import numpy as np
import pytest

from engine.errors import InputError
from engine import ops, reference
from engine.retrieval import atom_rows, atom_shares, retrieve, superpixel_classes, unsure_atoms
from engine.search import ExactIndex


@pytest.fixture(params=["compiled", "reference"])
def vote(request):
    """The compiled vote (engine.ops, the CPU launcher of csrc/vote) and its NumPy twin (engine.reference)."""
    return {"compiled": ops.vote, "reference": reference.vote}[request.param]


METHODS = ["count", "balanced", "weighted", "softmax"]


def vote_loop(similarities, labels, num_classes, method="count", class_counts=None, temperature=0.03):
    """Per query: score, then summed similarity, then first rank; confidence = mean similarity of the winner."""
    classes, confidences = [], []
    for sims, labs in zip(similarities, labels):
        valid = [float(s) for s, c in zip(sims, labs) if c >= 0]
        top = max(valid, default=0.0)
        stats = {}
        for rank, (s, c) in enumerate(zip(sims, labs)):
            if c < 0:
                continue
            count, total, soft, first = stats.get(c, (0, 0.0, 0.0, rank))
            stats[c] = (count + 1, total + float(s), soft + math.exp((float(s) - top) / temperature), first)
        if not stats:
            classes.append(0)
            confidences.append(0.0)
            continue

        def key(c):
            count, total, soft, first = stats[c]
            score = {"count": count, "weighted": total, "softmax": soft,
                     "balanced": count / max(class_counts[c], 1) if class_counts is not None else None}[method]
            return (score, total, -first)

        best = max(stats, key=key)
        classes.append(best)
        confidences.append(stats[best][1] / stats[best][0])
    return np.array(classes), np.array(confidences, np.float32)


def random_neighbours(rng):
    """(Q, K) best-first similarities, neighbour classes (-1 = no result), class count and bank counts."""
    queries, k, num_classes = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 8))
    labels = rng.integers(-1, num_classes, (queries, k))
    # Coarse similarities make ties in summed similarity common.
    similarities = -np.sort(-rng.integers(0, 4, (queries, k)) / 4.0, axis=1).astype(np.float32)
    return similarities, labels, num_classes, rng.integers(1, 10, num_classes)


@pytest.mark.parametrize("method", METHODS)
def test_vote_matches_loop_on_random_inputs(rng, method, vote):
    for temperature in (0.25, 0.03):  # 0.25: the coarse similarities' exponents are whole, ties stay exact
        for _ in range(50):
            similarities, labels, num_classes, counts = random_neighbours(rng)
            got = vote(similarities, labels, num_classes, method, counts, temperature=temperature)
            want = vote_loop(similarities, labels, num_classes, method, counts, temperature)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.01, 0.03, 0.1, 1.0])
def test_softmax_vote_matches_loop_on_continuous_similarities(rng, temperature, vote):
    for _ in range(30):
        queries, k, num_classes = int(rng.integers(1, 40)), int(rng.integers(1, 30)), int(rng.integers(1, 8))
        labels = rng.integers(-1, num_classes, (queries, k))
        similarities = -np.sort(-rng.uniform(-0.2, 1.0, (queries, k)), axis=1).astype(np.float32)
        got = vote(similarities, labels, num_classes, "softmax", temperature=temperature)
        want = vote_loop(similarities, labels, num_classes, "softmax", temperature=temperature)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


def test_most_neighbours_wins(vote):
    classes, confidence = vote([[0.9, 0.8, 0.7]], [[1, 2, 2]], 3)
    assert classes[0] == 2 and confidence[0] == pytest.approx(0.75)


def test_count_tie_goes_to_larger_summed_similarity(vote):
    classes, confidence = vote([[0.9, 0.8, 0.7, 0.1]], [[1, 2, 2, 1]], 3)
    assert classes[0] == 2 and confidence[0] == pytest.approx(0.75)


def test_exact_tie_goes_to_first_in_rank_order(vote):
    classes, _ = vote([[0.5, 0.5, 0.5, 0.5]], [[2, 1, 1, 2]], 3)
    assert classes[0] == 2
    classes, _ = vote([[0.5, 0.5, 0.5, 0.5]], [[1, 2, 2, 1]], 3)
    assert classes[0] == 1


def test_balanced_vote_divides_by_bank_count(vote):
    # Background (0) has 3 of 4 neighbours but 100 bank vectors; class 1 has 1 neighbour of its 2 vectors.
    sims, labels = [[0.9, 0.8, 0.7, 0.6]], [[0, 0, 1, 0]]
    assert vote(sims, labels, 2, "count", [100, 2])[0][0] == 0
    classes, confidence = vote(sims, labels, 2, "balanced", [100, 2])
    assert classes[0] == 1 and confidence[0] == pytest.approx(0.7)


def test_weighted_vote_sums_similarities(vote):
    # Class 2 has more neighbours (count wins) but class 1's single neighbour is far closer than both.
    sims, labels = [[0.9, 0.3, 0.3]], [[1, 2, 2]]
    assert vote(sims, labels, 3, "count")[0][0] == 2
    classes, confidence = vote(sims, labels, 3, "weighted")
    assert classes[0] == 1 and confidence[0] == pytest.approx(0.9)
    # Equal summed similarity: the class first in rank order wins.
    assert vote([[0.6, 0.3, 0.3]], [[1, 2, 2]], 3, "weighted")[0][0] == 1
    assert vote([[0.3, 0.6, 0.3]], [[2, 1, 2]], 3, "weighted")[0][0] == 2


def test_softmax_vote_weighs_neighbours_by_distance_from_the_nearest(vote):
    # One close neighbour of class 1 against two of class 2 a tenth farther: a small temperature lets the nearest
    # decide, a large one counts neighbours.
    sims, labels = [[0.9, 0.8, 0.8]], [[1, 2, 2]]
    classes, confidence = vote(sims, labels, 3, "softmax", temperature=0.03)
    assert classes[0] == 1 and confidence[0] == pytest.approx(0.9)
    assert vote(sims, labels, 3, "softmax", temperature=1.0)[0][0] == 2
    # exp(-0.1 / T) * 2 = 1 at T = 0.1 / ln 2: a tie in score, then the larger summed similarity wins
    assert vote(sims, labels, 3, "softmax", temperature=0.08)[0][0] == 1
    assert vote(sims, labels, 3, "softmax", temperature=0.3)[0][0] == 2
    # far below the nearest, exp underflows to 0 for every neighbour but the nearest's class: no NaN, no overflow
    classes, confidence = vote([[1.0, -1.0, -1.0, -1.0]], [[2, 1, 1, 1]], 3, "softmax", temperature=1e-3)
    assert classes[0] == 2 and confidence[0] == pytest.approx(1.0)


def test_softmax_vote_skips_missing_results_for_the_nearest(vote):
    # the first slot is the search's "no result" (-1): the nearest is the best valid neighbour
    classes, confidence = vote([[0.99, 0.5, 0.4, 0.4]], [[-1, 1, 2, 2]], 3, "softmax", temperature=0.03)
    assert classes[0] == 1 and confidence[0] == pytest.approx(0.5)


def test_no_valid_neighbour_is_background_with_zero_confidence(vote):
    classes, confidence = vote([[0.0, 0.0]], [[-1, -1]], 3)
    assert classes[0] == 0 and confidence[0] == 0


def test_empty_and_bad_inputs(vote):
    classes, confidence = vote(np.zeros((0, 5)), np.zeros((0, 5), int), 3)
    assert classes.shape == (0,) and confidence.shape == (0,)
    with pytest.raises(InputError):
        vote(np.zeros((2, 3)), np.zeros((2, 4), int), 3)
    with pytest.raises(InputError):
        vote(np.zeros((1, 1)), np.zeros((1, 1), int), 3, "majority")
    for temperature in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="temperature"):
            vote(np.zeros((1, 1)), np.zeros((1, 1), int), 3, "softmax", temperature=temperature)


@pytest.mark.parametrize("method", METHODS)
def test_retrieve_is_search_then_vote(rng, method):
    vectors = rng.integers(-2, 3, (60, 6)).astype(np.float32)  # integers: exact ties in the search too
    labels = rng.integers(0, 4, 60)
    index = ExactIndex(vectors, labels, num_classes=5)
    queries = rng.integers(-2, 3, (25, 6)).astype(np.float32)
    classes, confidences = retrieve(index, queries, 7, method)
    sims, rows = index.search(queries, 7)
    want = vote_loop(sims, labels[rows], 5, method, index.class_counts)
    assert classes.dtype == np.int32 and confidences.dtype == np.float32 and classes.shape == (25,)
    np.testing.assert_array_equal(classes, want[0])
    np.testing.assert_allclose(confidences, want[1], rtol=1e-6)


def test_retrieve_names_regions_by_their_nearest_bank_vectors(vote):
    vectors = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.95, 0.05], [0, 0, 1]], np.float32)
    index = ExactIndex(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [1, 1, 2, 2, 0], num_classes=3)
    classes, confidences = retrieve(index, np.array([[1, 0.05, 0], [0.02, 1, 0], [0, 0, 1]], np.float32), 2)
    assert classes.tolist() == [1, 2, 0]  # the last: one background and one class-2 neighbour, background closer
    assert confidences[0] > 0.99 and confidences[1] > 0.99
    assert retrieve(index, np.zeros((0, 3), np.float32), 2)[0].shape == (0,)
    with pytest.raises(InputError, match="balanced vote needs"):
        vote([[0.5]], [[1]], 3, "balanced")


def shares_loop(similarities, labels, num_classes, method, class_counts=None, temperature=0.07):
    """Per query: each class's vote score (count, count / bank size, summed similarity, or sum of exp((s - s_max) /
    T) with s_max the best valid neighbour's), over the valid neighbours, divided by the scores' sum."""
    out = np.zeros((len(labels), num_classes))
    for q, (sims, labs) in enumerate(zip(similarities, labels)):
        valid = [(float(s), int(c)) for s, c in zip(sims, labs) if 0 <= c < num_classes]
        if not valid:
            continue
        top = max(s for s, _ in valid)
        for s, c in valid:
            out[q, c] += {"count": 1.0, "balanced": 1.0 / max(class_counts[c], 1) if class_counts is not None else 0,
                          "weighted": s, "softmax": math.exp((s - top) / temperature)}[method]
        out[q] /= out[q].sum()
    return out


@pytest.mark.parametrize("method", METHODS)
def test_vote_shares_match_loop_on_random_inputs(rng, method, vote):
    for _ in range(20):
        similarities, labels, num_classes, counts = random_neighbours(rng)
        similarities = similarities + rng.random(similarities.shape).astype(np.float32) * 0.01 + 0.05
        similarities = -np.sort(-similarities, axis=1)
        want = shares_loop(similarities, labels, num_classes, method, counts, 0.05)
        classes, confidences, got = vote(similarities, labels, num_classes, method, counts, temperature=0.05,
                                         shares=True)
        assert got.shape == (len(labels), num_classes) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        answered = (labels >= 0).any(axis=1)
        np.testing.assert_allclose(got.sum(axis=1), answered.astype(float), rtol=1e-5)
        # the shares come with the same vote
        plain = vote(similarities, labels, num_classes, method, counts, temperature=0.05)
        np.testing.assert_array_equal(classes, plain[0])
        np.testing.assert_array_equal(confidences, plain[1])


def test_vote_shares_of_missing_neighbours_and_no_queries(vote):
    """A search's missing results (-1, similarity -inf) weigh nothing; no query, no rows."""
    sims = np.array([[0.9, 0.5, -np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    labels = np.array([[2, 1, -1], [-1, -1, -1]])
    got = vote(sims, labels, 3, "softmax", temperature=0.1, shares=True)[2]
    want = np.exp([0.0, -4.0]) / np.exp([0.0, -4.0]).sum()
    np.testing.assert_allclose(got, [[0, want[1], want[0]], [0, 0, 0]], rtol=1e-6)
    assert np.isfinite(vote(sims, labels, 3, "weighted", shares=True)[2]).all()
    none = vote(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.int64), 5, "count", shares=True)
    assert [x.shape for x in none] == [(0,), (0,), (0, 5)]


def superpixel_loop(members, shares, own=None):
    """Per atom: the class of largest share summed over the candidates containing it (plus `own[atom]`, its own
    query's shares, where given), the smaller class on a tie; -1 where that sum is all zero (no share)."""
    out = []
    for atom in range(members.shape[1]):
        totals = shares[np.flatnonzero(members[:, atom])].astype(np.float64).sum(axis=0)
        if own is not None and own[atom] is not None:
            totals = totals + own[atom]
        out.append(int(np.flatnonzero(totals == totals.max())[0]) if totals.sum() != 0 else -1)
    return np.array(out)


def unsure_loop(summed, margin, areas=None, min_area=0):
    """Per atom: its summed shares as fractions of their total, sorted; unsure when the top two are within `margin`
    or it has no share at all (with one class: only then), and, with `areas`, it has at least `min_area` pixels."""
    out = []
    for atom, row in enumerate(summed.astype(np.float64)):
        total = row.sum()
        top = np.sort(row / total)[::-1] if total else None
        unsure = total == 0 or (len(top) > 1 and top[0] - top[1] <= margin)
        out.append(unsure and (areas is None or areas[atom] >= min_area))
    return np.array(out, bool)


def test_superpixel_classes_match_loop_on_random_inputs(rng):
    for _ in range(30):
        queries, atoms, num_classes = int(rng.integers(0, 12)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        members = rng.random((queries, atoms)) < 0.3
        # shares in quarters: equal sums (ties) are common and exact
        shares = rng.integers(0, 3, (queries, num_classes)).astype(np.float32) / 4
        summed = atom_shares(members, shares)
        assert summed.shape == (atoms, num_classes)
        got = superpixel_classes(summed)
        np.testing.assert_array_equal(got, superpixel_loop(members, shares))
        assert (got[~members.any(axis=0)] == -1).all()


def test_superpixel_vote_names_an_atom_by_all_the_regions_around_it():
    """One small region says class 1 more strongly; two larger ones that contain it say class 2: the sum wins."""
    members = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
    shares = np.array([[0, 0.6, 0.4], [0, 0.4, 0.6], [0.2, 0.2, 0.6]], np.float32)

    def vote(members, shares):
        return superpixel_classes(atom_shares(members, shares)).tolist()

    assert vote(members, shares) == [2, 2, 2]
    assert vote(members[:1], shares[:1]) == [1, -1, -1]  # one proposal
    assert vote(np.zeros((0, 3), bool), np.zeros((0, 3), np.float32)) == [-1, -1, -1]  # no proposals
    assert vote(np.ones((2, 1), bool), np.array([[0, 1, 0], [0, 0, 1]], np.float32)) == [1]  # a tie: smaller id


@pytest.mark.parametrize("margin", [0.0, 0.25, 0.5, 1.0])
def test_unsure_atoms_match_loop_on_random_inputs(rng, margin):
    for _ in range(30):
        atoms, num_classes = int(rng.integers(0, 40)), int(rng.integers(1, 6))
        # summed quarters: gaps equal to the margin (and ties) are common and exact
        summed = (rng.integers(0, 4, (atoms, num_classes)) * (rng.random((atoms, 1)) < 0.8)).astype(np.float32) / 4
        got = unsure_atoms(summed, margin)
        assert got.dtype == np.bool_ and got.shape == (atoms,)
        np.testing.assert_array_equal(got, unsure_loop(summed, margin))
        areas = rng.integers(0, 600, atoms)
        np.testing.assert_array_equal(unsure_atoms(summed, margin, areas, 300), unsure_loop(summed, margin, areas, 300))


def test_unsure_atoms_edge_cases():
    summed = np.array([[0, 0, 0], [0.5, 0.5, 0], [1, 0, 0], [0.2, 0.7, 0.1], [0, 0, 2]], np.float32)
    assert unsure_atoms(summed, 0.5).tolist() == [True, True, False, True, False]  # no share; a tie; gap 0.5
    assert unsure_atoms(summed, 0.0).tolist() == [True, True, False, False, False]  # no share; a tie
    assert unsure_atoms(summed, 1.0).all()
    assert unsure_atoms(np.array([[3.0], [0.0]], np.float32), 1.0).tolist() == [False, True]  # one class
    assert unsure_atoms(np.zeros((0, 4), np.float32), 0.3).shape == (0,)  # no atoms
    areas = np.array([10, 300, 299, 5000, 0])
    assert unsure_atoms(summed, 1.0, areas, 300).tolist() == [False, True, False, True, False]  # too small: not asked


def test_atom_rows_are_the_asked_atoms_alone():
    asked = np.array([False, True, False, True, True])
    np.testing.assert_array_equal(atom_rows(asked), np.eye(5, dtype=bool)[[1, 3, 4]])
    assert atom_rows(np.zeros(3, bool)).shape == (0, 3)



def test_retrieve_returns_the_shares_of_the_same_search(rng):
    vectors = rng.integers(-2, 3, (60, 6)).astype(np.float32)
    labels = rng.integers(0, 4, 60)
    index = ExactIndex(vectors, labels, num_classes=5)
    queries = rng.integers(-2, 3, (25, 6)).astype(np.float32)
    classes, confidences, shares = retrieve(index, queries, 7, "softmax", temperature=0.5, scores=True)
    np.testing.assert_array_equal(classes, retrieve(index, queries, 7, "softmax", temperature=0.5)[0])
    sims, rows = index.search(queries, 7)
    np.testing.assert_allclose(shares, shares_loop(sims, labels[rows], 5, "softmax", temperature=0.5), rtol=1e-5,
                               atol=1e-7)
