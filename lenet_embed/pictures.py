"""Pictures a person would rather look at than read: neighbour montages, confusion matrices, maps.

Everything returns a PIL RGB image on a white page, ready for ``image.save("out.png")``. The
montage is drawn pixel by pixel with Pillow; the charts (:func:`confusion_image`,
:func:`embedding_map`, :func:`reliability_diagram`) by matplotlib's object API and its Agg
renderer (a ``Figure`` of its own per call, never pyplot: no global state, no display, safe in
threads), imported only when a chart is drawn. All text is in the DejaVu Sans files matplotlib
ships (:mod:`.fonts`), drawn literally (never as mathtext or LaTeX), so the same input gives
the same pixels on every machine.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

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
# Charts, drawn by matplotlib

# A chart of w x h pixels is a figure of (w, h) / DPI inches.
DPI = 100
# The longest class name (or label) a chart writes; longer ones are cut short with "...".
NAME_CHARS = 24
# A confusion matrix writes each cell's count up to this many classes; beyond, colours only.
COUNTS_UP_TO = 40
# An embedding map's legend lists at most this many labels (the palette repeats after 10).
LEGEND_ENTRIES = 30


def confusion_image(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> Image.Image:
    """Draw a (C, C) confusion matrix (rows = true label, columns = predicted) as a heat map.

    Each cell shows its count (up to ``COUNTS_UP_TO`` classes). Diagonal cells are blue, shaded
    by the row's recall; off-diagonal cells with errors are red, shaded on a log scale of their
    share of the row (1 in 1000 is still a visible pink), so rare confusions stand out; empty
    cells are white. Each row's recall is printed at its right. A cell is 22 to 56 px square
    (smaller past 60 classes, so the grid stays about 1320 px).
    """
    return _render(_confusion_figure(matrix, class_names, title))


def embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Image.Image:
    """Scatter (N, 2) points coloured by label, with a legend and a title, on an 860 x 700 page.

    Integer labels take ``PALETTE[label % 10]`` (so digit 3 is always the same colour) and are
    named ``class_names[label]`` when given; other labels (strings, None) are named by their
    text and coloured in sorted order. Both axes share one scale, so distances look right;
    y grows upwards. Points are drawn in a fixed shuffled order so no class hides another.
    Non-finite points are left out (and counted in the subtitle).
    """
    return _render(_embedding_figure(points, labels, class_names, title))


def reliability_diagram(counts: np.ndarray, accuracy: np.ndarray, mean_confidence: np.ndarray,
                        title: str = "") -> Image.Image:
    """A reliability diagram (Guo et al. 2017, fig. 1) on a 560 x 620 page: per equal-width
    confidence bin, a blue bar as tall as the accuracy of the answers in it, a red outline from
    there to the bin's mean confidence (the gap), and the diagonal a perfectly calibrated model
    would follow. Empty bins stay blank; each bin's count is written above the plot."""
    return _render(_reliability_figure(counts, accuracy, mean_confidence, title))


def _confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {counts.shape}")
    n = counts.shape[0]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}x{n} confusion matrix")
    values = counts.astype(np.float64)
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("confusion matrix counts must be finite and non-negative")
    cell = float(np.clip(560 / n, 22, 56)) if n <= 60 else 1320 / n
    names = [_short(name) for name in class_names]
    name_px = 6.5 * max(len(name) for name in names) + 12  # DejaVu Sans at 9 pt, roughly
    rotate = name_px - 12 > cell - 4
    grid = n * cell
    figure = _figure(100 + name_px + max(grid, 340) + 90,
                     140 + grid + (name_px if rotate else 24))
    ax = figure.add_subplot()
    row_totals = values.sum(axis=1)
    colours = _cell_colours(values)
    dark = colours @ np.array([0.299, 0.587, 0.114]) < 150  # luminance: white counts on these
    ax.imshow(colours, interpolation="nearest", aspect="equal")
    if n <= COUNTS_UP_TO:
        integral = bool(np.all(values == np.round(values)))
        base = float(np.clip(cell * 0.3, 8, 15))
        for i, j in np.ndindex(n, n):
            count = values[i, j]
            text = f"{int(round(count))}" if integral else f"{count:.3g}"
            size = min(base, (cell - 4) / (0.64 * len(text)))  # a digit is 0.64 em wide
            ink = RULE if count == 0 else WHITE if dark[i, j] else INK
            ax.text(j, i, text, ha="center", va="center", **_text_kw(_points(size), colour=ink))
    if cell >= 8:  # thin rules between cells, unless they would hide them
        ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
        ax.grid(which="minor", color=_colour((225, 225, 225)), linewidth=1.0)
    ax.grid(which="major", visible=False)
    ax.tick_params(which="both", length=0)
    shown = list(range(0, n, max(1, math.ceil(11 / cell))))  # every name while they fit
    ax.set_xticks(shown, [names[i] for i in shown], rotation=90 if rotate else 0,
                  **_text_kw(9))
    ax.set_yticks(shown, [names[i] for i in shown], **_text_kw(9))
    ax.set_xlabel("predicted", **_text_kw(10))
    ax.set_ylabel("true", **_text_kw(10))
    recall = ax.secondary_yaxis("right")
    recall.set_yticks(shown, [f"{values[i, i] / row_totals[i]:.1%}" if row_totals[i] else "-"
                              for i in shown], **_text_kw(8, colour=MUTED))
    recall.set_ylabel("recall", **_text_kw(9, colour=MUTED))
    recall.tick_params(length=0)
    total, correct = int(values.sum()), int(np.trace(values))
    accuracy = f"{correct / total:.2%}" if total else "-"
    ax.set_anchor("W")  # the subtitle starts at the grid's left edge and has room to its right
    return _finish(figure, title, f"{total} samples, accuracy {accuracy}\n"
                   "shade = share of the true row (blue: correct, red: errors)", ax, recall)


