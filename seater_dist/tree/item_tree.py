"""ItemTree: the k-ary tree whose root-to-leaf paths are SEATER's item identifiers (docs/method.md §1).

Token ids (one embedding row each):

    0 .. N-1                  the items (leaf tokens, shared with the item embeddings)
    N                         BOS (= the root)
    N + 1                     PAD
    N + 2 .. num_tokens - 1   internal nodes, breadth-first: level 1 first, then level 2, ...
                              (one level's tokens are a contiguous range)

Arrays:

    codes     int32 [N, D]                 token path of every item, leaf (= the item) last
    children  int32 [num_tokens - N, k]    children of token N + r in row r (BOS, PAD, internal), -1 padded
    parent    int32 [num_tokens]           parent token (-1 for BOS and PAD)
    level     int32 [num_tokens]           0 for BOS, 1..D-1 internal, D for items, -1 for PAD

Example:

    >>> paths = np.array([[0], [0], [1], [1]])          # 4 items, k = 2, D = 2
    >>> tree = ItemTree.from_paths(paths, k=2)
    >>> tree.codes.tolist()
    [[6, 0], [6, 1], [7, 2], [7, 3]]
    >>> tree.children_of(np.array([tree.bos])).tolist()
    [[6, 7]]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seater_dist import artifacts
from seater_dist.artifacts import atomic_dir, member, read_manifest, verify_files, write_manifest
from seater_dist.files import load_npy

SCHEMA_VERSION = 1
_ARRAYS = ("codes", "children", "parent", "level")


class TreeError(ValueError):
    """An ItemTree that breaks an invariant of docs/method.md §1; the message says which."""


def depth_for(num_items: int, k: int) -> int:
    """D = ceil(log_k N), and 1 when N <= k (computed in integers, no float log)."""
    if num_items < 1 or k < 2:
        raise TreeError(f"need num_items >= 1 and k >= 2, got N={num_items}, k={k}")
    depth, capacity = 1, k
    while capacity < num_items:
        depth, capacity = depth + 1, capacity * k
    return depth


@dataclass
class ItemTree:
    """A k-ary tree over N items with equal-length identifiers of D tokens."""

    num_items: int
    k: int
    depth: int
    codes: np.ndarray
    children: np.ndarray
    parent: np.ndarray
    level: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- token layout
    @property
    def bos(self) -> int:
        return self.num_items

    @property
    def pad(self) -> int:
        return self.num_items + 1

    @property
    def num_tokens(self) -> int:
        return int(self.parent.shape[0])

    @property
    def num_internal(self) -> int:
        return self.num_tokens - self.num_items - 2

    def level_range(self, lvl: int) -> tuple[int, int]:
        """[start, stop) token ids of internal level ``lvl`` (1..D-1); items for lvl = D."""
        if lvl == self.depth:
            return 0, self.num_items
        if lvl == 0:
            return self.bos, self.bos + 1
        tokens = np.flatnonzero(self.level[self.num_items + 2 :] == lvl) + self.num_items + 2
        return (int(tokens[0]), int(tokens[-1]) + 1) if tokens.size else (0, 0)

    # ---------------------------------------------------------------- helpers for search/training
    def children_of(self, tokens: np.ndarray) -> np.ndarray:
        """Children of BOS/internal tokens. tokens int [...] (all >= N) -> int32 [..., k], -1 padded."""
        tokens = np.asarray(tokens)
        if tokens.size and tokens.min() < self.num_items:
            raise TreeError("children_of: items are leaves and have no children")
        return self.children[tokens - self.num_items]

    def ancestor(self, items: np.ndarray, depth: int) -> np.ndarray:
        """Token at ``depth`` on each item's path: 0 gives BOS, D gives the item itself. int [...] -> int [...]"""
        items = np.asarray(items)
        if not 0 <= depth <= self.depth:
            raise TreeError(f"ancestor depth must be in 0..{self.depth}, got {depth}")
        if depth == 0:
            return np.full(items.shape, self.bos, dtype=np.int32)
        return self.codes[items, depth - 1]

    def items_under(self, token: int) -> np.ndarray:
        """All items (sorted ids) in the subtree of ``token`` (BOS gives every item)."""
        if token == self.bos:
            return np.arange(self.num_items, dtype=np.int64)
        if token < self.num_items:
            return np.array([token], dtype=np.int64)
        lvl = int(self.level[token])
        if lvl <= 0:
            raise TreeError(f"token {token} is PAD or not a tree node")
        return np.flatnonzero(self.codes[:, lvl - 1] == token)

    def subtree_means(self, item_emb: np.ndarray) -> np.ndarray:
        """Token rows from item rows: float32 [num_tokens, d] holding each item's own row, each internal
        node's mean over the items below it, the mean of all items for BOS, zeros for PAD."""
        item_emb = np.asarray(item_emb, dtype=np.float32)
        if item_emb.ndim != 2 or item_emb.shape[0] != self.num_items:
            raise TreeError(f"item embeddings have shape {item_emb.shape}, expected ({self.num_items}, d)")
        out = np.zeros((self.num_tokens, item_emb.shape[1]), dtype=np.float32)
        out[: self.num_items] = item_emb
        out[self.bos] = item_emb.mean(0)
        for lvl in range(self.depth - 1):
            node = self.codes[:, lvl].astype(np.int64)
            order = np.argsort(node, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(node[order]) != 0])
            sums = np.add.reduceat(item_emb[order].astype(np.float64), starts, axis=0)
            counts = np.diff(np.r_[starts, order.size])
            out[node[order][starts]] = (sums / counts[:, None]).astype(np.float32)
        return out

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_paths(cls, paths: np.ndarray, k: int, manifest: dict[str, Any] | None = None) -> "ItemTree":
        """Number a tree given each item's branch index at every internal level.

        paths: int [N, D-1], paths[i, l] in 0..k-1 is the child taken at level l (root = level 0)
        on item i's way down. Items sharing paths[i, :L] share their level-L ancestor. The last
        internal node's children are its items in increasing id order. D-1 may be 0 (N <= k).
        """
        paths = np.asarray(paths, dtype=np.int64)
        if paths.ndim != 2:
            raise TreeError(f"paths must be 2-D [N, D-1], got shape {paths.shape}")
        n, internal_levels = paths.shape
        depth = internal_levels + 1
        if paths.size and (paths.min() < 0 or paths.max() >= k):
            raise TreeError(f"paths entries must be in 0..{k - 1}")
        codes = np.empty((n, depth), dtype=np.int32)
        codes[:, -1] = np.arange(n, dtype=np.int32)
        next_token = n + 2
        prefix_key = np.zeros(n, dtype=np.int64)
        parent_of_level: list[np.ndarray] = []  # per internal level: parent token of each new node
        prev_tokens = np.full(n, n, dtype=np.int64)  # BOS
        for lvl in range(internal_levels):
            # prefix_key holds the dense rank of the item's prefix, so it never overflows however deep
            prefix_key = prefix_key * k + paths[:, lvl]
            uniq, inverse = np.unique(prefix_key, return_inverse=True)
            tokens = next_token + inverse
            first = np.zeros(uniq.size, dtype=np.int64)
            first[inverse[::-1]] = np.arange(n - 1, -1, -1)  # some item of each node
            parent_of_level.append(prev_tokens[first])
            codes[:, lvl] = tokens
            prev_tokens = tokens
            next_token += uniq.size
            prefix_key = inverse.astype(np.int64)
        num_tokens = next_token
        parent = np.full(num_tokens, -1, dtype=np.int32)
        level = np.full(num_tokens, -1, dtype=np.int32)
        level[n] = 0
        start = n + 2
        for lvl, par in enumerate(parent_of_level, start=1):
            parent[start : start + par.size] = par
            level[start : start + par.size] = lvl
            start += par.size
        parent[:n] = prev_tokens
        level[:n] = depth
        children = _children_table(parent, n, k)
        tree = cls(n, k, depth, codes, children, parent, level, dict(manifest or {}))
        return tree

    # ---------------------------------------------------------------- checks
    def validate(self, balanced: bool | None = None) -> None:
        """Raise TreeError unless every invariant of docs/method.md §1 holds.

        balanced: also check every split's sizes are in {floor(n/k), floor(n/k)+1}
        (default: the manifest's ``balanced`` flag, True when absent).
        """
        n, k, depth = self.num_items, self.k, self.depth
        if self.codes.shape != (n, depth):
            raise TreeError(f"codes has shape {self.codes.shape}, expected ({n}, {depth})")
        if not np.array_equal(self.codes[:, -1], np.arange(n)):
            raise TreeError("codes[:, -1] must be the item ids 0..N-1 (each item exactly one leaf)")
        if self.children.shape != (self.num_tokens - n, k):
            raise TreeError(f"children has shape {self.children.shape}, expected ({self.num_tokens - n}, {k})")
        if self.parent[n] != -1 or self.parent[n + 1] != -1 or self.level[n] != 0 or self.level[n + 1] != -1:
            raise TreeError("BOS/PAD rows of parent/level are wrong")
        for lvl in range(depth):
            col = self.codes[:, lvl]
            expect_parent = self.codes[:, lvl - 1] if lvl else np.full(n, n)
            if not np.array_equal(self.parent[col], expect_parent):
                raise TreeError(f"level {lvl + 1}: parent array disagrees with codes")
            if not np.all(self.level[col] == lvl + 1):
                raise TreeError(f"level {lvl + 1}: level array disagrees with codes")
        internal_level, internal_parent = self.level[n + 2 :], self.parent[n + 2 :]
        if np.any(np.diff(internal_level) < 0) or np.any(np.diff(internal_parent) < 0):
            raise TreeError("internal nodes must be numbered breadth-first (by level, then by parent)")
        if not np.array_equal(self.children, _children_table(self.parent, n, k)):
            raise TreeError("children table disagrees with parent array")
        used = np.unique(self.codes[:, :-1])
        if used.size != self.num_internal or (used.size and (used[0] != n + 2 or used[-1] != self.num_tokens - 1)):
            raise TreeError("internal tokens must be exactly N+2 .. num_tokens-1, each on some path")
        if depth != depth_for(n, k) and self.manifest.get("balanced", True):
            raise TreeError(f"depth {depth} != ceil(log_k N) = {depth_for(n, k)}")
        if balanced is None:
            balanced = bool(self.manifest.get("balanced", True))
        if balanced:
            self._validate_balance()

    def _validate_balance(self) -> None:
        """Every split of n items gives sizes in {floor(n/k), floor(n/k)+1} (n >= k), else singletons."""
        k = self.k
        subtree = np.zeros(self.num_tokens, dtype=np.int64)
        subtree[: self.num_items] = 1
        for lvl in range(self.depth - 1, 0, -1):  # accumulate leaf counts bottom-up
            lo, hi = self.level_range(lvl)
            kids = self.children[lo - self.num_items : hi - self.num_items]
            subtree[lo:hi] = np.where(kids >= 0, subtree[np.maximum(kids, 0)], 0).sum(1)
        subtree[self.bos] = self.num_items
        nodes = np.concatenate([[self.bos], np.arange(self.num_items + 2, self.num_tokens)])
        kids = self.children_of(nodes)
        sizes = np.where(kids >= 0, subtree[np.maximum(kids, 0)], -1)
        total = subtree[nodes]
        expected_groups = np.minimum(total, k)
        got_groups = (kids >= 0).sum(1)
        bad = got_groups != expected_groups
        lo = total // k
        real = sizes >= 0
        bad |= np.any(real & ((sizes < np.maximum(lo, 1)[:, None]) | (sizes > (lo + 1)[:, None])), axis=1)
        if bad.any():
            node = int(nodes[np.flatnonzero(bad)[0]])
            raise TreeError(
                f"node {node}: split of {int(subtree[node])} items into sizes "
                f"{sizes[np.flatnonzero(bad)[0]][real[np.flatnonzero(bad)[0]]].tolist()} is not balanced"
            )

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, extra_manifest: dict[str, Any] | None = None) -> str | Path:
        """Write the arrays and manifest.json to directory ``path`` (local or URI) atomically (temp dir, then
        rename; on object storage the manifest is published last).

        An existing ``path`` is replaced only if it is a tree directory.
        """
        with atomic_dir(path, "tree") as tmp:
            for name in _ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(self, name))
            manifest = write_manifest(tmp, {
                **self.manifest,
                **(extra_manifest or {}),
                "schema_version": SCHEMA_VERSION,
                "artifact": "tree",
                "num_items": self.num_items,
                "k": self.k,
                "depth": self.depth,
                "num_tokens": self.num_tokens,
            })
        self.manifest = manifest
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, validate: bool = True) -> "ItemTree":
        """Read a tree written by :meth:`save` (local or URI); checks checksums and (by default) invariants."""
        path = artifacts.local_copy(path, TreeError)
        manifest = read_manifest(path, "tree", SCHEMA_VERSION, TreeError)
        files = [f"{name}.npy" for name in _ARRAYS]
        verify_files(path, manifest, files, error=TreeError)
        arrays = {}
        for name, file in zip(_ARRAYS, files):
            arrays[name] = load_npy(member(path, file, TreeError), TreeError, f"a .npy array of the tree's {name}")
        try:
            tree = cls(int(manifest["num_items"]), int(manifest["k"]), int(manifest["depth"]), manifest=manifest,
                       **arrays)
        except (KeyError, TypeError, ValueError) as err:
            raise TreeError(f"{path / 'manifest.json'}: incomplete ({err})") from None
        if validate:
            tree.validate()
        return tree


def _children_table(parent: np.ndarray, num_items: int, k: int) -> np.ndarray:
    """Invert ``parent`` into a [num_tokens - N, k] table, children in increasing token id order."""
    num_rows = parent.shape[0] - num_items
    table = np.full((num_rows, k), -1, dtype=np.int32)
    child = np.flatnonzero(parent >= 0)
    par = parent[child].astype(np.int64)
    order = np.lexsort((child, par))
    child, par = child[order], par[order]
    starts = np.searchsorted(par, par, side="left")
    slot = np.arange(par.size) - starts
    if slot.size and slot.max() >= k:
        raise TreeError(f"a node has more than k={k} children")
    table[par - num_items, slot] = child
    return table
