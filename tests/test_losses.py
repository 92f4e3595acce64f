"""The three SEATER losses against naive reference loops (docs/method.md §3)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.synthetic import random_balanced_tree
from seater_dist.config import SeaterSettings
from seater_dist.model import losses
from seater_dist.model.seater import SeaterModel
from seater_dist.tree.item_tree import ItemTree


def settings(**kw) -> SeaterSettings:
    no_dropout = dict(dropout=0.0, input_dropout=0.0)
    return SeaterSettings(**{**dict(d_model=8, n_heads=2, ffn_dim=16, history_len=4, **no_dropout), **kw})


# ----------------------------------------------------------------------------- L_ali (Eq. 6)
def naive_alignment(tree: ItemTree, targets: list[int], emb: torch.Tensor, tau: float) -> float:
    """Per-anchor loop over U, the distinct tokens of the targets' identifiers; the paper's exclusion rule."""
    U = sorted({int(tok) for item in targets for tok in tree.codes[item]})
    cos = lambda a, b: float(F.cosine_similarity(emb[a], emb[b], dim=0))  # noqa: E731
    terms = []
    for j in U:
        p = int(tree.parent[j])
        children = {int(c) for c in tree.parent.nonzero()[0] if tree.parent[c] == j}
        pos = math.exp(cos(j, p) / tau)
        neg = sum(math.exp(cos(j, m) / tau) for m in U if m != j and m != p and m not in children)
        terms.append(-math.log(pos / (pos + neg)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n,k,batch,seed", [(30, 3, 6, 0), (64, 4, 10, 1), (9, 8, 5, 2), (200, 5, 40, 3), (7, 8, 3, 4)])
def test_alignment_loss_equals_naive_per_anchor_loop(n, k, batch, seed):
    tree = random_balanced_tree(n, k, seed=seed)
    model = SeaterModel(tree, settings(tau=0.3)).double()
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, n, batch).tolist()
    got = model._alignment(model.identifiers(torch.tensor(targets))).item()
    want = naive_alignment(tree, targets, model.tok_emb.weight.detach(), tau=0.3)
    assert got == pytest.approx(want, rel=1e-9)


def test_alignment_excludes_parent_and_children_unlike_the_authors_code():
    """Keeping children among the negatives (the authors' code) gives a different value: the rule is live."""
    tree = random_balanced_tree(30, k=3, seed=0)
    model = SeaterModel(tree, settings()).double()
    ids = model.identifiers(torch.arange(0, 30, 2))
    tokens = torch.unique(ids)
    parents = model.token_parent[tokens]
    e, ep = model.tok_emb(tokens), model.tok_emb(parents)
    ours = losses.alignment_loss(tokens, parents, e, ep, 0.2)
    no_children = torch.full_like(parents, -7)  # pretend nobody's parent is in U: children stay negatives
    authors_like = losses.alignment_loss(tokens, no_children, e, ep, 0.2)
    assert not torch.isclose(ours, authors_like)


# ----------------------------------------------------------------------------- L_rank negatives
def shared_prefix(tree: ItemTree, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    same = tree.codes[a] == tree.codes[b]
    return np.where(same.all(1), tree.depth, np.argmin(same, axis=1))


@pytest.mark.parametrize("n,k,q", [(300, 4, 4), (300, 4, 2), (17, 4, 4), (5, 2, 4), (1000, 3, 4)])
def test_every_rank_negative_has_exactly_its_shared_prefix(n, k, q):
    tree = random_balanced_tree(n, k, seed=n)
    sampler = losses.PrefixNegativeSampler(tree)
    expected = list(range(tree.depth - 2, max(-1, tree.depth - 2 - q), -1))
    assert sampler.prefix_lengths(q) == expected
    items = torch.arange(n).repeat(20)
    g = torch.Generator().manual_seed(0)
    neg, shared, valid = sampler(torch.from_numpy(tree.codes[items.numpy()]), q, generator=g)
    assert neg.shape == (items.numel(), len(expected)) and valid.all()
    assert (shared == torch.tensor(expected)).all()
    for col, s in enumerate(expected):
        got = shared_prefix(tree, items.numpy(), neg[:, col].numpy())
        assert (got == s).all(), f"prefix {s}: got {np.unique(got)}"


def test_rank_negatives_cover_their_range_uniformly():
    tree = random_balanced_tree(64, k=4, seed=1)  # D = 3
    sampler = losses.PrefixNegativeSampler(tree)
    pos = 5
    codes = torch.from_numpy(tree.codes[[pos] * 24000])
    neg, _, _ = sampler(codes, 2, generator=torch.Generator().manual_seed(3))
    for col, s in enumerate([1, 0]):
        anc = tree.ancestor(np.array([pos]), s)[0]
        child = tree.ancestor(np.array([pos]), s + 1)[0]
        eligible = np.setdiff1d(tree.items_under(int(anc)), tree.items_under(int(child)))
        counts = np.bincount(neg[:, col].numpy(), minlength=64)[eligible]
        assert set(np.flatnonzero(np.bincount(neg[:, col].numpy(), minlength=64))) == set(eligible)
        expect = 24000 / eligible.size
        assert counts.min() > 0.8 * expect and counts.max() < 1.2 * expect


def test_depth_one_tree_has_no_rank_negatives_and_zero_rank_loss():
    tree = random_balanced_tree(5, k=8)
    model = SeaterModel(tree, settings())
    out = model(torch.randint(0, 5, (3, 4)), torch.tensor([0, 1, 4]))
    assert out["rank"].item() == 0.0 and torch.isfinite(out["loss"])


def test_single_child_node_gives_invalid_negative_not_a_wrong_one():
    # items 0, 1 under node A (two levels), item 2 alone under node B: B's only child leaves nothing at prefix 1
    paths = np.array([[0, 0], [0, 1], [1, 0]])
    tree = ItemTree.from_paths(paths, k=2)
    sampler = losses.PrefixNegativeSampler(tree)
    neg, shared, valid = sampler(torch.from_numpy(tree.codes), 2)
    # D = 3, prefix lengths [1, 0]; item 2's level-1 node has one child -> prefix 1 impossible
    assert valid.tolist() == [[True, True], [True, True], [False, True]]
    ok = valid.numpy()
    for col, s in enumerate([1, 0]):
        rows = np.flatnonzero(ok[:, col])
        assert (shared_prefix(tree, rows, neg[rows, col].numpy()) == s).all()


# ----------------------------------------------------------------------------- L_rank (Eq. 8)
def test_ranking_loss_equals_naive_pair_sum():
    g = torch.Generator().manual_seed(0)
    B, G, beta = 6, 5, 0.01
    scores = torch.rand(B, G, generator=g)
    shared = torch.tensor([6, 4, 3, 2, 1]).expand(B, G)
    valid = torch.rand(B, G, generator=g) > 0.2
    valid[:, 0] = True
    got = losses.ranking_loss(scores, shared, valid, beta).item()
    total = 0.0
    for b in range(B):
        for i, j in itertools.combinations(range(G), 2):
            if not (valid[b, i] and valid[b, j]):
                continue
            hi, lo = (i, j) if shared[b, i] > shared[b, j] else (j, i)  # y‡ shares more with y+
            margin = beta * float(shared[b, hi] - shared[b, lo])
            total += max(0.0, float(scores[b, lo] - scores[b, hi]) + margin)
    assert got == pytest.approx(total / B, rel=1e-6)


def test_bilinear_similarity_is_sigmoid_of_xWy():
    g = torch.Generator().manual_seed(1)
    zx, zy, w = torch.randn(3, 4, generator=g), torch.randn(3, 2, 4, generator=g), torch.randn(4, 4, generator=g)
    got = losses.bilinear_similarity(zx, zy, w)
    want = torch.stack([torch.stack([torch.sigmoid(zx[b] @ w @ zy[b, j]) for j in range(2)]) for b in range(3)])
    torch.testing.assert_close(got, want)


def test_model_rank_term_matches_hand_assembled_eq7_eq8():
    """forward()'s rank loss = Eq. 8 over [y+, negatives] with z_x = mean encoder states, z_y = mean decoder states."""
    tree = random_balanced_tree(100, k=3, seed=0)  # D = 5, prefix lengths [3, 2, 1, 0]
    model = SeaterModel(tree, settings(beta=0.05)).double()
    history = torch.randint(0, 100, (4, 4))
    history[0, :2] = tree.pad
    target = torch.tensor([1, 50, 99, 7])
    torch.manual_seed(11)
    got = model(history, target)["rank"]

    torch.manual_seed(11)
    pos_ids = model.identifiers(target)
    neg, shared, valid = model.rank_sampler(pos_ids, 4)
    memory, pad_mask = model.encode(history)
    ids = torch.cat([pos_ids[:, None], model.identifiers(neg)], 1)
    states = model.decode(model.decoder_inputs(ids), model.memory_kv(memory), pad_mask)
    z_x = torch.stack([memory[b][~pad_mask[b]].mean(0) for b in range(4)])
    z_y = states.mean(2)
    s = torch.sigmoid(torch.einsum("bd,de,bge->bg", z_x, model.w_s, z_y))
    num = torch.cat([torch.full((4, 1), tree.depth), shared], 1)
    total = sum(
        F.relu(s[b, j] - s[b, i] + 0.05 * (num[b, i] - num[b, j]))
        for b in range(4) for i in range(5) for j in range(5) if num[b, i] > num[b, j]
    )
    torch.testing.assert_close(got, total / 4)


# ----------------------------------------------------------------------------- L_gen (Eq. 5)
def test_generation_loss_is_mean_cross_entropy_of_the_constrained_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 2, 4, generator=g)
    logits[0, 1, 3] = float("-inf")
    log_probs = torch.log_softmax(logits, -1)
    children = torch.arange(12).reshape(3, 1, 4).expand(3, 2, 4) + 100
    targets = torch.tensor([[101, 102], [104 + 3, 104], [108, 109]])
    want = F.cross_entropy(logits.reshape(6, 4), (targets - children[..., 0]).reshape(6))
    torch.testing.assert_close(losses.generation_loss(log_probs, children, targets), want)
    with pytest.raises(ValueError, match="not a child"):
        losses.generation_loss(log_probs, children, targets + 50)
