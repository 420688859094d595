"""Non-digits made of digits' pieces (:func:`lenet_embed.nondigits.fragments`).

The promises: the same digits and seed give the same fragments; every fragment is a digit's
tiles rearranged (at most one tile in place), preprocessed as a query is; a digit whose ink lies
in fewer than FRAGMENT_TILES tiles gives none (its pieces could read as a stroke of a digit).
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lenet_embed.nondigits import FRAGMENT_GRID, FRAGMENT_TILES, fragments
from lenet_embed.preprocess import to_mnist, to_uint8


def test_fragments_are_deterministic_and_none_is_its_digit(mnist):
    digits = mnist.train.images[:80]
    first, again = fragments(digits, 1), fragments(digits, 1)
    assert first.dtype == np.uint8 and first.shape[1:] == (28, 28)
    assert 40 < len(first) <= len(digits) and np.array_equal(first, again)
    assert not np.array_equal(first[:10], fragments(digits, 2)[:10])
    assert all(frame.max() > 128 for frame in first)  # ink in every one
    as_queries = {to_uint8(to_mnist(digit)).tobytes() for digit in digits}
    assert not as_queries & {frame.tobytes() for frame in first}


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), tiles=st.sets(st.integers(0, 8), min_size=1, max_size=9))
def test_a_fragment_is_made_only_where_ink_reaches_enough_tiles(seed, tiles):
    # A digit's frame (30x30 once padded by a pixel) with a bright square in each chosen tile.
    side = 30 // FRAGMENT_GRID
    padded = np.zeros((30, 30), np.uint8)
    for tile in tiles:
        row, col = divmod(tile, FRAGMENT_GRID)
        padded[row * side + 3 : row * side + 7, col * side + 3 : col * side + 7] = 255
    made = fragments(padded[1:-1, 1:-1][None], seed)
    assert len(made) == (1 if len(tiles) >= FRAGMENT_TILES else 0)
    if made.size:
        # The same squares, rearranged: each still a blob of its own, none lost or merged.
        assert _blobs(made[0] > 128) == len(tiles)


def _blobs(ink: np.ndarray) -> int:
    """The number of 8-connected blobs of ``ink``."""
    seen = np.zeros_like(ink)
    count = 0
    for start in zip(*np.nonzero(ink), strict=True):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    near = (y + dy, x + dx)
                    if (0 <= near[0] < ink.shape[0] and 0 <= near[1] < ink.shape[1]
                            and ink[near] and not seen[near]):
                        seen[near] = True
                        stack.append(near)
    return count
