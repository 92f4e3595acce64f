"""SASRec (docs/method.md §6): both losses learn, padding and causality hold, exact MIPS equals brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seater_dist.config import SasrecSettings
from seater_dist.model.sasrec import SASRec, topk_inner_product


def small(**kw) -> SasrecSettings:
    base = dict(d_model=16, n_heads=2, num_blocks=2, dropout=0.0, max_len=8, num_negatives=20)
    return SasrecSettings(**{**base, **kw})


def cyclic_batch(num_items: int, batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences i, i+1, i+2, ... (mod N), left-padded; targets = the next item, -1 on padding."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, num_items, (batch, 1), generator=g)
    full = (start + torch.arange(length + 1)) % num_items
    seq, targets = full[:, :-1].clone(), full[:, 1:].clone()
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    pad = torch.arange(length)[None, :] < (length - lengths)[:, None]
    seq[pad], targets[pad] = num_items, -1
    return seq, targets


@pytest.mark.parametrize("loss", ["sampled", "ce"])
def test_both_losses_lower_on_a_tiny_problem(loss):
    torch.manual_seed(0)
    n = 40
    model = SASRec(n, small(loss=loss))
    seq, targets = cyclic_batch(n, 64, 8, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def measure() -> float:
        torch.manual_seed(5)
        with torch.no_grad():
            return model.loss(seq, targets).item()

    before = measure()
    for _ in range(60):
        opt.zero_grad()
        model.loss(seq, targets).backward()
        opt.step()
    after = measure()
    assert after < 0.5 * before, f"{loss}: {before:.3f} -> {after:.3f}"
    # it learned the rule: the next item of the cycle ranks first for most users
    with torch.no_grad():
        state = model.user_state(seq)
    top1 = (state @ torch.from_numpy(model.item_embeddings()).T).argmax(1)
    assert (top1 == (seq[:, -1] + 1) % n).float().mean() > 0.8


def test_ce_loss_is_cross_entropy_over_all_items():
    torch.manual_seed(1)
    model = SASRec(30, small(loss="ce")).eval()
    seq, targets = cyclic_batch(30, 5, 8, seed=1)
    states = model(seq)
    keep = targets >= 0
    want = F.cross_entropy(states[keep] @ model.item_emb.weight[:30].T, targets[keep])
    torch.testing.assert_close(model.loss(seq, targets), want)


def test_sampled_loss_uses_shared_negatives_and_masks_accidental_hits():
    torch.manual_seed(2)
    model = SASRec(10, small(num_negatives=50)).eval()
    seq, targets = cyclic_batch(10, 4, 8, seed=2)
    torch.manual_seed(9)
    got = model.loss(seq, targets)
    torch.manual_seed(9)
    negatives = torch.randint(0, 10, (50,))
    h = model(seq)[targets >= 0]
    t = targets[targets >= 0]
    E = model.item_emb.weight
    logits = torch.cat([(h * E[t]).sum(-1, keepdim=True), h @ E[negatives].T], 1)
    logits[:, 1:][negatives[None, :] == t[:, None]] = float("-inf")
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.zeros_like(t)))


def test_user_state_ignores_left_padding_and_future_items():
    torch.manual_seed(3)
    model = SASRec(20, small()).eval()
    a = torch.tensor([[3, 5, 7]])
    padded = torch.tensor([[20, 20, 20, 3, 5, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model.user_state(a), model.user_state(padded))
        # causal: the state at position 1 does not depend on the item at position 2
        s1 = model(torch.tensor([[3, 5, 7]]))[:, 1]
        s2 = model(torch.tensor([[3, 5, 11]]))[:, 1]
    torch.testing.assert_close(s1, s2)


def test_item_embeddings_exclude_the_pad_row():
    model = SASRec(25, small())
    emb = model.item_embeddings()
    assert emb.shape == (25, 16) and emb.dtype == np.float32
    assert not np.any(np.all(emb == 0, axis=1))
    assert torch.all(model.item_emb.weight[25] == 0)


def test_topk_inner_product_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(13, 8)).astype(np.float32), rng.normal(size=(300, 8)).astype(np.float32)
    ids, scores = topk_inner_product(users, items, 20)
    full = users @ items.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, 1), rtol=1e-5)


def test_topk_inner_product_pads_when_k_exceeds_items():
    ids, scores = topk_inner_product(np.eye(2, 4, dtype=np.float32), np.eye(3, 4, dtype=np.float32), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert ids[0, 0] == 0 and ids[1, 0] == 1
