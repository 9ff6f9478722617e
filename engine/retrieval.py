"""Naming regions by retrieval: top-K neighbours in the bank (engine.search), hierarchical vote, confidence.

The vote, per query, over its K nearest bank vectors:
  1. score per class: the number of neighbours of that class ("count", the paper's vote), that number divided by
     the class's bank size ("balanced", for small banks where background vectors outnumber every class), the
     summed similarity of the class's neighbours ("weighted"), or the sum of exp((s - s_max) / T) over their
     similarities s, s_max the query's best ("softmax", Config's default: with a small temperature T a neighbour
     counts less the farther it is from the nearest, so K matters little and the nearest neighbours decide);
  2. a tie in score goes to the class with the larger summed similarity;
  3. an exact tie in both goes to the class that appears first in rank order.
Confidence = mean similarity of the winning class's neighbours, as the index returns it (with the bank's hubness
penalty, engine.bank.hubness, when it has one). The vote is a compiled op (engine.ops.vote, one body for the CPU and
CUDA launchers); its NumPy twin is engine.reference.vote.

The superpixel vote (Config.superpixel_vote), for the engine's proposer's regions, which nest: each query's class
scores of step 1, divided by their sum, are added over every proposal that contains a superpixel (atom), and the atom
takes the class with the largest sum. A superpixel is then named by all the regions around it, small and large,
rather than by the one region that painted it. Where that sum is unsure (its top two classes within
Config.unsure_margin) or no region covers the superpixel, the superpixel is also searched on its own, unless it is
smaller than Config.min_area, and its query's shares are added: its own evidence decides between the regions around
it, at the cost of a few more queries.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .arrays import contiguous, place
from .constants import VOTE_TEMPERATURE

#: subtracted from a fraction to rule it out of a second argmax (shares lie within [-1, 1] but for the weighted vote)
_OUT_OF_RANGE = 1e30


def retrieve(index, queries, top_k: int, method: str = "count", kernels=None,
             temperature: float = VOTE_TEMPERATURE, scores: bool = False) -> tuple:
    """Search `index` (an engine.search.SearchIndex) with all queries at once and vote: classes (Q,) int32 and
    confidences (Q,) float32, where the queries live (a GPU-resident index keeps device queries on the device).
    `kernels`: the module whose `vote` runs (engine.ops by default, engine.reference for the NumPy twin);
    `temperature`: the softmax vote's. With `scores`, also each query's class shares (Q, C): its scores divided by
    their sum, as the vote computes them."""
    similarities, rows = index.search(queries, top_k)
    labels = index.neighbour_labels(rows)
    return (kernels or ops).vote(similarities, labels, index.num_classes, method, index.class_counts,
                                 temperature=temperature, shares=scores)


def atom_shares(members, shares):
    """(n_atoms, C) float32: each atom's class shares summed over the candidates (members (Q, n_atoms) bool, shares
    (Q, C)) that contain it. Computed where the members are (with the image's atoms and label map)."""
    where = place(members)
    return contiguous(members, np.float32, where).T @ contiguous(shares, np.float32, where)


def unsure_atoms(summed, margin: float, areas=None, min_area: int = 0):
    """(n_atoms,) bool: the atoms whose summed shares (`atom_shares`) leave the vote unsure, their two largest within
    `margin` of each other as fractions of the atom's total, and the atoms with no share (no candidate covers them);
    with one class only those. With `areas` ((n_atoms,) pixels, where `summed` is), none smaller than `min_area`."""
    total = summed.sum(1)
    if summed.shape[1] < 2:
        unsure = total == 0
    else:
        fractions = summed / (total + (total == 0))[:, None]
        classes = contiguous(np.arange(summed.shape[1]), np.int64, place(summed))[None, :]
        first = classes == fractions.argmax(1)[:, None]
        second = classes == (fractions - first * _OUT_OF_RANGE).argmax(1)[:, None]
        gap = (fractions * first).sum(1) - (fractions * second).sum(1)
        unsure = (gap <= margin) | (total == 0)
    return unsure if areas is None else unsure & (areas >= min_area)


def atom_rows(asked):
    """(n_asked, n_atoms) bool: one region per asked atom (`asked` (n_atoms,) bool), the atom alone, where `asked` is."""
    atoms = contiguous(np.arange(len(asked)), np.int64, place(asked))
    return atoms[asked][:, None] == atoms[None, :]


def superpixel_classes(summed):
    """The superpixel vote of one image: (n_atoms,) int64, each atom's class of largest summed share (`summed`
    (n_atoms, C)), -1 for an atom with no share (it keeps the painting's class). Ties go to the smaller class id."""
    covered = summed.sum(1) != 0
    return summed.argmax(1) * covered - (~covered) * 1