def _embedding_figure(points: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str] | None, title: str) -> Figure:
    xy = np.asarray(points, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"embedding_map expects (N, 2) points, got shape {xy.shape}")
    label_array = np.asarray(labels)
    if label_array.shape[:1] != xy.shape[:1] or label_array.ndim != 1:
        raise ValueError(f"{label_array.shape} labels for {len(xy)} points")
    from matplotlib.patches import Patch

    colour_index, names = _label_classes(label_array, class_names)
    finite = np.isfinite(xy).all(axis=1)
    shown, keys = xy[finite], colour_index[finite]
    present = sorted(set(keys.tolist()))
    palette = np.array(PALETTE, dtype=np.float64) / 255.0
    figure = _figure(860, 700)
    ax = figure.add_subplot()
    if len(shown):
        order = np.random.default_rng(0).permutation(len(shown))
        radius_px = 3.0 if len(shown) <= 1000 else 2.0
        ax.scatter(shown[order, 0], shown[order, 1], s=_points(2 * radius_px) ** 2,
                   c=palette[keys[order] % len(PALETTE)], marker="o", linewidths=0)
    else:
        ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center", va="center",
                **_text_kw(10, colour=MUTED))
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    handles: list[Patch] = [Patch(facecolor=palette[key % len(PALETTE)], edgecolor="none")
                            for key in present[:LEGEND_ENTRIES]]
    entries = [f"{_short(names[key])}  ({int(np.sum(keys == key))})"
               for key in present[:LEGEND_ENTRIES]]
    if len(present) > LEGEND_ENTRIES:
        handles.append(Patch(facecolor="none", edgecolor="none"))
        entries.append(f"+ {len(present) - LEGEND_ENTRIES} more labels")
    if handles:
        ax.legend(handles, entries, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False, handlelength=1.0, handleheight=1.0,
                  title="label", alignment="left", prop=_chart_font(9),
                  title_fontproperties=_chart_font(9, bold=True))
    dropped = int((~finite).sum())
    return _finish(figure, title, f"{len(shown)} points"
                   + (f" ({dropped} non-finite left out)" if dropped else ""), ax)


def _reliability_figure(counts: np.ndarray, accuracy: np.ndarray, mean_confidence: np.ndarray,
                        title: str) -> Figure:
    n, acc, conf = (np.asarray(a, dtype=np.float64) for a in (counts, accuracy, mean_confidence))
    if n.ndim != 1 or not len(n) or acc.shape != n.shape or conf.shape != n.shape:
        raise ValueError(f"reliability diagram needs three equal 1-D arrays, got shapes "
                         f"{n.shape}, {acc.shape}, {conf.shape}")
    filled = n > 0
    if not (np.isfinite(n).all() and np.isfinite(acc[filled]).all()
            and np.isfinite(conf[filled]).all()):
        raise ValueError("reliability diagram values must be finite")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bins = len(n)
    centres = (np.arange(bins) + 0.5) / bins
    width = 0.9 / bins
    blue, red, muted = _colour(QUERY_BLUE), _colour(WRONG_RED), _colour(MUTED)
    figure = _figure(560, 620)
    ax = figure.add_subplot()
    ax.bar(centres[filled], acc[filled], width=width, color=blue, linewidth=0)
    low, high = np.minimum(acc, conf), np.maximum(acc, conf)
    gap = filled & (high - low > 1e-3)
    ax.bar(centres[gap], (high - low)[gap], bottom=low[gap], width=width, fill=False,
           edgecolor=red, linewidth=1.5)
    ax.plot([0, 1], [0, 1], color=muted, linestyle="--", linewidth=1.0, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ticks = np.linspace(0, 1, 6)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_ticks(ticks, [f"{t:.1f}" for t in ticks], **_text_kw(8, colour=MUTED))
    ax.set_xlabel("confidence", **_text_kw(10))
    ax.set_ylabel("accuracy", **_text_kw(10))
    above = ax.secondary_xaxis("top")
    above.set_xticks(centres[filled], [str(int(c)) for c in n[filled]],
                     rotation=90 if bins > 10 else 0, **_text_kw(7, colour=MUTED))
    above.set_xlabel("answers in the bin", **_text_kw(8, colour=MUTED))
    figure.legend([Patch(facecolor=blue), Patch(fill=False, edgecolor=red, linewidth=1.5),
                   Line2D([], [], color=muted, linestyle="--", linewidth=1.0)],
                  ["accuracy", "gap to the mean confidence", "perfectly calibrated"],
                  loc="outside lower center", ncols=3, frameon=False, prop=_chart_font(8))
    return _finish(figure, title, "", ax, above)


def _figure(width: float, height: float) -> Figure:
    """A new white figure of ``width`` x ``height`` px whose constrained layout fits its titles,
    labels and legends inside. Made without pyplot: no global state, no display, any thread.

    matplotlib is imported here, so commands that draw no chart never load it; without it,
    :class:`.fonts.MissingFonts` says to install it (one line).
    """
    _font_file(bold=False)  # MissingFonts without matplotlib, before an import can fail
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white",
                    layout="constrained")
    figure.get_layout_engine().set(w_pad=6 / 72, h_pad=6 / 72, wspace=0.02, hspace=0.02)
    return figure


