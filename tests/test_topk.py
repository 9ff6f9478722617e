"""engine.topk: the one exact top-k of every exact search (highest score first, equal scores lowest id first).
The plain full sort against a loop written from the rule; `top_k`, `top_k_torch` and `topk_inner_product` against
the full sort on fresh random scores, on scores full of exact ties, with ids of their own, and at the edges (k above
the number of entries, no entries, no rows, k = 0); the compiled selection (engine.ops.top_k, which FlatIndex's
blocks use) against its twin engine.reference.top_k and the loop, with offsets, NaN and infinities."""

from __future__ import annotations

import numpy as np
import pytest

from engine import ops, reference
from engine.topk import top_k, top_k_reference, top_k_torch, topk_inner_product

torch = pytest.importorskip("torch")

#: (rows, entries a row, k): k below, at and above the entries; no entries; no rows; k = 0
SHAPES = [(7, 50, 1), (7, 50, 5), (7, 50, 49), (7, 50, 50), (7, 50, 80), (1, 1, 3), (5, 0, 4), (0, 9, 3), (4, 9, 0)]


def loop_top_k(scores, k, ids=None):
    """The rule, one row at a time: entries sorted by (score descending, id ascending), the first k kept."""
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape) if ids is None else ids
    k = min(k, scores.shape[1])
    order = [sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c], ids[q, c]))[:k] for q in range(len(scores))]
    order = np.array(order, np.int64).reshape(len(scores), k)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1).astype(np.int64)


def random_ids(rng, rows, width):
    """Distinct ids a row, not in column order: bank rows as a merge of chunks or a shortlist gives them."""
    return np.array([rng.permutation(1000)[:width] for _ in range(rows)], np.int64).reshape(rows, width)


def tied_scores(rng, rows, width, levels=4):
    """Scores drawn from a few values: nearly every row has exact ties, also across its k-th value."""
    return rng.integers(0, levels, (rows, width)).astype(np.float32) / levels


def random_scores(rng, rows, width):
    return rng.standard_normal((rows, width)).astype(np.float32)


def assert_same(got, want):
    assert got[0].shape == got[1].shape == want[1].shape
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])


@pytest.mark.parametrize("make", [tied_scores, random_scores])
def test_the_reference_is_the_rule(rng, make):
    scores = make(rng, 6, 40)
    for k in (1, 7, 40):
        assert_same(top_k_reference(scores, k), loop_top_k(scores, k))
    ranked = top_k_reference(scores, 40)[0]
    assert make is random_scores or (ranked[:, 1:] == ranked[:, :-1]).any()  # tied scores: exact ties to break


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("rows,width,k", SHAPES)
def test_top_k_equals_the_full_sort(rng, make, rows, width, k):
    scores = make(rng, rows, width)
    got = top_k(scores, k)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and got[1].shape == (rows, min(k, width))
    assert_same(got, loop_top_k(scores, k))
    assert_same(got, top_k_reference(scores, k))


@pytest.mark.parametrize("rows,width,k", SHAPES)
def test_top_k_with_ids_of_their_own(rng, rows, width, k):
    # as the chunk merge and the re-rank use it: each entry's id is a bank row, not its column
    scores = tied_scores(rng, rows, width)
    ids = random_ids(rng, rows, width)
    assert_same(top_k(scores, k, ids), loop_top_k(scores, k, ids))


def test_nan_scores_go_last_as_in_the_reference(rng):
    scores = tied_scores(rng, 5, 30)
    scores[rng.random(scores.shape) < 0.5] = np.nan
    scores[0] = np.nan  # a row with no number at all
    for k in (1, 10, 30):
        assert_same(top_k(scores, k), top_k_reference(scores, k))


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("rows,width,k", SHAPES)
def test_top_k_torch_equals_top_k(rng, make, rows, width, k):
    scores = make(rng, rows, width)
    ids = random_ids(rng, rows, width)
    got = top_k_torch(torch.from_numpy(scores), k)
    assert got[1].dtype == torch.int64
    assert_same((got[0].numpy(), got[1].numpy()), top_k(scores, k))
    got = top_k_torch(torch.from_numpy(scores), k, torch.from_numpy(ids))
    assert_same((got[0].numpy(), got[1].numpy()), top_k(scores, k, ids))


