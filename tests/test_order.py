"""The data order of training (hiar.order): every item once an epoch across ranks, reshuffled each
epoch, a pure function of the draw number (hence exact on --resume)."""

from collections import Counter

import pytest

from hiar.order import ShuffledOrder, updates_before


def read(size, world, draws, batch, seed=0, first_draw=0):
    """What every rank reads over `draws` draws: {rank: [index, ...]}."""
    return {r: [i for d in range(first_draw, first_draw + draws) for i in ShuffledOrder(size, seed, world, r).draw(d, batch)]
            for r in range(world)}


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 1), (2, 3), (4, 2)])
def test_one_epoch_reads_every_item_exactly_once_across_ranks(world, batch):
    size = 48
    ranks = read(size, world, draws=size // (world * batch), batch=batch)
    counts = Counter(i for items in ranks.values() for i in items)
    assert sorted(counts) == list(range(size)) and set(counts.values()) == {1}
    assert all(len(set(items)) == len(items) for items in ranks.values())  # no rank repeats within an epoch


def test_epochs_are_reshuffled_and_not_strided():
    size, world, batch = 40, 2, 2
    per_epoch = size // (world * batch)
    epoch0 = read(size, world, per_epoch, batch)[0]
    epoch1 = read(size, world, per_epoch, batch, first_draw=per_epoch)[0]
    assert epoch0 != epoch1 and sorted(epoch0) != sorted(epoch1)  # another order and another share of items
    assert epoch0 != list(range(0, size, world))[: len(epoch0)]  # not the old strided pattern
    assert read(size, world, per_epoch, batch, seed=1)[0] != epoch0  # the seed matters


def test_a_resumed_reader_continues_the_same_order():
    """A fresh reader (a resumed run) at draw d reads what the uninterrupted one read at draw d, across
    an epoch boundary too."""
    straight = ShuffledOrder(10, 3, 2, 1)
    whole = [straight.draw(d, 3) for d in range(8)]
    resumed = ShuffledOrder(10, 3, 2, 1)
    assert [resumed.draw(d, 3) for d in range(5, 8)] == whole[5:]


def test_an_endless_stream_is_read_in_order_split_over_ranks():
    assert ShuffledOrder(None, 0, 2, 1).draw(3, 2) == [14, 15]  # positions (3 * 2 + 1) * 2 ...


def test_updates_before_counts_multiples():
    assert [updates_before(s, 5) for s in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    assert [updates_before(s, 1) for s in range(4)] == [0, 1, 2, 3]
