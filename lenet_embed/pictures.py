"""Pictures a person would rather look at than read: neighbour montages, confusion matrices, maps.

Everything returns a PIL RGB image on a white page, ready for ``image.save("out.png")``. Only
Pillow and numpy are used, and the DejaVu Sans font file matplotlib ships (:mod:`.fonts`).

Montage geometry (all in pixels): each 28x28 digit is upscaled ``SCALE`` = 3 times with
nearest-neighbour to a ``TILE`` = 84 px square, drawn inside a ``FRAME`` = 3 px coloured frame,
so a framed cell is ``CELL`` = 90 px wide. Each row is the query cell, a ``QUERY_GAP`` with a thin
separator, then the neighbour cells ``GAP`` apart. A row is ``ROW_PITCH`` tall: a title line, the
cells, a caption line ("label  distance") and a gap. :func:`montage_size` and :func:`tile_box`
give the exact numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from .search import Neighbor, SearchIndex

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
RGB = tuple[int, int, int]

# Colours.
WHITE: RGB = (255, 255, 255)
INK: RGB = (30, 30, 30)
MUTED: RGB = (110, 110, 110)
RULE: RGB = (200, 200, 200)
QUERY_BLUE: RGB = (33, 102, 172)
SAME_GRAY: RGB = (175, 175, 175)
PALE: RGB = (238, 238, 238)
WRONG_RED: RGB = (215, 25, 28)
# Tableau 10: a fixed categorical palette, cycled when there are more classes.
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)

# Montage geometry.
SCALE = 3
TILE = 28 * SCALE
FRAME = 3
CELL = TILE + 2 * FRAME
GAP = 8
QUERY_GAP = 28
MARGIN = 12
HEADER_H = 26
ROW_TITLE_H = 18
CAPTION_H = 20
ROW_GAP = 12
ROW_PITCH = ROW_TITLE_H + CELL + CAPTION_H + ROW_GAP
MIN_WIDTH = 360

# Embedding map geometry.
PLOT_SIZE = 600
PLOT_PAD = 14


@dataclass(frozen=True)
class MontageRow:
    """One query and its neighbours, as one row of a :func:`montage`.

    ``query`` is the (28, 28) float32 image in [0, 1] the model saw (white ink on black), or None
    for a query refused before the model saw it (blank, unreadable ...); ``reason`` says why a query
    has no answer ("not a digit", the error): it is written after the title, and in the query's tile
    when there is no picture. ``neighbors`` are its nearest neighbours in rank order and
    ``neighbor_images`` their (28, 28) uint8 images in the same order. Neighbours whose label
    differs from ``reference_label`` (the true label if known, else the predicted one) are framed
    and captioned in red; ``None`` judges none. ``title`` (e.g. the query's file name) is drawn
    small above the row.
    """

    query: np.ndarray | None
    neighbors: list[Neighbor]
    neighbor_images: list[np.ndarray]
    reference_label: int | str | None
    title: str = ""
    reason: str = ""


# --------------------------------------------------------------------------------------------
# Montage


def montage_rows(
    index: SearchIndex,
    queries: Sequence[np.ndarray | None],
    results: Sequence[list[Neighbor]],
    titles: Sequence[str],
    reference_labels: Sequence[int | str | None] | None = None,
    reasons: Sequence[str] | None = None,
) -> list[MontageRow]:
    """Rows for :func:`montage`: each query as the model saw it (None: refused, see
    :class:`MontageRow`), then its neighbours' images looked up in ``index``. Neighbours are
    judged against ``reference_labels`` (the true labels, when known), else against each
    query's predicted (majority) label; ``reasons`` say why a query has no answer ("" if it
    has one)."""
    from .search import majority_label

    if reference_labels is None:
        reference_labels = [majority_label(neighbors) for neighbors in results]
    if reasons is None:
        reasons = [""] * len(queries)
    return [
        MontageRow(
            query=query,
            neighbors=neighbors,
            neighbor_images=[index.item_image(n.id) for n in neighbors],
            reference_label=reference,
            title=title,
            reason=reason,
        )
        for query, neighbors, title, reference, reason in zip(
            queries, results, titles, reference_labels, reasons, strict=True
        )
    ]


def montage_size(n_rows: int, columns_k: int) -> tuple[int, int]:
    """The (width, height) of a :func:`montage` of ``n_rows`` rows and ``columns_k`` neighbours."""
    width = 2 * MARGIN + CELL
    if columns_k > 0:
        width += QUERY_GAP + columns_k * CELL + (columns_k - 1) * GAP
    return max(width, MIN_WIDTH), 2 * MARGIN + HEADER_H + max(n_rows, 1) * ROW_PITCH


def tile_box(row: int, column: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel box of a digit inside a :func:`montage`.

    ``column`` 0 is the query, 1..k the neighbours by rank. The box excludes the frame, which is
    the ``FRAME`` pixels just outside it.
    """
    left = MARGIN + FRAME
    if column > 0:
        left += CELL + QUERY_GAP + (column - 1) * (CELL + GAP)
    top = MARGIN + HEADER_H + row * ROW_PITCH + ROW_TITLE_H + FRAME
    return left, top, left + TILE, top + TILE


