"""SASRec (Kang & McAuley, 2018): the tree's item embeddings and the dual-encoder baseline (docs/method.md §6).

Causal self-attention over the history with pre-LN blocks; item embeddings scaled by sqrt(d) plus learned
absolute positions; the user state is the output at the last position (the latest item, histories being
left-padded). Items are scored by inner product with the same item table, so retrieval is exact
maximum inner-product search: on a GPU :func:`topk_on_device` (torch.topk over states @ table.T in item chunks),
on a CPU a faiss IndexFlatIP (:func:`topk_inner_product`), built once per table and reused.

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
from typing import Any

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
        self._index: Any = None  # topk's faiss index on a CPU, and the (storage, version) of the table it holds
        self._index_key: tuple[int, int] | None = None

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
        bias = torch.zeros(allowed.shape, device=seq.device, dtype=x.dtype)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]
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

    def topk(self, histories: Sequence[Sequence[int]], top_k: int) -> np.ndarray:
        """The retrieval interface shared with SEATER: U item-index histories (oldest first, any length)
        -> int64 [U, top_k] best first, -1 padded. Exact inner-product search over every item, where the model
        is: torch on a GPU, faiss on a CPU (its index built on the first call and reused while the table is
        unchanged)."""
        history = torch.from_numpy(left_pad(histories, self.settings.max_len, self.num_items))
        weight = self.item_emb.weight
        with eval_mode(self), torch.no_grad():
            states = self.user_state(history.to(weight.device)).float()  # [U, d]
            if weight.device.type != "cpu":
                return topk_on_device(states, weight[: self.num_items].float(), top_k)[0].cpu().numpy()
        return search_index(self._cpu_index(), states.numpy(), top_k)[0]

    def _cpu_index(self) -> Any:
        """The faiss IndexFlatIP over the item table, rebuilt only when the table changed (a training step
        bumps the weight's version counter; loading new weights replaces the tensor)."""
        weight = self.item_emb.weight
        key = (weight.data_ptr(), weight._version)
        if self._index_key != key:
            self._index, self._index_key = flat_index(self.item_embeddings()), key
        return self._index


# Items scored at once by topk_on_device: U x 64k float32 scores (64 MB for 256 users).
ITEM_CHUNK = 1 << 16


def topk_on_device(states: Tensor, table: Tensor, k: int, chunk: int = ITEM_CHUNK) -> tuple[Tensor, Tensor]:
    """Exact maximum inner-product search with torch on the tensors' device: torch.topk over
    states @ table.T, ``chunk`` items at a time, each chunk's best merged into the running best.

    states float [U, d], table float [N, d] -> (items int64 [U, k], scores float32 [U, k]), best first, on the
    same device; when k > N the tail is item -1, score -inf (as :func:`topk_inner_product`).
    """
    users = states.shape[0]
    best_scores = states.new_empty((users, 0))
    best_items = torch.empty((users, 0), dtype=torch.long, device=states.device)
    for start in range(0, table.shape[0], chunk):
        block = table[start : start + chunk]
        scores, items = (states @ block.T).topk(min(k, block.shape[0]), dim=1)
        scores, items = torch.cat([best_scores, scores], 1), torch.cat([best_items, items + start], 1)
        best_scores, order = scores.topk(min(k, scores.shape[1]), dim=1)
        best_items = items.gather(1, order)
    missing = k - best_items.shape[1]
    if missing > 0:
        best_items = torch.cat([best_items, best_items.new_full((users, missing), -1)], 1)
        best_scores = torch.cat([best_scores, best_scores.new_full((users, missing), float("-inf"))], 1)
    return best_items, best_scores


def flat_index(item_emb: np.ndarray) -> Any:
    """A faiss IndexFlatIP over item_emb float [N, d] (exact inner product; built once, searched many times)."""
    import faiss

    items = np.ascontiguousarray(item_emb, dtype=np.float32)
    if items.ndim != 2:
        raise ValueError(f"flat_index: item table of shape {items.shape}, expected [N, d]")
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    return index


def search_index(index: Any, user_states: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search a faiss index with faiss's threads capped to torch's (the CPUs the worker or actor reserved).

    user_states float [U, d] -> (items int64 [U, k], scores float32 [U, k]), best first; when k > N the tail
    is item -1, score -inf.
    """
    import faiss

    users = np.ascontiguousarray(user_states, dtype=np.float32)
    if users.ndim != 2 or users.shape[1] != index.d:
        raise ValueError(f"topk_inner_product: shapes {users.shape} and [N, {index.d}] do not match as [U, d], [N, d]")
    faiss.omp_set_num_threads(torch.get_num_threads())
    scores, ids = index.search(users, k)
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    return ids.astype(np.int64), scores


def topk_inner_product(user_states: np.ndarray, item_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum inner-product search with a faiss IndexFlatIP built for this one call.

    user_states float [U, d], item_emb float [N, d] -> (items int64 [U, k], scores float32 [U, k]), best first;
    when k > N the tail is item -1, score -inf.
    """
    return search_index(flat_index(item_emb), user_states, k)
