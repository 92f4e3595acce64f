"""SEATER's three training losses (docs/method.md §3; paper Sec. 3.3) and the ranking-negative sampler.

    L = L_gen + λa·L_ali + λr·L_rank          (Eq. 9; L2 stays in the optimizer as weight decay)

* :func:`generation_loss` — Eq. 5, cross-entropy of the constrained softmax (Eq. 4), teacher-forced.
* :func:`alignment_loss` — Eq. 6, InfoNCE pulling every token towards its parent, with the paper's exclusion
  rule (the anchor's parent and children are never negatives; the authors' code keeps them).
* :class:`PrefixNegativeSampler` + :func:`ranking_loss` — Eq. 7-8, negatives with exact shared-prefix lengths,
  pairwise hinge with adaptive margin β·Δnum over a bilinear sigmoid similarity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seater_dist.tree.item_tree import ItemTree


def generation_loss(log_probs: Tensor, children: Tensor, targets: Tensor) -> Tensor:
    """Eq. 5 averaged over every target position of the batch.

    log_probs [B, D, k]: constrained log-softmax at each step; children [B, D, k]: the candidate tokens;
    targets [B, D]: the identifier y1..yD (each must be among its step's children; checked on a CPU only, where
    it costs no host-device sync).
    """
    hit = children == targets.unsqueeze(-1)
    if hit.device.type == "cpu" and not bool(hit.any(-1).all()):
        raise ValueError("generation_loss: a target token is not a child of its previous token (tree mismatch)")
    return -(log_probs.masked_fill(~hit, 0.0).sum(-1)).mean()


def alignment_loss(tokens: Tensor, parents: Tensor, emb: Tensor, parent_emb: Tensor, tau: float) -> Tensor:
    """Eq. 6 over the distinct tokens U of the batch's target identifiers, averaged over anchors.

    tokens [M]: U (distinct, no BOS/PAD); parents [M]: parent token of each (BOS for level 1);
    emb [M, d]: e_j; parent_emb [M, d]: e_p(j). For anchor j the denominator holds its positive plus every
    m in U except j, p(j) and the children of j. Memory O(M²): the exclusion mask is three [M, M] comparisons.
    """
    e = F.normalize(emb, dim=-1)
    pos = (e * F.normalize(parent_emb, dim=-1)).sum(-1) / tau  # [M]
    sim = e @ e.T / tau  # [M, M]: row j = anchor, column m = candidate negative
    excluded = tokens[None, :] == parents[:, None]  # m is j's parent
    excluded |= parents[None, :] == tokens[:, None]  # m is one of j's children
    excluded.fill_diagonal_(True)  # m is j
    negatives = torch.logsumexp(sim.masked_fill(excluded, float("-inf")), dim=1)  # -inf when none are left
    return (torch.logaddexp(pos, negatives) - pos).mean()


class PrefixNegativeSampler(nn.Module):
    """Draws L_rank negatives with an exact shared-prefix length with the positive (docs/method.md §3).

    For a positive item with path (a_1, ..., a_D) and a prefix length s, a negative is a uniform random item
    under a_s (BOS for s = 0) but outside a_{s+1}: its first s tokens equal the positive's, token s+1 differs.
    Items are laid out in depth-first order, so every node's items are one contiguous range
    [start, end) of ``order``; "under a_s but not under a_{s+1}" is two ranges, sampled in O(1).

    Buffers (non-persistent, rebuilt from the tree): order int64 [N]; node_start, node_end int64
    [num_tokens - N] indexed by token - N (BOS row = [0, N)).
    """

    def __init__(self, tree: ItemTree) -> None:
        super().__init__()
        n, depth = tree.num_items, tree.depth
        order = np.lexsort(tuple(tree.codes[:, lvl] for lvl in range(depth - 1, -1, -1)))
        start = np.zeros(tree.num_tokens - n, dtype=np.int64)
        end = np.zeros(tree.num_tokens - n, dtype=np.int64)
        start[0], end[0] = 0, n  # BOS
        for lvl in range(depth - 1):
            col = tree.codes[order, lvl].astype(np.int64)
            first = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
            last = np.r_[first[1:], n]
            start[col[first] - n], end[col[first] - n] = first, last
        self.depth = depth
        self.num_items = n
        self.register_buffer("order", torch.from_numpy(order.astype(np.int64)), persistent=False)
        self.register_buffer("node_start", torch.from_numpy(start), persistent=False)
        self.register_buffer("node_end", torch.from_numpy(end), persistent=False)

    def prefix_lengths(self, q: int) -> list[int]:
        """The deepest q of 0..D-2, deepest first (all of them when D-1 < q; none when D = 1)."""
        return list(range(self.depth - 2, max(-1, self.depth - 2 - q), -1))

    def forward(self, codes: Tensor, q: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """codes [B, D] of the positives -> (negative items [B, q'], shared prefix [B, q'], valid bool [B, q']).

        q' = len(prefix_lengths(q)). A negative is invalid only when a_s has no item outside a_{s+1}
        (a node with a single child; never in a balanced tree with N > k^(D-1)); it is then the positive itself.
        """
        B = codes.shape[0]
        lengths = self.prefix_lengths(q)
        if not lengths:
            empty = codes.new_zeros((B, 0))
            return empty, empty, empty.bool()
        s = torch.tensor(lengths, device=codes.device)
        bos_row = torch.zeros(B, 1, dtype=torch.long, device=codes.device)
        anc_rows = torch.cat([bos_row, codes[:, :-1].long() - self.num_items], dim=1)  # [B, D]: row of a_0..a_{D-1}
        a_rows, c_rows = anc_rows[:, s], anc_rows[:, s + 1]  # [B, q']
        a_lo, a_hi = self.node_start[a_rows], self.node_end[a_rows]
        c_lo, c_hi = self.node_start[c_rows], self.node_end[c_rows]
        count = (a_hi - a_lo) - (c_hi - c_lo)
        u = torch.rand(count.shape, device=codes.device, generator=generator)
        r = (u * count).long().clamp(max=(count - 1).clamp(min=0))
        pos = a_lo + r + (r >= c_lo - a_lo).long() * (c_hi - c_lo)  # skip the positive's own subtree
        valid = count > 0
        negatives = torch.where(valid, self.order[pos.clamp(max=self.num_items - 1)], codes[:, -1:].long())
        return negatives, s.expand(B, -1).clone(), valid


def bilinear_similarity(z_x: Tensor, z_y: Tensor, w_s: Tensor) -> Tensor:
    """s(p, q) = sigmoid(pᵀ W_s q). z_x [B, d], z_y [B, G, d], w_s [d, d] -> [B, G]."""
    return torch.sigmoid(torch.einsum("bd,de,bge->bg", z_x, w_s, z_y))


def ranking_loss(scores: Tensor, shared: Tensor, valid: Tensor, beta: float) -> Tensor:
    """Eq. 8 summed over all pairs (y†, y‡) with num(y‡) > num(y†), averaged over the batch.

    scores [B, G] = s(z_x, z_y) of each identifier; shared [B, G] = num(y) (tokens in common with y+, D for
    y+ itself); valid bool [B, G]. Pair term: max(0, s(y†) - s(y‡) + β·(num(y‡) - num(y†))).
    """
    # a = y‡ (more shared), b = y† (fewer): [B, G_a, G_b]
    gap = (shared[:, :, None] - shared[:, None, :]).to(scores.dtype)
    ordered = (gap > 0) & valid[:, :, None] & valid[:, None, :]
    hinge = F.relu(scores[:, None, :] - scores[:, :, None] + beta * gap)
    return (hinge * ordered).sum((1, 2)).mean()
