"""Constrained beam search (docs/method.md §5): exhaustive equivalence with Eq. 1, padding, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.synthetic import random_balanced_tree
from seater_dist.config import SeaterSettings
from seater_dist.model.seater import SeaterModel
from seater_dist.tree.item_tree import ItemTree


def make_model(tree: ItemTree, layers: int = 1, seed: int = 0) -> SeaterModel:
    torch.manual_seed(seed)
    settings = SeaterSettings(
        d_model=16, n_heads=2, ffn_dim=32, history_len=5, encoder_layers=layers, decoder_layers=layers
    )
    model = SeaterModel(tree, settings)
    with torch.no_grad():  # smaller logits than N(0,1) rows give: beam scores far from each other's ties
        model.tok_emb.weight.mul_(0.3)
    return model.eval()


def histories(tree: ItemTree, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, tree.num_items, (batch, 5), generator=g)
    h[1, :3] = tree.pad
    h[2, :] = tree.pad
    return h


@pytest.mark.parametrize("n,k,layers", [(50, 3, 1), (64, 4, 2), (37, 8, 1), (6, 8, 1), (90, 2, 1)])
def test_beam_with_full_width_equals_exhaustive_ranking(n, k, layers):
    """b >= N keeps every node at every level, so the beams are all items ranked by Eq. 1."""
    tree = random_balanced_tree(n, k, seed=n)
    model = make_model(tree, layers)
    h = histories(tree, 4, seed=1)
    items, scores = model.beam_search(h, beam_size=n + 3, top_n=n)
    with torch.no_grad():
        exhaustive = model.item_log_probs(h, torch.arange(n).expand(4, n))  # [B, N], Eq. 1 in log space
    want_scores, want_items = exhaustive.sort(dim=1, descending=True)
    assert torch.equal(items, want_items)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exhaustive.exp().sum(1), torch.ones(4))  # Eq. 1 is a distribution over items


def test_narrow_beam_returns_distinct_items_with_their_eq1_scores_best_first():
    tree = random_balanced_tree(400, k=4, seed=3)  # D = 5
    model = make_model(tree, layers=2)
    h = histories(tree, 6, seed=2)
    items, scores = model.beam_search(h, beam_size=10, top_n=7)
    assert items.shape == (6, 7) and scores.dtype == torch.float32
    assert ((items >= 0) & (items < 400)).all()
    assert all(len(set(row.tolist())) == 7 for row in items)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    with torch.no_grad():
        torch.testing.assert_close(scores, model.item_log_probs(h, items), rtol=1e-5, atol=1e-5)


def test_widening_the_beam_never_loses_the_best_item_found():
    tree = random_balanced_tree(300, k=3, seed=4)
    model = make_model(tree)
    h = histories(tree, 5, seed=3)
    _, narrow = model.beam_search(h, beam_size=5, top_n=1)
    _, wide = model.beam_search(h, beam_size=300, top_n=1)
    assert (wide >= narrow - 1e-6).all()


def test_fewer_reachable_leaves_than_top_n_pads_with_minus_one_and_minus_inf():
    tree = random_balanced_tree(5, k=8)  # D = 1: five leaves under BOS
    model = make_model(tree)
    items, scores = model.beam_search(histories(tree, 3, seed=0), beam_size=10, top_n=8)
    assert (items[:, 5:] == -1).all() and torch.isneginf(scores[:, 5:]).all()
    assert sorted(items[0, :5].tolist()) == [0, 1, 2, 3, 4] and torch.isfinite(scores[:, :5]).all()


def test_beam_larger_than_first_level_grows_then_keeps_b():
    tree = random_balanced_tree(200, k=4, seed=0)  # 4 children at step 1 < b = 12
    model = make_model(tree)
    items, scores = model.beam_search(histories(tree, 3, seed=0), beam_size=12, top_n=12)
    assert (items >= 0).all() and torch.isfinite(scores).all()


def test_batched_search_equals_one_user_at_a_time():
    tree = random_balanced_tree(500, k=5, seed=1)
    model = make_model(tree, layers=2)
    h = histories(tree, 7, seed=5)
    items, scores = model.beam_search(h, beam_size=16, top_n=10)
    for row in range(7):
        one_items, one_scores = model.beam_search(h[row : row + 1], beam_size=16, top_n=10)
        assert torch.equal(one_items[0], items[row])
        torch.testing.assert_close(one_scores[0], scores[row], rtol=1e-5, atol=1e-5)


def test_beam_search_runs_without_dropout_and_restores_training_mode():
    tree = random_balanced_tree(100, k=4)
    torch.manual_seed(0)
    model = SeaterModel(tree, SeaterSettings(d_model=16, n_heads=2, ffn_dim=32, history_len=5, dropout=0.5)).train()
    h = histories(tree, 3, seed=0)
    first = model.beam_search(h, beam_size=8, top_n=8)
    second = model.beam_search(h, beam_size=8, top_n=8)
    assert model.training
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_top_n_above_beam_size_is_an_error():
    tree = random_balanced_tree(20, k=4)
    with pytest.raises(ValueError, match="top_n=6 must be <= beam_size=5"):
        make_model(tree).beam_search(histories(tree, 3, seed=0), beam_size=5, top_n=6)


def test_unbalanced_hand_built_tree_is_searched_exhaustively():
    """Nodes with 1..k children (a from_paths tree that is not balanced) still give the exact ranking."""
    paths = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [2, 0], [2, 1], [2, 1], [2, 1]])
    tree = ItemTree.from_paths(paths, k=3)
    model = make_model(tree)
    h = torch.randint(0, 8, (3, 5))
    items, scores = model.beam_search(h, beam_size=8, top_n=8)
    with torch.no_grad():
        want_scores, want_items = model.item_log_probs(h, torch.arange(8).expand(3, 8)).sort(1, descending=True)
    assert torch.equal(items, want_items)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
