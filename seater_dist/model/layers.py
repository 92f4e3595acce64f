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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (the arithmetic of nn.MultiheadAttention), fused SDPA kernel.

    Queries and key/value pairs are projected separately (``q_proj``, ``kv_proj``) so that the cross-attention
    keys/values of the encoder memory can be computed once per user and reused by every decoding step.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        for lin in (self.q_proj, self.kv_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out_proj.bias)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of x [..., L, d] -> two [..., h, L, hd]."""
        *lead, length, _ = x.shape
        kv = self.kv_proj(x).reshape(*lead, length, 2, self.n_heads, self.head_dim)
        kv = kv.movedim(-4, -2)  # [..., 2, h, L, hd]
        return kv[..., 0, :, :, :], kv[..., 1, :, :, :]

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """Queries from x [..., Lq, d] over k, v [..., h, Lk, hd]; bias broadcastable to [..., h, Lq, Lk]."""
        *lead, length, d = x.shape
        q = self.q_proj(x).reshape(*lead, length, self.n_heads, self.head_dim).transpose(-3, -2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
        )  # [..., h, Lq, hd]
        return self.out_proj(out.transpose(-3, -2).reshape(*lead, length, d))


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


class KVCache:
    """Self-attention keys/values of the positions decoded so far, for one decoder layer.

    Preallocated for ``max_len`` positions on first use: k, v [R, h, max_len, hd], of which the first
    ``length`` are filled. Beam search reorders rows as beams are re-ranked.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k, v [R, h, L, hd] after the cached positions; return all keys/values so far [R, h, P+L, hd]."""
        new = k.shape[-2]
        if self.length + new > self.max_len:
            raise ValueError(f"KVCache holds {self.max_len} positions; {self.length} + {new} requested")
        if self.k is None:
            shape = (*k.shape[:-2], self.max_len, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[..., self.length : self.length + new, :] = k
        self.v[..., self.length : self.length + new, :] = v
        self.length += new
        return self.k[..., : self.length, :], self.v[..., : self.length, :]

    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` (int [R']) of the cache, in that order (beam search: parent beam of each new beam)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


def causal_bias(new: int, past: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """[new, past + new] bias: query i (absolute position past + i) sees keys 0..past + i."""
    q = torch.arange(new, device=device)[:, None] + past
    kpos = torch.arange(past + new, device=device)[None, :]
    return torch.zeros(new, past + new, device=device, dtype=dtype).masked_fill(kpos > q, float("-inf"))


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
            k, v = cache.append(k, v)
        bias = None if L == 1 else causal_bias(L, past, x.device, x.dtype)  # one new position sees every cached one
        rows = self.norm1(rows + self.drop1(self.self_attn.attend(rows, k, v, bias)))
        # Cross-attention is independent per query: every (group, position) of a user is a query row.
        y = rows.reshape(B, G * L, d)
        y = self.norm2(y + self.drop2(self.cross_attn.attend(y, mem_k, mem_v, mem_bias)))
        y = self.norm3(y + self.drop3(self.ff(y)))
        return y.reshape(B, G, L, d)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the encoder memory [B, t, d] -> two [B, h, t, hd] (once per user)."""
        return self.cross_attn.project_kv(memory)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode without gradients, then restore the module's previous mode.

    A module already in eval mode (``module.training`` False: the serving and evaluation case) is left as it
    is: switching walks every submodule, which costs more than a small model's forward pass."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            module.train()