def montage(rows: Sequence[MontageRow], columns_k: int | None = None) -> Image.Image:
    """Draw one row per query: the query (blue frame), then its neighbours with captions.

    A query without a picture (refused before the model saw it) gets a pale tile with its
    ``reason`` in words instead, so every query has its row whatever became of it. Under each
    neighbour is its label and distance ("7  0.012"); a neighbour whose label differs
    from the row's ``reference_label`` gets a red frame and a red bold caption. ``columns_k`` is
    the number of neighbour columns (default: the longest row); longer rows are cut, shorter
    ones leave blanks. Digits are upscaled with nearest-neighbour so they stay crisp.
    """
    for number, row in enumerate(rows):
        if len(row.neighbors) != len(row.neighbor_images):
            raise ValueError(
                f"montage row {number}: {len(row.neighbors)} neighbors but "
                f"{len(row.neighbor_images)} neighbor images"
            )
    k = max((len(row.neighbors) for row in rows), default=0) if columns_k is None else columns_k
    if k < 0:
        raise ValueError(f"columns_k must be >= 0, got {k}")
    width, height = montage_size(len(rows), k)
    page = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(page)
    _montage_header(draw, width)
    if not rows:
        _text(draw, MARGIN, MARGIN + HEADER_H + 8, "no queries", _font(13), MUTED)
    caption_font, wrong_font, title_font = _font(12), _font(12, bold=True), _font(11)
    for r, row in enumerate(rows):
        neighbors = row.neighbors[:k]
        wrong = [_differs(n.label, row.reference_label) for n in neighbors]
        left, top, _, bottom = tile_box(r, 0)
        _montage_row_title(draw, row, wrong, top - FRAME - ROW_TITLE_H, width, title_font)
        if row.query is None:
            _reason_tile(draw, row.reason or "no picture", r, title_font)
        else:
            _paste_tile(page, draw, row.query, r, 0, QUERY_BLUE)
        _caption(draw, "query", left, bottom, caption_font, QUERY_BLUE)
        if neighbors:
            separator_x = MARGIN + CELL + QUERY_GAP // 2
            draw.line([(separator_x, top - FRAME), (separator_x, bottom + FRAME)], fill=RULE)
        for c, (neighbor, image, is_wrong) in enumerate(
            zip(neighbors, row.neighbor_images[:k], wrong, strict=True), start=1
        ):
            colour = WRONG_RED if is_wrong else SAME_GRAY
            _paste_tile(page, draw, image, r, c, colour)
            label = "-" if neighbor.label is None else str(neighbor.label)
            text = f"{label}  {_format_distance(neighbor.distance)}"
            left_c, _, _, _ = tile_box(r, c)
            if is_wrong:
                _caption(draw, text, left_c, bottom, wrong_font, WRONG_RED)
            else:
                _caption(draw, text, left_c, bottom, caption_font, INK)
    return page


def _montage_header(draw: ImageDraw.ImageDraw, width: int) -> None:
    """A one-line key: which frame colour means what, and what a caption says."""
    font = _font(12)
    x, y = MARGIN, MARGIN + 4
    entries = [
        (QUERY_BLUE, "query"),
        (SAME_GRAY, "same label"),
        (WRONG_RED, "different label"),
        (None, "caption: label  distance"),
    ]
    for colour, text in entries:
        needed = (16 if colour else 0) + _text_width(text, font) + 18
        if x + needed > width - MARGIN:
            break
        if colour is not None:
            draw.rectangle([x, y + 1, x + 11, y + 12], outline=colour, width=3)
            x += 16
        _text(draw, x, y, text, font, INK if colour else MUTED)
        x += _text_width(text, font) + 18
    line_y = MARGIN + HEADER_H - 6
    draw.line([(MARGIN, line_y), (width - MARGIN, line_y)], fill=RULE)