def _finish(figure: Figure, title: str, subtitle: str, ax: Axes, *more: Axes) -> Figure:
    """Give ``figure`` its bold ``title`` and ``ax`` its grey ``subtitle`` (both left-aligned),
    and rule the axes' frames and ticks light grey."""
    for axes in (ax, *more):
        axes.tick_params(which="both", color=_colour(RULE))
        for spine in axes.spines.values():
            spine.set_color(_colour(RULE))
    if subtitle:
        ax.set_title(subtitle, loc="left", **_text_kw(8, colour=MUTED))
    if title:
        figure.suptitle(_short(title, 80), x=0.02, ha="left", **_text_kw(12, bold=True))
    return figure


def _render(figure: Figure) -> Image.Image:
    """``figure`` drawn by Agg into an RGB image of exactly its pixel size.

    First every text in it is made literal and set in matplotlib's own DejaVu Sans (keeping its
    size, and bold if it was): so a class name or title holding ``$`` is never parsed as
    mathtext (which fails on some), a matplotlibrc asking for ``text.usetex`` never runs LaTeX,
    and no font is looked up among the system's. The same input gives the same pixels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    ours = {str(_font_file(bold=False)), str(_font_file(bold=True))}
    for text in figure.findobj(Text):
        text.set_usetex(False)
        text.set_parse_math(False)
        font = text.get_fontproperties()
        if font.get_file() is None or str(font.get_file()) not in ours:
            weight = font.get_weight()
            bold = weight == "bold" or (isinstance(weight, int | float) and weight >= 600)
            text.set_fontproperties(_chart_font(font.get_size_in_points(), bold=bold))
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _font_file(bold: bool) -> Path:
    from .fonts import font_file

    return font_file("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")


def _chart_font(points: float, bold: bool = False) -> FontProperties:
    """DejaVu Sans at ``points`` from matplotlib's own file (never a lookup by family name,
    which could pick a system copy)."""
    from matplotlib.font_manager import FontProperties

    return FontProperties(fname=_font_file(bold), size=points)


def _text_kw(points: float, bold: bool = False, colour: RGB = INK) -> dict[str, Any]:
    """Keyword arguments that make a matplotlib text ``points`` big, in ``colour``."""
    return {"fontproperties": _chart_font(points, bold), "color": _colour(colour)}


def _colour(rgb: RGB) -> tuple[float, float, float]:
    r, g, b = rgb
    return r / 255.0, g / 255.0, b / 255.0


def _points(pixels: float) -> float:
    """``pixels`` in typographic points at ``DPI``."""
    return pixels * 72.0 / DPI


def _short(text: object, limit: int = NAME_CHARS) -> str:
    """``text`` on one line of printable characters, cut short with "..." past ``limit``."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _cell_colours(values: np.ndarray) -> np.ndarray:
    """The (C, C, 3) uint8 colours of a confusion matrix's cells: white where empty; on the
    diagonal blue mixed into white by 0.2 + 0.8 * the row's recall; elsewhere red mixed in by
    1 + log10(share of the row) / 3, at least 0.25 (a share of 1 in 1000 is still pink)."""
    totals = values.sum(axis=1, keepdims=True)
    share = np.divide(values, totals, out=np.zeros_like(values), where=totals > 0)
    diagonal = np.eye(len(values), dtype=bool)
    with np.errstate(divide="ignore"):
        errors = np.clip(1.0 + np.log10(share) / 3.0, 0.25, 1.0)
    mix = np.where(diagonal, 0.2 + 0.8 * share, errors)[..., None]
    ink = np.where(diagonal[..., None], QUERY_BLUE, WRONG_RED).astype(np.float64)
    colours = np.round(255.0 + (ink - 255.0) * mix)
    return np.where((share > 0)[..., None], colours, 255.0).astype(np.uint8)


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
