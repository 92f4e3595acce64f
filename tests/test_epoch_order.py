"""Training order and randomness: a fresh seeded global shuffle every epoch, reproducible from the seed,
and per-rank seeds so that two workers draw different dropout masks and ranking negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.local_prepare import prepare_local
from bench.synthetic import random_balanced_tree
from seater_dist.config import PrepareSettings
from seater_dist.data.samples import expand_next_item
from seater_dist.model import losses
from seater_dist.train.loop import _seed_epoch
from seater_dist.train.trainer import train_dataset


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """200 users of 6-12 interactions over 40 items, as a prepared dataset."""
    root = tmp_path_factory.mktemp("order")
    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for user in range(200):
        for t, item in enumerate(rng.integers(0, 40, rng.integers(6, 13))):
            lines.append(f"u{user},i{item},{t}")
    (root / "logs.csv").write_text("\n".join(lines) + "\n")
    out = root / "dataset"
    prepare_local(PrepareSettings(input=str(root / "logs.csv"), format="interactions", out=str(out),
                                  min_user_count=2, min_item_count=1))
    return out


def _epoch_orders(path, seed: int, epochs: int = 2) -> list[list[tuple[int, ...]]]:
    """The (target, *history) samples of ``epochs`` passes over one training dataset, in order."""
    def expand(batch):  # defined here so that Ray ships it by value (the tests are not an installed module)
        return expand_next_item(batch["items"], 4, -1)

    ds = train_dataset(path, expand, seed)
    return [[(int(r["target"]), *map(int, r["history"])) for r in ds.iter_rows()] for _ in range(epochs)]


@pytest.mark.slow
def test_each_epoch_is_a_fresh_shuffle_and_the_seed_reproduces_it(ray_session, small_dataset):
    first_run = _epoch_orders(small_dataset, seed=3)
    second_run = _epoch_orders(small_dataset, seed=3)
    other_seed = _epoch_orders(small_dataset, seed=4)
    epoch_1, epoch_2 = first_run
    assert sorted(epoch_1) == sorted(epoch_2)  # the same samples ...
    assert epoch_1 != epoch_2  # ... in a different order each epoch
    assert first_run == second_run  # the same seed gives the same orders
    assert other_seed[0] != epoch_1


def test_two_workers_draw_different_negatives_and_a_rank_repeats_its_own():
    tree = random_balanced_tree(500, k=4, seed=0)
    sampler = losses.PrefixNegativeSampler(tree)
    ids = torch.from_numpy(tree.codes[:64].astype(np.int64))

    def draw(rank: int, epoch: int) -> torch.Tensor:
        _seed_epoch(seed=0, epoch=epoch, rank=rank)
        return sampler(ids, 4)[0]

    rank0, rank1 = draw(0, 0), draw(1, 0)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank0, draw(0, 0))  # reproducible from (seed, epoch, rank)
    assert not torch.equal(rank0, draw(0, 1))
    _seed_epoch(0, 0, 0)
    mask_0 = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    _seed_epoch(0, 0, 1)
    assert not torch.equal(mask_0, torch.nn.functional.dropout(torch.ones(1000), 0.5))
