"""Tests for lenet_embed.pictures: geometry, pixels and PCA maths, computed from the inputs.

The charts are checked through their matplotlib figures (which cells, texts, bars and legend
entries they hold) and through the rendered pixels at the points those artists occupy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lenet_embed import fonts as font_files
from lenet_embed import pictures
from lenet_embed.fonts import MissingFonts
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
    reliability_diagram,
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


# -- charts: helpers ---------------------------------------------------------------------------


def _draw(build, *args):
    """A chart's figure (artists inspectable) and its pixels; the public functions return
    ``_render(build(...))``."""
    figure = build(*args)
    return figure, _pixels(pictures._render(figure))


def _at(figure, pixels: np.ndarray, x: float, y: float) -> np.ndarray:
    """The rendered pixel at data point (x, y) of the figure's main axes."""
    px, py = figure.axes[0].transData.transform((x, y))
    return pixels[int(round(pixels.shape[0] - py)), int(round(px))].astype(int)


def _texts(figure) -> list:
    from matplotlib.text import Text

    return [t for t in figure.findobj(Text) if t.get_visible() and t.get_text()]


# -- confusion matrix --------------------------------------------------------------------------


def _cell(figure, pixels, i: int, j: int) -> np.ndarray:
    """A pixel inside cell (i, j) (row i = true, column j = predicted), near its top-left corner,
    away from the centred count and the rules between cells."""
    return _at(figure, pixels, j - 0.35, i - 0.35)


def test_confusion_cells_counts_and_recalls_follow_the_matrix():
    names = [str(i) for i in range(10)]
    diagonal = np.diag(np.full(10, 100))
    with_error = diagonal.copy()
    with_error[2, 5] = 7
    clean_figure, clean = _draw(pictures._confusion_figure, diagonal, names, "t")
    figure, wrong = _draw(pictures._confusion_figure, with_error, names, "t")
    assert clean.shape == wrong.shape
    for matrix, fig, pixels in ((diagonal, clean_figure, clean), (with_error, figure, wrong)):
        for i, j in np.ndindex(10, 10):
            r, g, b = _cell(fig, pixels, i, j)
            if i == j:
                assert b > r + 60, (i, j)  # blue
            elif matrix[i, j]:
                assert r > g + 40 and r > b + 40, (i, j)  # a red shade
            else:
                assert (r, g, b) == (255, 255, 255), (i, j)
    ax = figure.axes[0]
    written = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
               for t in ax.texts}
    assert written == {(i, j): str(with_error[i, j]) for i, j in np.ndindex(10, 10)}
    recalls = [t.get_text() for t in ax.child_axes[0].get_yticklabels()]
    assert recalls == ["100.0%"] * 2 + [f"{100 / 107:.1%}"] + ["100.0%"] * 7
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert "1007 samples, accuracy 99.30%" in ax.get_title(loc="left")


def test_confusion_larger_error_share_is_darker():
    names = ["a", "b", "c"]
    small = np.array([[990, 10, 0], [0, 50, 0], [0, 0, 50]])
    large = np.array([[700, 300, 0], [0, 50, 0], [0, 0, 50]])
    light = _cell(*_draw(pictures._confusion_figure, small, names, ""), 0, 1)
    dark = _cell(*_draw(pictures._confusion_figure, large, names, ""), 0, 1)
    assert light.sum() > dark.sum()
    assert light[1] < 245  # 1% of the row is still clearly tinted


