"""SASRec (Kang & McAuley, 2018): the tree's item embeddings and the dual-encoder baseline (docs/method.md §6).

Causal self-attention over the history with pre-LN blocks; item embeddings scaled by sqrt(d) plus learned
absolute positions; the user state is the output at the last position (the latest item, histories being
left-padded). Items are scored by inner product with the same item table, so retrieval is exact
maximum inner-product search (:func:`topk_inner_product`, faiss IndexFlatIP).

Two losses: ``sampled`` — softmax over the positive and ``num_negatives`` uniform negatives shared by the
batch (the paper's setting, 1,280), ``ce`` — full cross-entropy over all items (the stronger modern baseline).

Example::

    model = SASRec(num_items=100, settings=SasrecSettings(max_len=20))
    seq = torch.tensor([[100, 100, 3, 7, 9]])          # left-padded with num_items
    loss = model.loss(seq, torch.tensor([[-1, -1, 7, 9, 11]]))
    state = model.user_state(seq)                        # [1, 64]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seater_dist.config import SasrecSettings
from seater_dist.data.samples import left_pad
from seater_dist.model.layers import Attention, FeedForward, eval_mode


class PreLNBlock(nn.Module):
    """x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, ffn_dim, dropout, activation=nn.ReLU)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, T, d], bias [B, 1, T, T] -> [B, T, d]"""
        h = self.norm1(x)
        k, v = self.attn.project_kv(h)
        x = x + self.drop1(self.attn.attend(h, k, v, bias))
        return x + self.drop2(self.ff(self.norm2(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender; item ids 0..N-1, padding id N."""

    def __init__(self, num_items: int, settings: SasrecSettings) -> None:
        super().__init__()
        self.num_items = num_items
        self.settings = settings
        d = settings.d_model
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=num_items)
        self.pos_emb = nn.Embedding(settings.max_len, d)
        # Scaled by sqrt(d) on input, so std d^-1/2 gives unit-scale inputs; the pad row stays zero.
        nn.init.normal_(self.item_emb.weight, 0.0, d**-0.5)
        nn.init.normal_(self.pos_emb.weight, 0.0, d**-0.5)
        with torch.no_grad():
            self.item_emb.weight[num_items].zero_()
        self.drop = nn.Dropout(settings.dropout)
        ffn = settings.ffn_dim or d
        self.blocks = nn.ModuleList(
            PreLNBlock(d, settings.n_heads, ffn, settings.dropout) for _ in range(settings.num_blocks)
        )
        self.final_norm = nn.LayerNorm(d)

    def forward(self, seq: Tensor) -> Tensor:
        """seq int [B, T] left-padded with num_items (T <= max_len) -> states [B, T, d].

        Position j attends to real positions <= j (and to itself, so padding rows stay defined; their
        outputs are never used).
        """
        B, T = seq.shape
        if T > self.settings.max_len:
            raise ValueError(f"sequence length {T} > max_len={self.settings.max_len}; keep the last max_len items")
        d = self.settings.d_model
        positions = torch.arange(self.settings.max_len - T, self.settings.max_len, device=seq.device)
        x = self.drop(self.item_emb(seq) * math.sqrt(d) + self.pos_emb(positions))
        idx = torch.arange(T, device=seq.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & (seq != self.num_items)[:, None, :]  # [B, T(q), T(k)]
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=seq.device)[None]
        bias = torch.zeros(allowed.shape, device=seq.device, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[:, None]
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)

    def user_state(self, history: Tensor) -> Tensor:
        """history int [B, T] left-padded (longer ones keep their last max_len items) -> [B, d]."""
        return self.forward(history[:, -self.settings.max_len :])[:, -1]

    def loss(self, seq: Tensor, pos_targets: Tensor) -> Tensor:
        """Next-item loss. seq [B, T] left-padded; pos_targets [B, T] item after each position, -1 where none.

        ``sampled``: softmax over [positive, num_negatives uniform items shared by the batch], an accidental hit
        (a negative equal to the positive) masked out. ``ce``: softmax over all N items.
        """
        states = self.forward(seq)
        keep = pos_targets >= 0
        h = states[keep]  # [M, d]
        targets = pos_targets[keep]
        if h.shape[0] == 0:
            return states.sum() * 0.0
        if self.settings.loss == "ce":
            logits = h @ self.item_emb.weight[: self.num_items].T  # [M, N]
            return F.cross_entropy(logits, targets)
        negatives = torch.randint(0, self.num_items, (self.settings.num_negatives,), device=seq.device)
        pos_logit = (h * self.item_emb(targets)).sum(-1, keepdim=True)  # [M, 1]
        neg_logits = h @ self.item_emb(negatives).T  # [M, n]
        neg_logits = neg_logits.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def item_embeddings(self) -> np.ndarray:
        """The item table without the pad row, float32 [N, d] (the tree's input; the retrieval index)."""
        return self.item_emb.weight[: self.num_items].detach().cpu().float().numpy().copy()

    def topk(self, histories: Sequence[Sequence[int]], top_k: int,
             item_table: np.ndarray | None = None) -> np.ndarray:
        """The retrieval interface shared with SEATER: U item-index histories (oldest first, any length)
        -> int64 [U, top_k] best first, -1 padded. Exact inner-product search over every item;
        ``item_table`` (float32 [N, d]) saves recomputing :meth:`item_embeddings` per call."""
        history = torch.from_numpy(left_pad(histories, self.settings.max_len, self.num_items))
        with eval_mode(self):
            states = self.user_state(history.to(self.item_emb.weight.device)).float().cpu().numpy()
        table = self.item_embeddings() if item_table is None else item_table
        return topk_inner_product(states, table, top_k)[0]


def topk_inner_product(user_states: np.ndarray, item_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum inner-product search with faiss IndexFlatIP.

    user_states float [U, d], item_emb float [N, d] -> (items int64 [U, k], scores float32 [U, k]), best first;
    when k > N the tail is item -1, score -inf.
    """
    import faiss

    users = np.ascontiguousarray(user_states, dtype=np.float32)
    items = np.ascontiguousarray(item_emb, dtype=np.float32)
    if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
        raise ValueError(f"topk_inner_product: shapes {users.shape} and {items.shape} do not match as [U, d], [N, d]")
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    scores, ids = index.search(users, k)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return ids.astype(np.int64), scores