def _montage_row_title(
    draw: ImageDraw.ImageDraw,
    row: MontageRow,
    wrong: list[bool],
    y: int,
    width: int,
    font: Font,
) -> None:
    """The row's title, then how many neighbours disagree with its reference label."""
    x = MARGIN
    room = width - 2 * MARGIN
    if row.title:
        title = _fit(row.title, font, room)
        _text(draw, x, y + 2, title, font, INK)
        x += _text_width(title, font) + 12
    if row.reason:
        summary, colour = row.reason, MUTED
    elif row.reference_label is None:
        summary, colour = "not judged", MUTED
    else:
        judged = sum(1 for n in row.neighbors[: len(wrong)] if n.label is not None)
        n_wrong = sum(wrong)
        ref = row.reference_label
        if n_wrong:
            summary, colour = f"reference {ref}: {n_wrong} of {judged} differ", WRONG_RED
        else:
            summary, colour = f"reference {ref}: none of {judged} differ", MUTED
    if x < width - MARGIN:
        _text(draw, x, y + 2, _fit(summary, font, width - MARGIN - x), font, colour)


def _paste_tile(
    page: Image.Image,
    draw: ImageDraw.ImageDraw,
    image: np.ndarray,
    row: int,
    column: int,
    colour: RGB,
) -> None:
    left, top, right, bottom = tile_box(row, column)
    draw.rectangle([left - FRAME, top - FRAME, right + FRAME - 1, bottom + FRAME - 1], fill=colour)
    tile = Image.fromarray(_gray_u8(image)).resize((TILE, TILE), Image.Resampling.NEAREST)
    page.paste(tile.convert("RGB"), (left, top))


