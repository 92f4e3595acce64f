"""The messages between the router, the encoder and the shards, and the merge of the shards' answers into
the single-process answer (numpy only: the router imports no torch).

SEATER (docs/architecture.md, "Serving"): shard s owns some of the root's children and runs beam search
with the full beam b inside its subtrees. Independent shard beams alone would NOT always contain every item
of the single-process beam: a shard keeps b nodes of its own, and the children of nodes that lost the
global competition at level l-1 can push a node of the global beam out of the shard's level-l beam. So each
shard returns, for every level, the children scores of every node it expanded (at most b·k per level), and
:class:`BeamMerge` replays the single-process beam search level by level over those scores: the global beam
at level l is the best b among the children of the global beam at level l-1. When a node of the global beam
was not expanded by its shard, the merge asks that shard to expand exactly those nodes (``missing``), a rare
second round trip; the result is then the single-process beam search, not an approximation of it.

:func:`sharded_search` is that whole conversation with the shards, written once: a generator that yields
requests (:class:`SearchShards`, then :class:`ExpandNodes` when the merge needs them) and receives their
answers. The in-process search (``seater_parts.ShardedSeater``) runs it with :func:`drive`, calling the
shard parts; the HTTP router runs it with :func:`drive_async`, awaiting the shard deployments.

SASRec (dual encoder): index shard s owns a range of items; :func:`merge_top` takes the best n of the
shards' top n by score, which is exact for exact (flat) indexes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class EncodeResult:
    """What the encoder replica returns for one history.

    state: SEATER the encoder memory float32 [t, d] (with ``pad_mask`` bool [t], True at padding); SASRec the
    user vector float32 [d]. None when no item of the history is known: then ``fallback`` holds the popular
    items (raw ids, scores). ``ignored``: the unknown raw ids, in request order. ``info``: the encoder's
    description of its model (what GET /version returns), stamped on by the Serve deployment.
    """

    version: str
    state: np.ndarray | None
    pad_mask: np.ndarray | None
    ignored: list[str]
    fallback: tuple[list[str], list[float]] | None = None
    info: dict[str, Any] | None = None


@dataclass
class ShardBeams:
    """One user's answer from one beam shard: for every level l = 1..D (list index l-1), the nodes the shard
    expanded and their children.

    parents[l-1]   int64 [P]      global tokens expanded at level l (BOS at level 1)
    children[l-1]  int64 [P, K]   their children's global tokens, -1 where there is none
    scores[l-1]    float32 [P, K] cumulative scores (sums of constrained log-probabilities), -inf where none
    leaf_raw       raw item id of every item among the level-D children
    """

    parents: list[np.ndarray]
    children: list[np.ndarray]
    scores: list[np.ndarray]
    leaf_raw: dict[int, str] = field(default_factory=dict)


@dataclass
class Expansion:
    """Children of given nodes, from one shard (the merge's second round trip).

    parents int64 [M]; children int64 [M, K] (-1 where none); log_probs float32 [M, K] conditional
    (the merge adds each parent's cumulative score); leaf_raw as in :class:`ShardBeams` when the children
    are items.
    """

    parents: np.ndarray
    children: np.ndarray
    log_probs: np.ndarray
    leaf_raw: dict[int, str] = field(default_factory=dict)


@dataclass
class Stale:
    """A replica holding another model version than the request's (a rollout in progress): retry."""

    version: str


class BeamMerge:
    """Replays the single-process constrained beam search over the shards' expanded nodes.

        merge = BeamMerge(answers, depth=D, beam=b, bos=N)
        while (need := merge.missing()) is not None:
            level, by_shard = need            # {shard: global tokens to expand at that level}
            for s, tokens in by_shard.items():
                merge.add_expansion(level, s, shards[s].expand(..., tokens))
        items, scores, raw = merge.top(n)

    Ties between equal scores are broken by the shards' order, then the order of their rows.
    :func:`sharded_search` is that loop for a batch of users, as requests to the shards.
    """

    def __init__(self, answers: Sequence[ShardBeams], depth: int, beam: int, bos: int) -> None:
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.depth, self.beam = depth, beam
        self.level = 0  # levels of the global beam done
        self.tokens = np.array([bos], dtype=np.int64)
        self.scores = np.zeros(1, dtype=np.float32)
        self.owner = np.array([-1], dtype=np.int64)
        # per level: (shard, parents [P], children [P, K], cumulative scores [P, K])
        self.blocks: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(depth)]
        self.raw: dict[int, str] = {}
        self.expansions = 0  # nodes the shards had to expand in a second round trip
        for shard, answer in enumerate(answers):
            if len(answer.parents) != depth:
                raise ValueError(f"shard {shard} answered {len(answer.parents)} levels, the tree has {depth}")
            for lvl in range(depth):
                self.blocks[lvl].append((shard, answer.parents[lvl], answer.children[lvl], answer.scores[lvl]))
            self.raw.update(answer.leaf_raw)

    def missing(self) -> tuple[int, dict[int, np.ndarray]] | None:
        """Advance the global beam as far as the expanded nodes allow. None when all D levels are done, else
        (level, {shard: global tokens of the global beam at level-1 that this shard must expand})."""
        while self.level < self.depth:
            found = np.zeros(self.tokens.size, dtype=bool)
            tokens, scores, owners = [], [], []
            for shard, parents, children, cumulative in self.blocks[self.level]:
                rows = self._rows(parents)
                keep = rows >= 0
                if not keep.any():
                    continue
                found[rows[keep]] = True
                kids, sc = children[keep], cumulative[keep]
                valid = (kids >= 0) & np.isfinite(sc)
                tokens.append(kids[valid])
                scores.append(sc[valid])
                owners.append(np.full(int(valid.sum()), shard, dtype=np.int64))
            if not found.all():
                need: dict[int, list[int]] = {}
                for i in np.flatnonzero(~found):
                    need.setdefault(int(self.owner[i]), []).append(int(self.tokens[i]))
                return self.level + 1, {s: np.array(t, dtype=np.int64) for s, t in need.items()}
            tokens_all = np.concatenate(tokens) if tokens else np.zeros(0, dtype=np.int64)
            scores_all = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
            owners_all = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
            best = np.argsort(-scores_all, kind="stable")[: self.beam]
            self.tokens, self.scores, self.owner = tokens_all[best], scores_all[best], owners_all[best]
            self.level += 1
        return None

    def _rows(self, tokens: np.ndarray) -> np.ndarray:
        """Position of each token in the current global beam, -1 where it is not in it."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.tokens.size == 0:
            return np.full(tokens.size, -1, dtype=np.int64)
        order = np.argsort(self.tokens, kind="stable")
        ranked = self.tokens[order]
        pos = np.searchsorted(ranked, tokens).clip(max=ranked.size - 1)
        return np.where(ranked[pos] == tokens, order[pos], -1)

    def add_expansion(self, level: int, shard: int, expansion: Expansion) -> None:
        """Children of nodes of the global beam at ``level``-1, computed by ``shard`` on request."""
        if level != self.level + 1:
            raise ValueError(f"expansion for level {level}, the merge is at level {self.level + 1}")
        rows = self._rows(expansion.parents)
        if (rows < 0).any():
            raise ValueError(f"expansion of tokens outside the global beam at level {level - 1}")
        cumulative = (self.scores[rows][:, None] + expansion.log_probs.astype(np.float32)).astype(np.float32)
        cumulative[expansion.children < 0] = -np.inf
        self.blocks[level - 1].append((shard, expansion.parents, expansion.children, cumulative))
        self.raw.update(expansion.leaf_raw)
        self.expansions += len(expansion.parents)

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The best n items of the final beam, best first -> (item ids, scores, raw ids); fewer when fewer
        leaves are reachable."""
        if self.level < self.depth:
            raise RuntimeError("top() before the merge finished: call missing() until it returns None")
        items, scores = self.tokens[:n], self.scores[:n]
        return items, scores, [self.raw[int(i)] for i in items]


@dataclass
class SearchShards:
    """Ask every shard to search: encoder memories float32 [B, t, d] with pad masks bool [B, t], beam ``beam``.
    The answer: per shard, in shard order, B :class:`ShardBeams`."""

    memory: np.ndarray
    pad_mask: np.ndarray
    beam: int


@dataclass
class ExpandNodes:
    """Ask some shards for the children of nodes of one user's global beam at ``level``-1 (the rare second
    round trip): that user's memory [t, d] and pad mask [t], and {shard: global tokens}. The answer:
    {shard: :class:`Expansion`}."""

    memory: np.ndarray
    pad_mask: np.ndarray
    level: int
    tokens: dict[int, np.ndarray]


@dataclass
class MergedBeam:
    """One user's answer: the best items int64 [<= n] and scores float32 [<= n], best first, their raw ids,
    and how many nodes the shards expanded on request."""

    items: np.ndarray
    scores: np.ndarray
    raw: list[str]
    expansions: int


ShardRequest = SearchShards | ExpandNodes
SearchSteps = Generator[ShardRequest, Any, list[MergedBeam]]


def sharded_search(memory: np.ndarray, pad_mask: np.ndarray, beam: int, top_n: Sequence[int], depth: int,
                   bos: int) -> SearchSteps:
    """The sharded beam search of B users (memory [B, t, d], pad_mask [B, t]) as requests to the shards.

    Yields one :class:`SearchShards`, then an :class:`ExpandNodes` whenever a user's :class:`BeamMerge` lacks
    an expansion; each ``yield`` receives the request's answer. Returns the B users' :class:`MergedBeam`
    (user u's best ``top_n[u]``). ``depth``: the tree's D; ``bos``: the root's global token (N).
    """
    answers = yield SearchShards(memory, pad_mask, beam)
    merged = []
    for u, n in enumerate(top_n):
        merge = BeamMerge([shard[u] for shard in answers], depth=depth, beam=beam, bos=bos)
        while (need := merge.missing()) is not None:
            level, by_shard = need
            expansions = yield ExpandNodes(memory[u], pad_mask[u], level, by_shard)
            for shard in by_shard:  # in the merge's order of shards: it breaks ties
                merge.add_expansion(level, shard, expansions[shard])
        items, scores, raw = merge.top(n)
        merged.append(MergedBeam(items, scores, raw, merge.expansions))
    return merged


def drive(steps: SearchSteps, answer: Callable[[ShardRequest], Any]) -> list[MergedBeam]:
    """Run :func:`sharded_search` with ``answer(request)`` computing each request's answer in this process."""
    request = next(steps)
    while True:
        try:
            request = steps.send(answer(request))
        except StopIteration as done:
            return done.value


async def drive_async(steps: SearchSteps, answer: Callable[[ShardRequest], Awaitable[Any]]) -> list[MergedBeam]:
    """Run :func:`sharded_search` awaiting ``answer(request)`` (calls to the shard deployments). An exception
    raised by ``answer`` (a stale or lost replica) ends the search and propagates."""
    request = next(steps)
    while True:
        answered = await answer(request)
        try:
            request = steps.send(answered)
        except StopIteration as done:
            return done.value


def merge_top(answers: Sequence[tuple[np.ndarray, np.ndarray, list[str]]], n: int
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The best n of several shards' (item ids, scores, raw ids), by score, best first (stable: earlier shards
    win ties). Entries with item id -1 (fewer items than asked) are dropped."""
    ids = np.concatenate([np.asarray(a[0], dtype=np.int64) for a in answers]) if answers else np.zeros(0, np.int64)
    scores = (np.concatenate([np.asarray(a[1], dtype=np.float32) for a in answers]) if answers
              else np.zeros(0, np.float32))
    raw = [r for a in answers for r in a[2]]
    keep = np.flatnonzero(ids >= 0)
    order = keep[np.argsort(-scores[keep], kind="stable")][:n]
    return ids[order], scores[order], [raw[i] for i in order]
