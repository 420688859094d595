"""Tests for lenet_embed.pictures: geometry, pixels and PCA maths, computed from the inputs."""

from __future__ import annotations

import numpy as np
import pytest

from lenet_embed import pictures
from lenet_embed.pictures import (
    CELL,
    FRAME,
    GAP,
    MARGIN,
    PALETTE,
    QUERY_BLUE,
    QUERY_GAP,
    ROW_PITCH,
    SCALE,
    TILE,
    WRONG_RED,
    MontageRow,
    confusion_image,
    embedding_map,
    montage,
    montage_size,
    pca_2d,
    tile_box,
)
from lenet_embed.search import Neighbor


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _row(labels: list, reference, seed: int = 0, title: str = "q.png") -> MontageRow:
    rng = _rng(seed)
    query = rng.random((28, 28)).astype(np.float32)
    neighbors = [
        Neighbor(rank=i + 1, id=i, label=label, distance=0.01 * (i + 1))
        for i, label in enumerate(labels)
    ]
    images = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in labels]
    return MontageRow(query, neighbors, images, reference, title)


def _pixels(image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def _frame_strip(pixels: np.ndarray, row: int, column: int) -> np.ndarray:
    """The frame pixels on the left side of a tile, along its middle third."""
    left, top, _, bottom = tile_box(row, column)
    middle = slice(top + TILE // 3, bottom - TILE // 3)
    return pixels[middle, left - FRAME : left]


def _is_red(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(int)
    return (rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)


# -- montage -----------------------------------------------------------------------------------


def test_tile_geometry_constants_fit_together():
    assert TILE == 28 * SCALE
    assert CELL == TILE + 2 * FRAME


@pytest.mark.parametrize(("n_rows", "k"), [(1, 3), (2, 5), (7, 5), (4, 10)])
def test_montage_size_follows_tile_geometry(n_rows, k):
    image = montage([_row(list(range(k)), 0, seed=s) for s in range(n_rows)])
    expected_width = 2 * MARGIN + CELL + QUERY_GAP + k * CELL + (k - 1) * GAP
    assert image.size == montage_size(n_rows, k)
    assert image.width == expected_width
    first_top = tile_box(0, 0)[1]
    last_bottom = tile_box(n_rows - 1, 0)[3]
    assert last_bottom - first_top == (n_rows - 1) * ROW_PITCH + TILE
    assert image.height >= last_bottom + FRAME


def test_montage_grows_by_one_row_pitch_and_one_cell():
    rows = [_row(list(range(5)), 0, seed=s) for s in range(3)]
    base = montage(rows)
    taller = montage(rows + [_row(list(range(5)), 0, seed=9)])
    wider = montage([_row(list(range(6)), 0, seed=s) for s in range(3)])
    assert taller.size == (base.width, base.height + ROW_PITCH)
    assert wider.size == (base.width + CELL + GAP, base.height)


def test_columns_k_cuts_long_rows_and_pads_short_ones():
    rows = [_row(list(range(8)), 0), _row(list(range(2)), 0, seed=1)]
    assert montage(rows).width == montage_size(2, 8)[0]
    assert montage(rows, columns_k=4).size == montage_size(2, 4)
    padded = _pixels(montage(rows, columns_k=4))
    left, top, right, bottom = tile_box(1, 4)  # the short row has no 4th neighbour
    assert (padded[top:bottom, left:right] == 255).all()


def test_query_and_neighbor_tiles_reproduce_upscaled_inputs():
    row = _row([3, 3, 3], 3, seed=5)
    pixels = _pixels(montage([_row([1], 1, seed=2), row]))
    expected_query = np.round(row.query.astype(np.float64) * 255).astype(np.uint8)
    left, top, right, bottom = tile_box(1, 0)
    tile = pixels[top:bottom, left:right]
    assert tile.shape == (TILE, TILE, 3)
    assert (tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all()
    upscaled = np.repeat(np.repeat(expected_query, SCALE, axis=0), SCALE, axis=1)
    np.testing.assert_array_equal(tile[..., 0], upscaled)
    # A single interior pixel of source pixel (r, c) carries that pixel's value.
    r, c = 13, 20
    centre = pixels[top + r * SCALE + SCALE // 2, left + c * SCALE + SCALE // 2]
    assert tuple(centre) == (expected_query[r, c],) * 3
    for column, image in enumerate(row.neighbor_images, start=1):
        left, top, right, bottom = tile_box(1, column)
        upscaled = np.repeat(np.repeat(image, SCALE, axis=0), SCALE, axis=1)
        np.testing.assert_array_equal(pixels[top:bottom, left:right, 1], upscaled)


def test_wrong_label_neighbor_is_framed_and_captioned_in_red():
    row = _row([7, 1, 7, "7"], 7)
    pixels = _pixels(montage([row]))
    assert (_frame_strip(pixels, 0, 2) == WRONG_RED).all()
    for column in (1, 3, 4):  # 7, and "7" counts as the same label as 7
        strip = _frame_strip(pixels, 0, column)
        assert not _is_red(strip).any()
    assert (_frame_strip(pixels, 0, 0) == QUERY_BLUE).all()

    def caption_has_red(column: int) -> bool:
        left, _, right, bottom = tile_box(0, column)
        caption = pixels[bottom + FRAME : bottom + FRAME + 20, left - FRAME : right + FRAME]
        return bool(_is_red(caption).sum() > 5)

    assert caption_has_red(2)
    assert not caption_has_red(1)
    assert not caption_has_red(3)


def test_no_reference_or_unknown_label_marks_nothing():
    unjudged = _pixels(montage([_row([1, 2, None], None)]))
    unknown = _pixels(montage([_row([None, 4], 4)]))
    for pixels, k in ((unjudged, 3), (unknown, 2)):
        for column in range(1, k + 1):
            assert not _is_red(_frame_strip(pixels, 0, column)).any()


def test_string_labels_are_judged_too():
    pixels = _pixels(montage([_row(["cat", "dog"], "cat")]))
    assert not _is_red(_frame_strip(pixels, 0, 1)).any()
    assert (_frame_strip(pixels, 0, 2) == WRONG_RED).all()


def test_montage_handles_k20_and_hundreds_of_rows():
    rows = [
        _row([i % 10 for i in range(20)], r % 10, seed=r % 7, title=f"q{r}") for r in range(200)
    ]
    image = montage(rows)
    assert image.size == montage_size(200, 20)
    pixels = _pixels(image)
    # Row 199 neighbour 20 (label 9) against reference 9: not red; neighbour 1 (label 0): red.
    assert not _is_red(_frame_strip(pixels, 199, 20)).any()
    assert (_frame_strip(pixels, 199, 1) == WRONG_RED).all()


def test_montage_rejects_mismatched_images_and_draws_empty_page():
    row = _row([1, 2], 1)
    bad = MontageRow(row.query, row.neighbors, row.neighbor_images[:1], 1)
    with pytest.raises(ValueError, match="neighbor images"):
        montage([bad])
    assert montage([]).size == montage_size(0, 0)


# -- confusion matrix --------------------------------------------------------------------------


def _cell_corner(layout, i: int, j: int) -> tuple[int, int]:
    """A pixel inside cell (i, j), away from its centred count text and its outline."""
    return layout.grid_y + i * layout.cell + 3, layout.grid_x + j * layout.cell + 3


def test_confusion_off_diagonal_error_changes_the_expected_cell():
    names = [str(i) for i in range(10)]
    diagonal = np.diag(np.full(10, 100))
    with_error = diagonal.copy()
    with_error[2, 5] = 7
    clean = _pixels(confusion_image(diagonal, names, "t"))
    wrong = _pixels(confusion_image(with_error, names, "t"))
    assert clean.shape == wrong.shape
    layout = pictures._confusion_layout(10, names, "t")

    y, x = _cell_corner(layout, 2, 5)
    assert tuple(clean[y, x]) == (255, 255, 255)
    r, g, b = wrong[y, x].astype(int)
    assert r > g + 40 and r > b + 40  # a red shade: visible, but not the diagonal blue

    for i in range(10):  # diagonal cells are blue in both
        y, x = _cell_corner(layout, i, i)
        for pixels in (clean, wrong):
            r, g, b = pixels[y, x].astype(int)
            assert b > r + 60
    # Within the grid only the true-label row 2 changes (its error cell, its diagonal shade, its
    # recall); above it only the subtitle (sample count, accuracy) does.
    grid_clean, grid_wrong = clean[layout.grid_y :], wrong[layout.grid_y :]
    changed_rows = layout.grid_y + np.flatnonzero((grid_clean != grid_wrong).any(axis=(1, 2)))
    row_top = layout.grid_y + 2 * layout.cell
    assert changed_rows.min() >= row_top
    assert changed_rows.max() < row_top + layout.cell
    changed_cols = np.flatnonzero((grid_clean != grid_wrong).any(axis=(0, 2)))
    assert changed_cols.min() >= layout.grid_x + 2 * layout.cell
    above = np.flatnonzero((clean[: layout.grid_y] != wrong[: layout.grid_y]).any(axis=(1, 2)))
    assert above.max() < layout.caption_y


def test_confusion_larger_error_share_is_darker():
    names = ["a", "b", "c"]
    small = np.array([[990, 10, 0], [0, 50, 0], [0, 0, 50]])
    large = np.array([[700, 300, 0], [0, 50, 0], [0, 0, 50]])
    layout = pictures._confusion_layout(3, names, "")
    y, x = _cell_corner(layout, 0, 1)
    light = _pixels(confusion_image(small, names))[y, x].astype(int)
    dark = _pixels(confusion_image(large, names))[y, x].astype(int)
    assert light.sum() > dark.sum()
    assert light[1] < 245  # 1% of the row is still clearly tinted


def test_confusion_rejects_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        confusion_image(np.zeros((2, 3), dtype=int), ["a", "b"])
    with pytest.raises(ValueError, match="class names"):
        confusion_image(np.eye(3, dtype=int), ["a", "b"])


def test_confusion_long_names_still_draw():
    image = confusion_image(np.eye(3, dtype=int) * 5, ["circle", "triangle", "long-name-square"])
    layout = pictures._confusion_layout(3, ["circle", "triangle", "long-name-square"], "")
    assert layout.rotate_names
    assert image.size == (layout.width, layout.height)


# -- PCA ---------------------------------------------------------------------------------------


def _pairwise(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points[:, None, :] - points[None, :, :], axis=-1)


def test_pca_recovers_a_plane_in_84d_up_to_rotation():
    rng = _rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(84, 2)))  # orthonormal columns
    coords = rng.normal(size=(200, 2)) * [5.0, 2.0]
    vectors = coords @ basis.T + rng.normal(size=84) * 3
    projected = pca_2d(vectors)
    assert projected.shape == (200, 2)
    np.testing.assert_allclose(_pairwise(projected), _pairwise(coords), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(projected.mean(axis=0), 0.0, atol=1e-5)


def test_pca_component_variances_are_the_top_eigenvalues():
    rng = _rng(2)
    vectors = rng.normal(size=(500, 84)) @ rng.normal(size=(84, 84))
    projected = pca_2d(vectors)
    variances = projected.var(axis=0, ddof=1)
    assert variances[0] >= variances[1]
    eigenvalues = np.linalg.eigvalsh(np.cov(vectors, rowvar=False))[::-1]
    np.testing.assert_allclose(variances, eigenvalues[:2], rtol=1e-8)
    assert abs(np.corrcoef(projected.T)[0, 1]) < 1e-8


def test_pca_sign_is_deterministic():
    rng = _rng(3)
    vectors = rng.normal(size=(100, 10)) * np.arange(1, 11)
    projected = pca_2d(vectors)
    np.testing.assert_allclose(pca_2d(-vectors), -projected, atol=1e-9)
    np.testing.assert_allclose(pca_2d(vectors + 7.0), projected, atol=1e-9)
    np.testing.assert_array_equal(pca_2d(vectors), projected)


def test_pca_degenerate_inputs():
    assert pca_2d(np.zeros((0, 84))).shape == (0, 2)
    line = np.outer(np.arange(5.0), np.ones(3))
    projected = pca_2d(line)
    np.testing.assert_allclose(projected[:, 1], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.abs(np.diff(projected[:, 0])), np.sqrt(3.0))
    one_d = pca_2d(np.arange(4.0)[:, None])
    np.testing.assert_allclose(one_d, [[-1.5, 0], [-0.5, 0], [0.5, 0], [1.5, 0]])


# -- embedding map -----------------------------------------------------------------------------


def _colour_mask(pixels: np.ndarray, colour) -> np.ndarray:
    return (pixels == np.array(colour, dtype=np.uint8)).all(axis=-1)


def test_embedding_map_draws_each_present_label_in_its_palette_colour():
    rng = _rng(4)
    labels = np.repeat([0, 1, 2, 13], 25)  # 13 cycles to PALETTE[3]
    centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    points = centres[np.repeat(np.arange(4), 25)] + rng.normal(size=(100, 2)) * 0.5
    pixels = _pixels(embedding_map(points, labels, [str(i) for i in range(14)], "map"))
    plot = pixels[:, : MARGIN + pictures.PLOT_SIZE]  # leave the legend swatches out
    for key, centre in zip([0, 1, 2, 3], centres, strict=True):
        mask = _colour_mask(plot, PALETTE[key])
        assert mask.sum() > 25
        ys, xs = np.nonzero(mask)
        if centre[0] < 0:
            assert xs.mean() < plot.shape[1] / 2
        if centre[0] > 0:
            assert xs.mean() > plot.shape[1] / 2
        if centre[1] > 0:  # y grows upwards
            assert ys.mean() < np.nonzero(_colour_mask(plot, PALETTE[3]))[0].mean()
    assert not _colour_mask(pixels, PALETTE[5]).any()  # label 5 absent: no brown anywhere
    legend = pixels[:, MARGIN + pictures.PLOT_SIZE :]
    for key in (0, 1, 2, 3):
        assert _colour_mask(legend, PALETTE[key]).sum() >= 100  # a 12x12 swatch


def test_embedding_map_string_labels_and_many_points():
    rng = _rng(5)
    labels = np.array(["cat", None, "dog"] * 3334, dtype=object)[:10_000]
    image = embedding_map(rng.normal(size=(10_000, 2)), labels)
    pixels = _pixels(image)
    for key in range(3):  # sorted names "-", "cat", "dog" take the first three colours
        assert _colour_mask(pixels, PALETTE[key]).sum() > 100
    assert not _colour_mask(pixels, PALETTE[4]).any()


def test_embedding_map_copes_with_one_point_nan_and_bad_shapes():
    single = embedding_map(np.array([[1.0, 2.0]]), np.array([4]))
    assert _colour_mask(_pixels(single), PALETTE[4]).sum() > 1
    with_nan = embedding_map(np.array([[0.0, 0.0], [np.nan, 1.0]]), np.array([0, 1]))
    assert not _colour_mask(_pixels(with_nan), PALETTE[1]).any()
    with pytest.raises(ValueError):
        embedding_map(np.zeros((3, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        embedding_map(np.zeros((3, 2)), np.zeros(4, dtype=int))


# -- fonts -------------------------------------------------------------------------------------


def test_font_helper_falls_back_without_truetype(monkeypatch):
    monkeypatch.setattr(pictures, "_font_path", lambda name: None)
    pictures._font.cache_clear()
    try:
        font = pictures._font(14)
        assert pictures._text_width("hello", font) > 0
    finally:
        pictures._font.cache_clear()