def _reason_tile(draw: ImageDraw.ImageDraw, reason: str, row: int, font: Font) -> None:
    """The query cell of a query that has no picture: its frame, and ``reason`` wrapped to fit
    the tile (the last line cut short with "..." when it is too long)."""
    left, top, right, bottom = tile_box(row, 0)
    draw.rectangle([left - FRAME, top - FRAME, right + FRAME - 1, bottom + FRAME - 1],
                   fill=QUERY_BLUE)
    draw.rectangle([left, top, right - 1, bottom - 1], fill=PALE)
    pitch = _line_height(font) + 2
    lines = _wrap(reason, font, TILE - 6, max(1, (TILE - 6) // pitch))
    y = top + (TILE - pitch * len(lines)) // 2
    for line in lines:
        _text(draw, left + (TILE - _text_width(line, font)) // 2, y, line, font, INK)
        y += pitch


def _caption(
    draw: ImageDraw.ImageDraw,
    text: str,
    tile_left: int,
    tile_bottom: int,
    font: Font,
    colour: RGB,
) -> None:
    """Centre ``text`` under the cell whose digit starts at ``tile_left``."""
    text = _fit(text, font, CELL)
    x = tile_left - FRAME + (CELL - _text_width(text, font)) // 2
    _text(draw, x, tile_bottom + FRAME + 3, text, font, colour)


def _differs(label: object, reference: object) -> bool:
    """True when both labels are known and differ (7 and "7" count as the same)."""
    if label is None or reference is None:
        return False
    return not (label == reference or str(label) == str(reference))


def _format_distance(distance: float) -> str:
    distance = float(distance)
    if not math.isfinite(distance):
        return str(distance)
    if abs(distance) < 10:
        return f"{distance:.3f}"
    return f"{distance:.1f}" if abs(distance) < 1000 else f"{distance:.0f}"


def _gray_u8(image: np.ndarray) -> np.ndarray:
    """A 2-D uint8 array from a uint8 image or a float one in [0, 1] (or 0..255)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"expected a 2-D grayscale image, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype.kind == "f":
        values = np.nan_to_num(array.astype(np.float64))
        if values.max() <= 1.0:
            values = values * 255.0
        return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Confusion matrix


@dataclass(frozen=True)
class _ConfusionLayout:
    width: int
    height: int
    grid_x: int
    grid_y: int
    cell: int
    rotate_names: bool
    title_y: int
    subtitle_y: int
    caption_y: int
    names_y: int
    names_h: int
    recall_x: int


def _confusion_fonts(n: int) -> tuple[int, Font, Font]:
    cell = int(np.clip(560 // max(n, 1), 22, 56))
    name_font = _font(int(np.clip(cell * 0.28, 9, 13)))
    count_font = _font(int(np.clip(cell * 0.3, 8, 15)))
    return cell, name_font, count_font


def _confusion_layout(n: int, class_names: Sequence[str], title: str) -> _ConfusionLayout:
    cell, name_font, _ = _confusion_fonts(n)
    caption_font, small = _font(13), _font(11)
    line = _line_height(name_font)
    widths = [_text_width(str(name), name_font) for name in class_names] or [0]
    rotate = max(widths) > cell - 4
    names_h = max(widths) if rotate else line
    y = MARGIN
    title_y = y
    if title:
        y += 24
    subtitle_y = y
    y += 20
    caption_y = y
    y += _line_height(caption_font) + 6
    names_y = y
    grid_y = y + names_h + 6
    grid_x = MARGIN + _line_height(caption_font) + 8 + max(widths) + 6
    recall_x = grid_x + n * cell + 8
    recall_w = max(_text_width("100.0%", small), _text_width("recall", small))
    width = recall_x + recall_w + MARGIN
    width = max(width, 2 * MARGIN + _text_width(title, _font(16, bold=True)))
    width = max(width, 2 * MARGIN + _text_width(_confusion_subtitle(10**6, 10**6), small))
    height = grid_y + n * cell + MARGIN
    return _ConfusionLayout(
        width,
        height,
        grid_x,
        grid_y,
        cell,
        rotate,
        title_y,
        subtitle_y,
        caption_y,
        names_y,
        names_h,
        recall_x,
    )


def _confusion_subtitle(total: int, correct: int) -> str:
    accuracy = f"{correct / total:.2%}" if total else "-"
    return (
        f"{total} samples, accuracy {accuracy}; "
        "shade = share of the true row (blue: correct, red: errors)"
    )


def confusion_image(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Image.Image:
    """Draw a (C, C) confusion matrix (rows = true label, columns = predicted) as a heat map.

    Each cell shows its count. Diagonal cells are blue, shaded by the row's recall; off-diagonal
    cells with errors are red, shaded on a log scale of their share of the row (1 in 1000 is
    still a visible pink), so rare confusions stand out; empty cells are white. Each row's
    recall is printed at its right.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {counts.shape}")
    n = counts.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}x{n} confusion matrix")
    values = counts.astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("confusion matrix counts must be finite and non-negative")
    layout = _confusion_layout(n, class_names, title)
    page = Image.new("RGB", (layout.width, layout.height), WHITE)
    draw = ImageDraw.Draw(page)
    cell, name_font, count_font = _confusion_fonts(n)
    caption_font, small = _font(13), _font(11)
    total, correct = float(values.sum()), float(np.trace(values))
    if title:
        _text(draw, MARGIN, layout.title_y, title, _font(16, bold=True), INK)
    _text(
        draw, MARGIN, layout.subtitle_y, _confusion_subtitle(int(total), int(correct)), small, MUTED
    )
    grid_w = n * cell
    caption_w = _text_width("predicted", caption_font)
    _text(
        draw,
        layout.grid_x + (grid_w - caption_w) // 2,
        layout.caption_y,
        "predicted",
        caption_font,
        INK,
    )
    _vertical_text(page, MARGIN, layout.grid_y + grid_w // 2, "true", caption_font, INK)
    for i, name in enumerate(class_names):
        name = str(name)
        centre = layout.grid_x + i * cell + cell // 2
        if layout.rotate_names:
            _vertical_text(
                page,
                centre - _line_height(name_font) // 2,
                None,
                name,
                name_font,
                INK,
                bottom=layout.names_y + layout.names_h,
            )
        else:
            _text(
                draw,
                centre - _text_width(name, name_font) // 2,
                layout.names_y,
                name,
                name_font,
                INK,
            )
        row_y = layout.grid_y + i * cell + (cell - _line_height(name_font)) // 2
        _text(draw, layout.grid_x - 6 - _text_width(name, name_font), row_y, name, name_font, INK)
    _text(
        draw,
        layout.recall_x,
        layout.names_y + layout.names_h - _line_height(small),
        "recall",
        small,
        MUTED,
    )
    integral = bool(np.all(values == np.round(values)))
    row_totals = values.sum(axis=1)
    for i in range(n):
        for j in range(n):
            x0, y0 = layout.grid_x + j * cell, layout.grid_y + i * cell
            fill = _cell_colour(values[i, j], row_totals[i], diagonal=i == j)
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=fill, outline=(225,) * 3)
            count = values[i, j]
            text = f"{int(round(count))}" if integral else f"{count:.3g}"
            font = _shrink_to_fit(text, count_font, cell - 4)
            colour = RULE if count == 0 else WHITE if _luminance(fill) < 150 else INK
            _text(
                draw,
                x0 + (cell - _text_width(text, font)) // 2,
                y0 + (cell - _line_height(font)) // 2,
                text,
                font,
                colour,
            )
        recall = f"{values[i, i] / row_totals[i]:.1%}" if row_totals[i] else "-"
        _text(
            draw,
            layout.recall_x,
            layout.grid_y + i * cell + (cell - _line_height(small)) // 2,
            recall,
            small,
            MUTED,
        )
    return page


def _cell_colour(count: float, row_total: float, diagonal: bool) -> RGB:
    if count <= 0 or row_total <= 0:
        return WHITE
    share = count / row_total
    if diagonal:
        return _mix(WHITE, QUERY_BLUE, 0.2 + 0.8 * share)
    return _mix(WHITE, WRONG_RED, float(np.clip(1.0 + math.log10(share) / 3.0, 0.25, 1.0)))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    r, g, bl = (round(x + (y - x) * t) for x, y in zip(a, b, strict=True))
    return r, g, bl


def _luminance(colour: RGB) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


# --------------------------------------------------------------------------------------------
# PCA and embedding map


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Project (N, D) vectors onto their first two principal components: (N, 2) float64.

    The data are centred and decomposed with an SVD; each component's sign is fixed so its
    largest-magnitude loading is positive, making the result deterministic. If the data have
    fewer than two dimensions of spread the missing coordinates are zero.
    """
    data = np.asarray(vectors, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"pca_2d expects an (N, D) array, got shape {data.shape}")
    out = np.zeros((data.shape[0], 2))
    if data.shape[0] == 0 or data.shape[1] == 0:
        return out
    centred = data - data.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2].copy()
    for component in components:
        if component[np.argmax(np.abs(component))] < 0:
            component *= -1.0
    projected = centred @ components.T
    out[:, : projected.shape[1]] = projected
    return out


def embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """Scatter (N, 2) points coloured by label, with a legend and a title.

    Integer labels take ``PALETTE[label % 10]`` (so digit 3 is always the same colour) and are
    named ``class_names[label]`` when given; other labels (strings, None) are named by their
    text and coloured in sorted order. Both axes share one scale, so distances look right;
    y grows upwards. Points are drawn in a fixed shuffled order so no class hides another.
    """
    xy = np.asarray(points, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"embedding_map expects (N, 2) points, got shape {xy.shape}")
    label_array = np.asarray(labels)
    if label_array.shape[:1] != xy.shape[:1] or label_array.ndim != 1:
        raise ValueError(f"{label_array.shape} labels for {len(xy)} points")
    colour_index, names = _label_classes(label_array, class_names)
    finite = np.isfinite(xy).all(axis=1)

    head_font, small, legend_font = _font(16, bold=True), _font(11), _font(12)
    plot_top = MARGIN + (24 if title else 0) + 20
    present = sorted(set(colour_index[finite].tolist()) if finite.any() else set())
    counts = {key: int(np.sum(colour_index[finite] == key)) for key in present}
    entries = [f"{names[key]}  ({counts[key]})" for key in present]
    legend_x = MARGIN + PLOT_SIZE + 16
    legend_w = 18 + max([_text_width(e, legend_font) for e in entries] + [40])
    legend_h = 22 + 18 * len(entries)
    width = max(legend_x + legend_w + MARGIN, 2 * MARGIN + _text_width(title, head_font))
    height = plot_top + max(PLOT_SIZE, legend_h) + MARGIN
    page = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(page)
    if title:
        _text(draw, MARGIN, MARGIN, title, head_font, INK)
    dropped = int((~finite).sum())
    subtitle = f"{int(finite.sum())} points" + (
        f" ({dropped} non-finite left out)" if dropped else ""
    )
    _text(draw, MARGIN, plot_top - 20, subtitle, small, MUTED)
    x0, y0 = MARGIN, plot_top
    draw.rectangle([x0, y0, x0 + PLOT_SIZE - 1, y0 + PLOT_SIZE - 1], outline=RULE)

    shown = xy[finite]
    keys = colour_index[finite]
    if len(shown):
        low, high = shown.min(axis=0), shown.max(axis=0)
        span = float(max(high[0] - low[0], high[1] - low[1]))
        scale = (PLOT_SIZE - 2 * PLOT_PAD) / span if span > 0 else 0.0
        centre = (low + high) / 2.0
        px = x0 + PLOT_SIZE / 2 + (shown[:, 0] - centre[0]) * scale
        py = y0 + PLOT_SIZE / 2 - (shown[:, 1] - centre[1]) * scale
        radius = 3.0 if len(shown) <= 1000 else 2.0
        order = np.random.default_rng(0).permutation(len(shown))
        for i in order:
            colour = PALETTE[keys[i] % len(PALETTE)]
            draw.ellipse(
                [px[i] - radius, py[i] - radius, px[i] + radius, py[i] + radius], fill=colour
            )
    else:
        _text(draw, x0 + PLOT_PAD, y0 + PLOT_PAD, "no points", legend_font, MUTED)

    _text(draw, legend_x, plot_top, "label", _font(12, bold=True), INK)
    for row, (key, entry) in enumerate(zip(present, entries, strict=True)):
        y = plot_top + 22 + 18 * row
        draw.rectangle([legend_x, y + 1, legend_x + 11, y + 12], fill=PALETTE[key % len(PALETTE)])
        _text(draw, legend_x + 18, y, entry, legend_font, INK)
    return page


def _label_classes(
    labels: np.ndarray, class_names: Sequence[str] | None
) -> tuple[np.ndarray, dict[int, str]]:
    """Each point's colour key (an int) and the display name of every key."""
    if labels.dtype.kind in "iu" or labels.dtype == np.bool_:
        keys = labels.astype(np.int64)
        names = {}
        for key in np.unique(keys).tolist():
            known = class_names is not None and 0 <= key < len(class_names)
            names[key] = str(class_names[key]) if known else str(key)
        return keys, names
    texts = ["-" if value is None else str(value) for value in labels.tolist()]
    classes = sorted(set(texts))
    position = {name: i for i, name in enumerate(classes)}
    keys = np.array([position[t] for t in texts], dtype=np.int64)
    return keys, dict(enumerate(classes))


# --------------------------------------------------------------------------------------------
# Text


@functools.cache
def _font_path(name: str) -> str | None:
    """``name`` in matplotlib's fonts (:mod:`.fonts`; never the system's, so a picture looks the
    same on every machine), or None without matplotlib."""
    from .fonts import MissingFonts, font_file

    try:
        return str(font_file(name))
    except MissingFonts:
        return None


@functools.lru_cache(maxsize=64)
def _font(size: int, bold: bool = False) -> Font:
    """DejaVu Sans at ``size`` px from matplotlib's fonts, else Pillow's default font (sized if
    possible)."""
    path = _font_path("DejaVuSans-Bold.ttf") if bold else None
    path = path or _font_path("DejaVuSans.ttf")
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


# Characters that end a line (str.splitlines'): Pillow lays text out on one line and fails on
# them (raqm_layout), and a file or class name may hold any of them.
_LINE_BREAKS = dict.fromkeys(map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"), " ")


def _one_line(text: str) -> str:
    """``text`` with every line break a space: all text is measured and drawn through this, so
    any string (a hostile file name too) draws on one line."""
    return text.translate(_LINE_BREAKS)


def _text_width(text: str, font: Font) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(_one_line(text))
    return int(math.ceil(right - min(left, 0)))


def _line_height(font: Font) -> int:
    _, top, _, bottom = font.getbbox("Ag8")
    return int(math.ceil(bottom))


def _text(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, font: Font, fill: RGB) -> None:
    draw.text((int(x), int(y)), _one_line(text), font=font, fill=fill)


def _wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """``text`` broken into at most ``max_lines`` lines of at most ``width`` px (between words
    where it can, inside a word too long for a line; the last line cut short with "...")."""
    lines: list[str] = []
    rest = " ".join(text.split())
    while rest and len(lines) < max_lines - 1:
        cut = len(rest)
        while cut > 1 and _text_width(rest[:cut], font) > width:
            cut -= 1
        space = rest.rfind(" ", 0, cut + 1)
        if cut < len(rest) and space > 0:
            cut = space
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        lines.append(_fit(rest, font, width) or "...")
    return lines


def _fit(text: str, font: Font, width: int) -> str:
    """``text`` cut short with "..." so it is at most ``width`` px wide."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _shrink_to_fit(text: str, font: Font, width: int) -> Font:
    """``font``, or a smaller DejaVu/default font, so ``text`` fits in ``width`` px."""
    size = int(getattr(font, "size", 0) or 0)
    while size > 7 and _text_width(text, font) > width:
        size -= 1
        font = _font(size)
    return font


def _vertical_text(
    page: Image.Image,
    x: int,
    centre_y: int | None,
    text: str,
    font: Font,
    fill: RGB,
    bottom: int | None = None,
) -> None:
    """Draw ``text`` reading bottom-to-top with its left edge at ``x``.

    It is centred on ``centre_y``, or ends (its last letter) at ``bottom``.
    """
    w, h = _text_width(text, font) + 2, _line_height(font) + 2
    strip = Image.new("L", (w, h), 0)
    ImageDraw.Draw(strip).text((0, 0), _one_line(text), font=font, fill=255)
    mask = strip.rotate(90, expand=True)
    top = bottom - mask.height if bottom is not None else (centre_y or 0) - mask.height // 2
    page.paste(Image.new("RGB", mask.size, fill), (x, top), mask)


def reliability_diagram(counts: np.ndarray, accuracy: np.ndarray, mean_confidence: np.ndarray,
                        title: str = "") -> Image.Image:
    """A reliability diagram (Guo et al. 2017, fig. 1): per equal-width confidence bin, a blue
    bar as tall as the accuracy of the answers in it, a red outline from there to the bin's mean
    confidence (the gap), and the diagonal a perfectly calibrated model would follow. Empty bins
    stay blank; each bar's count is written under it."""
    bins = len(counts)
    size, left, bottom = 420, 56, 48
    top = MARGIN + (26 if title else 6)
    width, height = left + size + MARGIN * 2, top + size + bottom
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    head_font, small = _font(15, bold=True), _font(10)
    if title:
        _text(draw, MARGIN, MARGIN, title, head_font, INK)

    def y_of(value: float) -> float:
        return top + size * (1.0 - value)

    step = size / bins
    for i in range(bins):
        if counts[i] == 0:
            continue
        x0, x1 = left + i * step + 1, left + (i + 1) * step - 1
        draw.rectangle([x0, y_of(accuracy[i]), x1, y_of(0.0)], fill=QUERY_BLUE)
        low, high = sorted((accuracy[i], mean_confidence[i]))
        if high - low > 1e-3:
            draw.rectangle([x0, y_of(high), x1, y_of(low)], outline=WRONG_RED, width=2)
        _text(draw, x0, y_of(0.0) + 3, _fit(str(int(counts[i])), small, int(step)), small, MUTED)
    draw.line([left, y_of(0.0), left + size, y_of(1.0)], fill=MUTED, width=1)
    draw.rectangle([left, top, left + size, top + size], outline=RULE)
    for tick in range(6):
        value = tick / 5
        _text(draw, left - 30, y_of(value) - 6, f"{value:.1f}", small, MUTED)
        _text(draw, left + value * size - 8, y_of(0.0) + 16, f"{value:.1f}", small, MUTED)
    label_font = _font(12)
    _text(draw, left + size / 2 - 40, height - 18, "confidence", label_font, INK)
    _vertical_text(image, 4, int(top + size / 2), "accuracy", label_font, INK)
    return image