@pytest.mark.parametrize("bank_rows", [0, 1, 9, 60])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1 << 16])
def test_topk_inner_product_whatever_the_chunks(rng, bank_rows, chunk_rows):
    # small integers: every product is exact, so repeated bank rows tie exactly in any GEMM
    unique = rng.integers(-2, 3, (max(bank_rows // 3, 1), 8)).astype(np.float32)
    vectors = unique[rng.integers(0, len(unique), bank_rows)]
    queries = rng.integers(-2, 3, (11, 8)).astype(np.float32)
    for k in (1, 5, bank_rows, bank_rows + 4):
        want = top_k_reference(queries @ vectors.T, k)
        assert_same(topk_inner_product(queries, vectors, k, chunk_rows), want)
        got = topk_inner_product(torch.from_numpy(queries), torch.from_numpy(vectors), k, chunk_rows)
        assert_same((got[0].numpy(), got[1].numpy()), want)


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("rows,width,k", SHAPES)
def test_compiled_top_k_equals_the_full_sort(rng, make, rows, width, k):
    if ops._C is None:
        pytest.skip("engine._C is not built")
    scores = make(rng, rows, width)
    got = ops.top_k(scores, k)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and got[1].shape == (rows, min(k, width))
    assert_same(got, loop_top_k(scores, k))
    # offsets (the hubness penalty) in quarters: the sums stay exact and tie across columns
    offsets = rng.integers(-2, 2, width).astype(np.float32) / 4
    assert_same(ops.top_k(scores, k, offsets), loop_top_k(scores + offsets[None, :], k))
    assert_same(reference.top_k(scores, k, offsets), loop_top_k(scores + offsets[None, :], k))


def test_compiled_top_k_puts_nan_last_and_keeps_infinities(rng):
    if ops._C is None:
        pytest.skip("engine._C is not built")
    for _ in range(20):
        scores = tied_scores(rng, 6, 40)
        scores[rng.random(scores.shape) < 0.3] = np.nan
        scores[rng.random(scores.shape) < 0.2] = -np.inf
        scores[rng.random(scores.shape) < 0.1] = np.inf
        scores[0] = np.nan  # a row with no number at all
        for k in (1, 10, 40):
            assert_same(ops.top_k(scores, k), reference.top_k(scores, k))


def test_compiled_top_k_refuses_bad_shapes():
    if ops._C is None:
        pytest.skip("engine._C is not built")
    from engine.errors import InputError

    with pytest.raises(InputError, match="scores must be"):
        ops.top_k(np.zeros(5, np.float32), 2)
    with pytest.raises(InputError, match="offsets must be"):
        ops.top_k(np.zeros((2, 5), np.float32), 2, np.zeros(4, np.float32))


def test_flat_search_selects_alike_with_and_without_the_compiled_selection(rng, monkeypatch):
    unique = rng.integers(-2, 3, (20, 8)).astype(np.float32)
    vectors = unique[rng.integers(0, len(unique), 200)]
    queries = rng.integers(-2, 3, (13, 8)).astype(np.float32)
    offsets = rng.integers(-2, 2, 200).astype(np.float32) / 4
    for chunk_rows in (7, 1 << 16):
        want = top_k_reference(queries @ vectors.T + offsets[None, :], 15)
        compiled = topk_inner_product(queries, vectors, 15, chunk_rows, offsets)
        with monkeypatch.context() as patch:
            patch.setattr(ops, "_C", None)
            numpy_only = topk_inner_product(queries, vectors, 15, chunk_rows, offsets)
        assert_same(compiled, want)
        assert_same(numpy_only, want)