def test_confusion_rejects_bad_shapes_and_counts():
    with pytest.raises(ValueError, match="square"):
        confusion_image(np.zeros((2, 3), dtype=int), ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        confusion_image(np.zeros((0, 0), dtype=int), [])
    with pytest.raises(ValueError, match="class names"):
        confusion_image(np.eye(3, dtype=int), ["a", "b"])
    for bad in (-1, np.nan, np.inf):
        with pytest.raises(ValueError, match="finite and non-negative"):
            confusion_image(np.array([[1.0, bad], [0.0, 1.0]]), ["a", "b"])


def test_confusion_long_names_are_cut_and_turned_and_stay_on_the_page():
    names = ["circle", "triangle", "long-name-square " * 20]
    figure, pixels = _draw(pictures._confusion_figure, np.eye(3, dtype=int) * 5, names, "")
    ax = figure.axes[0]
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels[:2]] == names[:2]
    assert len(labels[2].get_text()) == pictures.NAME_CHARS
    assert labels[2].get_text().endswith("...")
    assert all(t.get_rotation() == 90 for t in labels)
    height, width = pixels.shape[:2]
    renderer = figure.canvas.get_renderer()
    for text in _texts(figure):
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text


def test_confusion_of_many_classes_stays_readable_in_size():
    n = 200
    matrix = np.diag(np.arange(1, n + 1))
    figure, pixels = _draw(pictures._confusion_figure, matrix, [f"c{i}" for i in range(n)], "")
    ax = figure.axes[0]
    assert not ax.texts  # past COUNTS_UP_TO classes, colours only
    assert len(ax.get_yticklabels()) == n // 2  # every other name: 6.6 px cells
    assert max(pixels.shape[:2]) < 2000
    for i in (0, n // 2, n - 1):  # the diagonal is still blue, the rest white
        assert _at(figure, pixels, i, i)[2] > _at(figure, pixels, i, i)[0] + 60
        assert tuple(_at(figure, pixels, (i + 7) % n, i)) == (255, 255, 255)


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


def _crop(pixels: np.ndarray, box) -> np.ndarray:
    """The pixels inside a display-space bounding box (origin bottom left)."""
    height = pixels.shape[0]
    return pixels[int(height - box.y1) : int(height - box.y0), int(box.x0) : int(box.x1)]


def test_embedding_map_draws_each_present_label_in_its_palette_colour():
    rng = _rng(4)
    labels = np.repeat([0, 1, 2, 13], 25)  # 13 cycles to PALETTE[3]
    centres = np.array([[-10.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    points = centres[np.repeat(np.arange(4), 25)] + rng.normal(size=(100, 2)) * 0.5
    names = [str(i) for i in range(14)]
    figure, pixels = _draw(pictures._embedding_figure, points, labels, names, "map")
    ax = figure.axes[0]
    plot = _crop(pixels, ax.get_window_extent())
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
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["0  (25)", "1  (25)", "2  (25)",
                                                        "13  (25)"]
    swatches = _crop(pixels, legend.get_window_extent())
    for key in (0, 1, 2, 3):
        assert _colour_mask(swatches, PALETTE[key]).sum() >= 60  # a ~9x9 px swatch
    assert len(ax.collections[0].get_offsets()) == 100
    assert ax.get_title(loc="left") == "100 points"


def test_embedding_map_string_labels_and_many_points():
    rng = _rng(5)
    labels = np.array(["cat", None, "dog"] * 3334, dtype=object)[:10_000]
    image = embedding_map(rng.normal(size=(10_000, 2)), labels)
    assert image.size == (860, 700)
    pixels = _pixels(image)
    for key in range(3):  # sorted names "-", "cat", "dog" take the first three colours
        assert _colour_mask(pixels, PALETTE[key]).sum() > 100
    assert not _colour_mask(pixels, PALETTE[4]).any()


def test_embedding_map_legend_is_capped():
    labels = np.array([f"name{i % 45}" for i in range(450)], dtype=object)
    figure = pictures._embedding_figure(_rng(6).normal(size=(450, 2)), labels, None, "")
    entries = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert len(entries) == pictures.LEGEND_ENTRIES + 1
    assert entries[0] == "name0  (10)" and entries[-1] == "+ 15 more labels"


def test_embedding_map_copes_with_one_point_nan_and_bad_shapes():
    single = embedding_map(np.array([[1.0, 2.0]]), np.array([4]))
    assert _colour_mask(_pixels(single), PALETTE[4]).sum() > 1
    figure, with_nan = _draw(pictures._embedding_figure, np.array([[0.0, 0.0], [np.nan, 1.0]]),
                             np.array([0, 1]), None, "")
    assert not _colour_mask(with_nan, PALETTE[1]).any()
    assert figure.axes[0].get_title(loc="left") == "1 points (1 non-finite left out)"
    empty = embedding_map(np.zeros((0, 2)), np.zeros(0, dtype=int))
    assert empty.size == (860, 700)
    with pytest.raises(ValueError):
        embedding_map(np.zeros((3, 3)), np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        embedding_map(np.zeros((3, 2)), np.zeros(4, dtype=int))


# -- reliability diagram -----------------------------------------------------------------------

_COUNTS = np.array([0, 0, 5, 20, 0, 40, 100, 300, 0, 500.0])
_ACCURACY = np.array([0, 0, 0.2, 0.5, 0, 0.55, 0.7, 0.8, 0, 0.95])
_CONFIDENCE = np.array([0, 0, 0.25, 0.35, 0, 0.55, 0.65, 0.75, 0, 0.97])


def test_reliability_bars_gaps_and_counts_follow_the_bins():
    figure, pixels = _draw(pictures._reliability_figure, _COUNTS, _ACCURACY, _CONFIDENCE, "t")
    ax = figure.axes[0]
    centres = (np.arange(10) + 0.5) / 10
    filled = _COUNTS > 0
    bars, gaps = ax.containers
    np.testing.assert_allclose([p.get_height() for p in bars], _ACCURACY[filled])
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in bars], centres[filled])
    with_gap = [2, 3, 6, 7, 9]  # bin 5's accuracy is its mean confidence: no gap
    np.testing.assert_allclose([p.get_x() + p.get_width() / 2 for p in gaps], centres[with_gap])
    np.testing.assert_allclose([p.get_y() for p in gaps],
                               np.minimum(_ACCURACY, _CONFIDENCE)[with_gap])
    np.testing.assert_allclose([p.get_height() for p in gaps],
                               np.abs(_ACCURACY - _CONFIDENCE)[with_gap])
    counts = [t.get_text() for t in ax.child_axes[0].get_xticklabels()]
    assert counts == ["5", "20", "40", "100", "300", "500"]
    r, g, b = _at(figure, pixels, centres[3], 0.25)  # inside a bar: blue
    assert b > r + 60
    assert tuple(_at(figure, pixels, centres[4], 0.25)) == (255, 255, 255)  # an empty bin
    assert tuple(_at(figure, pixels, centres[0], 0.6)) == (255, 255, 255)
    assert _is_red(pixels).sum() > 50  # the gaps' outlines


def test_reliability_rejects_mismatched_or_non_finite_bins():
    with pytest.raises(ValueError, match="equal 1-D"):
        reliability_diagram(_COUNTS, _ACCURACY[:-1], _CONFIDENCE)
    with pytest.raises(ValueError, match="equal 1-D"):
        reliability_diagram(np.zeros(0), np.zeros(0), np.zeros(0))
    bad = _ACCURACY.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        reliability_diagram(_COUNTS, bad, _CONFIDENCE)
    bad[2], bad[0] = 0.2, np.nan  # a NaN in an empty bin is nobody's business
    assert reliability_diagram(_COUNTS, bad, _CONFIDENCE).size == (560, 620)


# -- every chart -------------------------------------------------------------------------------

_HOSTILE = ["$\\frac{", "a\nb\x00c\u2028d", "x" * 300]  # bad mathtext, line breaks, too long
_CHARTS = {
    "confusion": (pictures._confusion_figure, confusion_image,
                  (np.eye(3, dtype=int) * 5 + 1, _HOSTILE, "$\\bad{ title")),
    "map": (pictures._embedding_figure, embedding_map,
            (_rng(7).normal(size=(30, 2)), np.arange(30) % 3, _HOSTILE, "$\\bad{ title")),
    "reliability": (pictures._reliability_figure, reliability_diagram,
                    (_COUNTS, _ACCURACY, _CONFIDENCE, "$\\bad{ title\nECE 0.1")),
}


@pytest.mark.parametrize("chart", sorted(_CHARTS))
def test_chart_text_is_literal_in_matplotlibs_dejavu_and_on_the_page(chart):
    import matplotlib

    build, _, args = _CHARTS[chart]
    mine = {str(font_files.font_file(name)) for name in ("DejaVuSans.ttf",
                                                         "DejaVuSans-Bold.ttf")}
    # A matplotlibrc asking for LaTeX and a serif family changes nothing (LaTeX would fail).
    with matplotlib.rc_context({"text.usetex": True, "font.family": "serif"}):
        figure, pixels = _draw(build, *args)
    height, width = pixels.shape[:2]
    assert (width, height) == tuple(np.round(figure.get_size_inches() * pictures.DPI))
    renderer = figure.canvas.get_renderer()
    texts = _texts(figure)
    assert len(texts) >= 5
    for text in texts:
        assert not text.get_usetex() and not text.get_parse_math(), text
        assert str(text.get_fontproperties().get_file()) in mine, text
        assert not any(c in text.get_text() for c in "\x00\u2028"), text
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text
    assert figure.get_suptitle().startswith("$\\bad{ title")  # one line, as written
    assert "\n" not in figure.get_suptitle()
    if chart != "reliability":  # a name with line breaks and a NUL, on one line
        assert any(t.get_text().startswith("a b c d") for t in texts)


def test_render_sets_any_text_in_matplotlibs_dejavu_keeping_size_and_weight():
    import matplotlib

    with matplotlib.rc_context({"font.family": "serif", "text.usetex": True}):
        figure = pictures._figure(300, 200)
        ax = figure.add_subplot()
        plain = ax.text(0.1, 0.5, "$\\plain{")  # rc's serif family, LaTeX, mathtext
        heavy = ax.set_title("heavy", fontsize=15, fontweight="bold")
        pictures._render(figure)
    assert plain.get_fontproperties().get_file() == str(font_files.font_file("DejaVuSans.ttf"))
    assert heavy.get_fontproperties().get_file() == str(font_files.font_file("DejaVuSans-Bold.ttf"))
    assert heavy.get_fontproperties().get_size_in_points() == 15
    assert not plain.get_usetex() and not plain.get_parse_math()


@pytest.mark.parametrize("chart", sorted(_CHARTS))
def test_charts_are_deterministic_and_draw_in_threads(chart):
    from concurrent.futures import ThreadPoolExecutor

    _, draw, args = _CHARTS[chart]
    first = _pixels(draw(*args))
    with ThreadPoolExecutor(4) as pool:
        drawn = list(pool.map(lambda _: _pixels(draw(*args)), range(4)))
    for pixels in drawn:
        np.testing.assert_array_equal(pixels, first)


def test_charts_without_matplotlib_refuse_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    for _, draw, args in _CHARTS.values():
        with pytest.raises(MissingFonts, match="pip install matplotlib"):
            draw(*args)


def test_importing_pictures_loads_no_matplotlib():
    code = ("import sys, lenet_embed.pictures, lenet_embed.evaluate, lenet_embed.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert run.stdout.strip() == "[]"


# -- fonts -------------------------------------------------------------------------------------


def test_font_helper_falls_back_without_truetype(monkeypatch):
    monkeypatch.setattr(pictures, "_font_path", lambda name: None)
    pictures._font.cache_clear()
    try:
        font = pictures._font(14)
        assert pictures._text_width("hello", font) > 0
    finally:
        pictures._font.cache_clear()
