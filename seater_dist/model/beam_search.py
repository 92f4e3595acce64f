"""Constrained beam search over the item tree (docs/method.md §5; paper Sec. 3.4).

Batched over users and beams: the encoder runs once per user, the cross-attention keys/values of the memory
are computed once per user and shared by all its beams (beams are query rows, never copies of the memory),
and self-attention keys/values are cached and reordered as beams are re-ranked. The only Python loop is over
the D decoding steps. Per user and step: at most b beams × k children scored.

A beam whose score is -inf (not enough reachable nodes yet, e.g. b > k at step 1 is handled by growing the
beam count as min(b, beams·k)) carries the PAD token, whose children row is empty, so it stays -inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from seater_dist.model.layers import KVCache, eval_mode


def beam_search(model: nn.Module, history: Tensor, beam_size: int, top_n: int) -> tuple[Tensor, Tensor]:
    """history int [B, t] left-padded -> (items int64 [B, top_n], scores float32 [B, top_n]), best first.

    ``model`` is a :class:`seater_dist.model.seater.SeaterModel` (its encode / memory_kv / decode /
    constrained_log_probs; this module does not import it, so that the model can import the search).

    scores are sums of constrained log-probabilities (log of Eq. 1). With fewer than top_n reachable leaves
    the rest is padded with item -1 and score -inf.
    """
    if top_n > beam_size:
        raise ValueError(f"top_n={top_n} must be <= beam_size={beam_size} (the final beams are the candidates)")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    with eval_mode(model):
        memory, pad_mask = model.encode(history)
        tokens, scores = search_levels(model, memory, pad_mask, beam_size)
        items = tokens.masked_fill(torch.isneginf(scores), -1)
        return _take_top(items, scores, top_n)


LevelHook = Callable[[Tensor, Tensor, Tensor], None]


def search_levels(model: nn.Module, memory: Tensor, pad_mask: Tensor, beam_size: int,
                  first_columns: Tensor | None = None, on_level: LevelHook | None = None) -> tuple[Tensor, Tensor]:
    """The constrained beam search itself, from encoder memory [B, t, d] (pad mask [B, t], True at padding)
    -> the last level's beams: (tokens int64 [B, nb], scores [B, nb]), best first; a beam of score -inf
    carries PAD. The model must be in eval mode (the caller holds :func:`eval_mode`).

    ``first_columns`` (int64 [c]): keep only these columns of the root's children at step 1, scored with the
    softmax over all of them (a serving shard searches its own subtrees of the root). ``on_level(parents
    [B, nb], children [B, nb, k], cumulative [B, nb, k])`` sees every level's candidates before the top-b cut
    (a serving shard records them for the exact merge).
    """
    B, device = memory.shape[0], memory.device
    mem_kv = model.memory_kv(memory)
    caches = [KVCache(model.depth) for _ in model.decoder]
    tokens = torch.full((B, 1), model.bos, dtype=torch.long, device=device)  # [B, nb]
    scores = torch.zeros((B, 1), device=device)
    batch_rows = torch.arange(B, device=device)[:, None]
    for step in range(model.depth):
        states = model.decode(tokens[:, :, None], mem_kv, pad_mask, caches, start=step)[:, :, 0]  # [B, nb, d]
        log_probs, children = model.constrained_log_probs(states, tokens)  # [B, nb, k]
        if step == 0 and first_columns is not None:
            log_probs, children = log_probs[:, :, first_columns], children[:, :, first_columns]
        candidates = scores[:, :, None] + log_probs  # [B, nb, k]
        if on_level is not None:
            on_level(tokens, children, candidates)
        nb, k = children.shape[1], children.shape[2]
        scores, best = candidates.reshape(B, nb * k).topk(min(beam_size, nb * k), dim=1)  # sorted, best first
        tokens = children.reshape(B, nb * k).gather(1, best).masked_fill(torch.isneginf(scores), model.pad)
        if step + 1 < model.depth:
            rows = (batch_rows * nb + best // k).reshape(-1)  # parent beam of every new beam
            for cache in caches:
                cache.reorder(rows)
    return tokens, scores


def _take_top(items: Tensor, scores: Tensor, top_n: int) -> tuple[Tensor, Tensor]:
    """First top_n columns, padded with -1 / -inf when there are fewer. [B, nb] -> [B, top_n]"""
    B, nb = items.shape
    if nb >= top_n:
        return items[:, :top_n], scores[:, :top_n]
    pad_items = items.new_full((B, top_n - nb), -1)
    pad_scores = scores.new_full((B, top_n - nb), float("-inf"))
    return torch.cat([items, pad_items], 1), torch.cat([scores, pad_scores], 1)
