"""The merge policy of unsealed segments is bounded for any sequence of add sizes.

The promise (:func:`lenet_embed.store.faiss._merged_with`): the ``n`` rows in unsealed segments
are in at most ``3 * (floor(log4(n)) + 1)`` segments, oldest first their tiers never rise and no
tier holds four, and each row is rewritten at most ``floor(log4(n))`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lenet_embed import SearchIndex
from lenet_embed.bundle import Segment
from lenet_embed.store.faiss import MERGE_FACTOR, _merged_with, _tier


def bound(rows: int) -> int:
    """The promised most unsealed segments for ``rows`` unsealed rows."""
    return (MERGE_FACTOR - 1) * (_tier(rows) + 1)


@dataclass
class Simulated:
    """The segment list a sequence of adds leaves, as ``_append_segment`` makes it, and for each
    segment the most times any of its rows has been rewritten."""

    segments: list[Segment]
    rewrites: list[int]
    written: int = 0

    def add(self, rows: int) -> None:
        merged = _merged_with(self.segments, rows)
        split = len(self.segments) - merged
        size = rows + sum(s.rows for s in self.segments[split:])
        most = max((r + 1 for r in self.rewrites[split:]), default=0)
        self.written += 1
        self.segments = [*self.segments[:split],
                         Segment(name=f"s{self.written}", rows=size, sealed=False)]
        self.rewrites = [*self.rewrites[:split], most]

    def check(self) -> None:
        unsealed = [(s, r) for s, r in zip(self.segments, self.rewrites, strict=True)
                    if not s.sealed]
        n = sum(s.rows for s, _ in unsealed)
        tiers = [_tier(s.rows) for s, _ in unsealed]
        assert len(unsealed) <= bound(n), (len(unsealed), n, [s.rows for s, _ in unsealed])
        assert tiers == sorted(tiers, reverse=True), tiers
        assert all(tiers.count(t) < MERGE_FACTOR for t in set(tiers)), tiers
        assert max((r for _, r in unsealed), default=0) <= _tier(n)


# Add sizes as streams really come: mostly small, sometimes a batch, in runs and alternations.
sizes = st.one_of(st.integers(1, 5), st.integers(1, 70), st.integers(1, 3000))


@settings(max_examples=60, deadline=None)
@given(pattern=st.lists(sizes, min_size=1, max_size=12), repeats=st.integers(1, 400),
       sealed=st.one_of(st.none(), st.integers(1, 100_000)))
def test_any_add_sizes_keep_the_segment_count_logarithmic(pattern, repeats, sealed):
    start = [Segment(name="s0", rows=sealed, sealed=True)] if sealed else []
    simulated = Simulated(start, [0] * len(start))
    for _ in range(repeats):
        for rows in pattern:
            simulated.add(rows)
            simulated.check()
    if sealed:
        assert simulated.segments[0] == start[0]  # a sealed segment is never merged


@settings(max_examples=40, deadline=None)
@given(st.lists(sizes, min_size=1, max_size=3000))
def test_arbitrary_add_sequences_keep_the_bound(adds):
    simulated = Simulated([], [])
    for rows in adds:
        simulated.add(rows)
        simulated.check()


def test_alternating_adds_of_four_and_one_are_merged():
    simulated = Simulated([Segment(name="s0", rows=60_000, sealed=True)], [0])
    for i in range(10_000):
        simulated.add(4 if i % 2 == 0 else 1)
    assert len(simulated.segments) - 1 <= bound(25_000)  # 9 are left: the old policy left 10,000


def test_a_real_bundle_under_alternating_adds_stays_small_and_exact(bundle_copy, mnist):
    index = SearchIndex.load(bundle_copy)
    images, labels = mnist.test.images[:250], mnist.test.labels[:250]
    added, start = [], 0
    for i in range(100):  # 50 adds of 4 images, 50 of 1
        size = 4 if i % 2 == 0 else 1
        added.append(index.add(images[start:start + size],
                               labels=labels[start:start + size].tolist()))
        start += size
    manifest = index.manifest
    unsealed = [s for s in manifest.segments if not s.sealed]
    assert sum(s.rows for s in unsealed) == start == 250
    assert len(unsealed) <= bound(250)  # 12; the old policy left 100
    tiers = [_tier(s.rows) for s in unsealed]
    assert tiers == sorted(tiers, reverse=True)
    # Every added item is stored once, under its id, with its label, and found as itself.
    ids = np.concatenate(added)
    assert np.array_equal(ids, np.arange(2000, 2250))
    fresh = SearchIndex.load(bundle_copy)
    found = fresh.search_vectors(fresh.embed(images), k=1)
    assert np.array_equal(found.ids[:, 0], ids)
    assert np.array_equal(found.labels[:, 0], labels)
    assert len(fresh) == 2250
