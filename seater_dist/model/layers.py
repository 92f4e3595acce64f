"""Transformer building blocks shared by SEATER and SASRec, written out so that decoding can cache keys/values.

Post-LN encoder and decoder layers follow ``torch.nn.TransformerEncoderLayer`` /
``TransformerDecoderLayer`` (norm_first=False, GELU): the same arithmetic, but attention is explicit so that

* the decoder can run teacher-forced over a whole identifier, or one step at a time with a key/value cache
  (beam search), and both give the same states;
* several identifiers per user (groups: the target plus its ranking negatives, or the beams) share one
  encoder memory without copying it: cross-attention treats every (group, position) as one query row.

Masks are additive biases (0 where attention is allowed, -inf where not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with separate q/k/v/out projections (as nn.MultiheadAttention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: Tensor) -> Tensor:
        """[..., L, d] -> [..., h, L, hd]"""
        *lead, length, _ = x.shape
        return x.reshape(*lead, length, self.n_heads, self.head_dim).transpose(-3, -2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of x [..., L, d] -> two [..., h, L, hd]."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Queries from x [..., Lq, d] over k, v [..., h, Lk, hd]; bias broadcastable to [..., h, Lq, Lk]."""
        q = self.split_heads(self.q_proj(x))  # [..., h, Lq, hd]
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim))
        if bias is not None:
            scores = scores + bias
        probs = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (probs @ v).transpose(-3, -2)  # [..., Lq, h, hd]
        return self.out_proj(out.reshape(*out.shape[:-2], -1))


class FeedForward(nn.Sequential):
    """Linear -> activation -> dropout -> Linear."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: type[nn.Module] = nn.GELU) -> None:
        super().__init__(nn.Linear(d_model, ffn_dim), activation(), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model))


class EncoderLayer(nn.Module):
    """Post-LN self-attention + FFN (bidirectional; padding excluded through the key bias)."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        """x [B, t, d], key_bias [B, 1, 1, t] -> [B, t, d]"""
        k, v = self.self_attn.project_kv(x)
        x = self.norm1(x + self.drop1(self.self_attn.attend(x, k, v, key_bias)))
        return self.norm2(x + self.drop2(self.ff(x)))


@dataclass
class KVCache:
    """Self-attention keys/values of the positions decoded so far, per decoder layer: [R, h, P, hd] each."""

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[-2])

    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` (int [R']) of the cache, in that order (beam search: parent beam of each new beam)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


def causal_bias(new: int, past: int, device: torch.device) -> Tensor:
    """[new, past + new] bias: query i (absolute position past + i) sees keys 0..past + i."""
    q = torch.arange(new, device=device)[:, None] + past
    kpos = torch.arange(past + new, device=device)[None, :]
    return torch.zeros(new, past + new, device=device).masked_fill(kpos > q, float("-inf"))


class DecoderLayer(nn.Module):
    """Post-LN causal self-attention, cross-attention to the encoder memory, FFN."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.cross_attn = Attention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mem_k: Tensor, mem_v: Tensor, mem_bias: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        """x [B, G, L, d]: G identifiers (or beams) per user, L new positions each.

        mem_k, mem_v [B, h, t, hd] (from :meth:`memory_kv`), mem_bias [B, 1, 1, t].
        With ``cache`` (rows B*G), the L positions follow the cached ones and the cache grows by L.
        Returns [B, G, L, d].
        """
        B, G, L, d = x.shape
        rows = x.reshape(B * G, L, d)
        k, v = self.self_attn.project_kv(rows)  # [B*G, h, L, hd]
        past = 0
        if cache is not None:
            past = cache.length
            if past:
                k, v = torch.cat([cache.k, k], dim=-2), torch.cat([cache.v, v], dim=-2)
            cache.k, cache.v = k, v
        rows = self.norm1(rows + self.drop1(self.self_attn.attend(rows, k, v, causal_bias(L, past, x.device))))
        # Cross-attention is independent per query: every (group, position) of a user is a query row.
        y = rows.reshape(B, G * L, d)
        y = self.norm2(y + self.drop2(self.cross_attn.attend(y, mem_k, mem_v, mem_bias)))
        y = self.norm3(y + self.drop3(self.ff(y)))
        return y.reshape(B, G, L, d)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the encoder memory [B, t, d] -> two [B, h, t, hd] (once per user)."""
        return self.cross_attn.project_kv(memory)
