"""The ``lenet-embed`` command: a thin shell over the Python API.

Each command parses its options, calls the API function of the same name, and prints a human table
or, with ``--json``, machine-readable output. Problems a user can fix arrive as
:class:`LenetEmbedError` and are printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from . import _quiet
from .ann import DEFAULT_MEMORY_BUDGET, DEFAULT_TARGET_RECALL, MAX_THREADS
from .errors import LenetEmbedError
from .recipes import DEFAULT_RECIPE, RECIPES

# Bounds of numeric options: beyond them FAISS or LiteRT would crash or stall, not serve better.
MAX_SEARCH_DEPTH = 65_536
DATA_HELP = "MNIST-style data: a folder of the four IDX files (.gz or raw) or an mnist.npz. " \
    "Default: $LENET_EMBED_MNIST, else Keras's downloader."


class _Group(click.Group):
    """Turns :class:`LenetEmbedError` into a one-line error and exit status 1, and bad options
    into a one-line error and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LenetEmbedError as exc:
            raise click.ClickException(str(exc)) from None
        except click.UsageError as exc:
            # One line, like every other error; click would add a usage banner.
            error = click.ClickException(exc.format_message())
            error.exit_code = exc.exit_code
            raise error from None


def run_script(main: Callable[[], int | None]) -> None:
    """Run a script's ``main()`` with the CLI's error handling, then exit with its status.

    A :class:`LenetEmbedError` is printed as one line, ``Error: ...``, on stderr and the exit
    status is 1, as for every ``lenet-embed`` command; so is Ctrl-C. ``main`` returning None
    exits with 0, an int with that status. The scripts under ``scripts/`` end with::

        if __name__ == "__main__":
            run_script(main)
    """
    try:
        status = main()
    except LenetEmbedError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Error: interrupted", err=True)
        sys.exit(1)
    sys.exit(status or 0)


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return f"warning: {message}" if record.levelno >= logging.WARNING else message


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logger = logging.getLogger("lenet_embed")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj))


def _allow_milvus(ctx: click.Context, param: click.Parameter, uris: tuple[str, ...]) -> None:
    """--milvus-uri on a command that opens a bundle: the Milvus it may connect to, named for
    this process and, through $LENET_EMBED_MILVUS_URI, for those it starts (`serve --workers N`
    loads the bundle again in each worker)."""
    if uris:
        import os

        from .store.milvus import URI_ENV, allow_uri

        named = [os.environ.get(URI_ENV, "")]
        for uri in uris:
            try:
                named.append(allow_uri(uri))
            except LenetEmbedError as exc:
                raise click.BadParameter(str(exc), ctx, param) from None
        # A Milvus Lite path holding a comma cannot go in the list; no worker could share it.
        os.environ[URI_ENV] = ",".join(name for name in named if name and "," not in name)


_MILVUS_URI = click.option(
    "--milvus-uri", metavar="URI", multiple=True, expose_value=False, callback=_allow_milvus,
    help="A Milvus the bundle may use (repeatable): a server (http://host:19530), or a Milvus "
    "Lite file outside the bundle. A bundle naming any other is refused, so that "
    "$LENET_EMBED_MILVUS_TOKEN goes only where you say; or list them in $LENET_EMBED_MILVUS_URI "
    "(comma-separated).")


def _search_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that loads a bundle to search it."""
    options = [
        click.option("--index-dir", type=click.Path(), default="index", show_default=True,
                     help="Bundle folder written by build-index."),
        click.option("--ef-search", type=click.IntRange(1, MAX_SEARCH_DEPTH),
                     help="HNSW search depth (overrides the tuned value in the bundle)."),
        click.option("--nprobe", type=click.IntRange(1, MAX_SEARCH_DEPTH),
                     help="IVF lists to visit (overrides the tuned value in the bundle)."),
        click.option("--threads", type=click.IntRange(1, MAX_THREADS),
                     help="Threads for FAISS and LiteRT [default: all cores]."),
        click.option("--backend", type=click.Choice(["auto", "litert", "keras"]), default="auto",
                     show_default=True, help="Encoder runner; auto = LiteRT when available."),
        _MILVUS_URI,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_index(index_dir: str, ef_search: int | None, nprobe: int | None,
                threads: int | None, backend: str) -> Any:
    from .search import SearchIndex

    overrides = {name: value for name, value in (("efSearch", ef_search), ("nprobe", nprobe))
                 if value is not None}
    return SearchIndex.load(index_dir, backend=backend, threads=threads,
                            search_params=overrides)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Show TensorFlow's start-up messages and debug logs.")
@click.version_option(package_name="lenet-embed")
def main(verbose: bool) -> None:
    """Similarity search for digit images: LeNet-5 84-d embeddings in a FAISS index.

    Typical use: `lenet-embed build-index` (with the default model that ships with lenet-embed,
    or yours from `lenet-embed train`), then `lenet-embed query digit.png`.
    `lenet-embed samples DIR` writes test digits to try.
    """
    _quiet.set_verbose(verbose)
    _setup_logging(verbose)


@main.command()
@click.option("--data", type=click.Path(), help=DATA_HELP)
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE,
              show_default=True,
              help="Training recipe. " + "; ".join(f"{name}: {recipe.description}"
                                                   for name, recipe in RECIPES.items()) + ".")
@click.option("--style", type=click.Choice(["sequential", "functional", "subclass"]),
              default="sequential", show_default=True, help="How the Keras model is built.")
@click.option("--epochs", type=click.IntRange(1, 10_000), help="Override the recipe's epochs.")
@click.option("--batch-size", type=click.IntRange(1, 65_536),
              help="Override the recipe's batch size.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Random seed: the same seed and data give the same model.")
@click.option("--out", type=click.Path(), default="models/lenet.keras", show_default=True,
              help="Where to save the classifier; the encoder goes beside it (*.encoder.keras).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def train(data: str | None, recipe: str, style: str, epochs: int | None,
          batch_size: int | None, seed: int | None, out: str, as_json: bool) -> None:
    """Train LeNet-5 on MNIST and save the classifier and its 84-d encoder."""
    from .training import train as run_train

    result = run_train(data=data, recipe=recipe, style=style, epochs=epochs,
                       batch_size=batch_size, seed=seed, out=out)
    if as_json:
        _print_json(result.to_dict())
        return
    click.echo(f"model: {result.model}\nencoder: {result.encoder}")
    click.echo(f"recipe: {result.recipe}, epochs: {result.epochs}, seconds: {result.seconds:.1f} "
               f"(processor time {result.cpu_seconds:.1f} s)")
    click.echo(f"test accuracy: {result.test_accuracy:.4f}")


@main.command("build-index")
@click.option("--data", type=click.Path(), help=DATA_HELP)
@click.option("--images", type=click.Path(), help="Index your own pictures instead: every image "
              "under this folder, labelled by its subfolder's name.")
@click.option("--model", type=click.Path(), help="Classifier or encoder .keras file (needs "
              "TensorFlow), or a model folder [default: models/lenet.keras if it exists, else "
              "the default model shipped with lenet-embed].")
@click.option("--index-dir", type=click.Path(), default="index", show_default=True,
              help="Bundle folder to write (replaced atomically).")
@click.option("--metric", type=click.Choice(["cosine", "l2"]), default="cosine",
              show_default=True, help="cosine: normalised vectors, inner product; l2: Euclidean.")
@click.option("--factory", default="auto", show_default=True,
              help="auto: Flat for small sets, else HNSW32, or IVF with fewer bytes per vector "
              "when the memory budget demands it; or a FAISS index_factory string of the kinds "
              "lenet_embed.factory parses (Flat, HNSW<M>, IVF<n>,Flat|SQ8|PQ<m>, PQ<m>, SQ<b>, "
              "an OPQ prefix), e.g. Flat, HNSW32, IVF256,Flat, OPQ12,IVF256,PQ12.")
@click.option("--target-recall", type=click.FloatRange(0, 1, min_open=True),
              default=DEFAULT_TARGET_RECALL, show_default=True,
              help="For an approximate index: tune efSearch/nprobe to reach this recall@10 "
              "against exact search on held-out queries, and store it in the bundle.")
@click.option("--memory-budget", default=DEFAULT_MEMORY_BUDGET, show_default=True,
              help="Memory the index may take (2GB, 500MB, 1.5GiB): --factory auto picks an "
              "index that fits it.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS),
              help="Threads for FAISS [default: all].")
@click.option("--store", type=click.Choice(["faiss", "milvus"]), default="faiss",
              show_default=True, help="Where the items go: FAISS files in the bundle, or a "
              "Milvus collection (the bundle keeps the manifest and the encoder).")
@click.option("--milvus-uri", metavar="URI", help="With --store milvus: a Milvus Lite file "
              "(./digits.db) or a server (http://host:19530).")
@click.option("--milvus-token-file", type=click.Path(dir_okay=False),
              help="With --store milvus: a file whose first line is the server's token "
              "(or set $LENET_EMBED_MILVUS_TOKEN, which later commands read too).")
@click.option("--backend", type=click.Choice(["auto", "litert", "keras"]), default="auto",
              show_default=True, help="What embeds: auto = LiteRT when ai-edge-litert is installed "
              "(a .keras model is exported to LiteRT first), else Keras; litert or keras "
              "insist.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def build_index(data: str | None, images: str | None, model: str | None, index_dir: str,
                metric: str, factory: str, target_recall: float, memory_budget: str,
                threads: int | None, store: str, milvus_uri: str | None,
                milvus_token_file: str | None, backend: str, as_json: bool) -> None:
    """Embed a data set (default: the 60,000 MNIST training digits) into an index bundle."""
    from .build import build_index as run_build
    from .progress import StageBars

    if (store == "milvus") != (milvus_uri is not None):
        raise click.UsageError("--store milvus and --milvus-uri go together")
    token = None
    if milvus_token_file is not None:
        from .store.milvus import token_from_file

        token = token_from_file(milvus_token_file)
    progress = StageBars()
    try:
        result = run_build(data=data, images=images, model=model, index_dir=index_dir,
                           metric=metric, factory=factory, target_recall=target_recall,
                           memory_budget=memory_budget, threads=threads, on_progress=progress,
                           store_uri=milvus_uri, store_token=token, backend=backend)
    finally:
        progress.close()
    summary = result.summary()
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} unreadable file(s)", err=True)
    if as_json:
        _print_json(summary)
        return
    tuned = "".join(f", {name} {value}" for name, value in summary["search_params"].items())
    click.echo(f"wrote {summary['index_dir']}: {summary['count']} vectors, dim {summary['dim']}, "
               f"metric {summary['metric']}, factory {summary['factory']}{tuned}, "
               f"{summary['seconds']:.1f} s")
    click.echo(f"index: {summary['factory_reason']}")
    click.echo(f"model: {summary['model']}")


def _neighbor_table(neighbors: Sequence[Any]) -> str:
    show_source = any(n.source for n in neighbors)
    lines = [f"{'rank':>4}  {'id':>6}  {'label':>5}  {'distance':>9}" + ("  source" * show_source)]
    for n in neighbors:
        label = "-" if n.label is None else str(n.label)
        line = f"{n.rank:>4}  {n.id:>6}  {label:>5}  {n.distance:>9.4f}"
        lines.append(line + (f"  {n.source or '-'}" if show_source else ""))
    return "\n".join(lines)


def _answer_line(result: Any) -> str:
    """The verdict of one query in words: the label and its confidence, or why there is none."""
    if result.confidence is None:
        return f"predicted label: {result.predicted_label} ({result.reason})"
    if not result.match:
        return (f"predicted label: none ({result.reason}; nearest label {result.candidate}, "
                f"confidence {result.confidence:.3f})")
    return f"predicted label: {result.predicted_label} (confidence {result.confidence:.3f})"


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Number of neighbours per query.")
@_search_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines: one object per query.")
@click.option("--montage", type=click.Path(dir_okay=False), help="Also draw a PNG: one row per "
              "query (as the model saw it, or why it was refused), then its neighbours with "
              "label and distance; neighbours whose label differs from the predicted digit are "
              "framed red.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), help="Answer only when the "
              "calibrated confidence is at least this [default: the bundle's threshold].")
def query(images: tuple[str, ...], k: int, index_dir: str, ef_search: int | None,
          nprobe: int | None, threads: int | None, backend: str, as_json: bool,
          montage: str | None, min_confidence: float | None) -> None:
    """Find the k indexed digits nearest to each IMAGE file, and say whether (and how
    confidently) it is one of them."""
    index = _load_index(index_dir, ef_search, nprobe, threads, backend)
    results = index.query(list(images), k, min_confidence)
    for result in results:
        if not result.ok:
            click.echo(f"Error: {result.error}", err=True)
        elif as_json:
            _print_json(result.to_dict())
        else:
            click.echo(f"{result.query}\n{_neighbor_table(result.neighbors)}\n"
                       f"{_answer_line(result)}\n")
    answered = [result for result in results if result.ok]
    if montage:
        from .pictures import montage as draw_montage
        from .pictures import montage_rows

        # Every query has its row; one without an answer says why (a refused one, with no
        # picture to show, in its tile), without the file name its row's title already gives.
        reasons = [str(r.error).removeprefix(f"{r.query}: ") if r.error
                   else "" if r.match else r.reason or "" for r in results]
        picture = draw_montage(montage_rows(index, [r.pixels for r in results],
                                            [r.neighbors for r in results],
                                            [r.query for r in results], reasons=reasons))
        try:
            picture.save(montage, format="PNG")
        except OSError as exc:
            raise LenetEmbedError(f"{montage}: cannot write the montage ({exc})") from None
        click.echo(f"wrote {montage}", err=True)
    if len(answered) < len(results):
        sys.exit(1)


class _Seconds(click.FloatRange):
    """A number of seconds in a closed range, and finite: click's FloatRange lets NaN through
    (every comparison with NaN is false), and a NaN wait would never end."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


class _Label(click.ParamType):
    """An item's label, by the one rule of :func:`lenet_embed.labels.check_label`."""

    name = "label"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        from .labels import BadLabel, check_label

        try:
            return check_label(value)
        except BadLabel as exc:
            self.fail(str(exc), param, ctx)


_INDEX_DIR = click.option("--index-dir", type=click.Path(), default="index", show_default=True,
                          help="Bundle folder written by build-index.")
_WAIT = click.option("--wait", "wait", type=_Seconds(0, 3600), default=30,
                     show_default=True,
                     help="Seconds to wait while another process is writing to the bundle.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@main.command()
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--images", "folder", type=click.Path(), help="Add every image under this folder "
              "instead, labelled by its subfolder's name (as build-index --images).")
@click.option("--label", type=_Label(), help="The label of the IMAGE files (a digit, or a "
              "class name in a bundle built from folders) [default: none].")
@_INDEX_DIR
@_MILVUS_URI
@_WAIT
@click.option("--backend", type=click.Choice(["auto", "litert", "keras"]), default="auto",
              show_default=True, help="Encoder runner; auto = LiteRT when available.")
@_JSON
def add(images: tuple[str, ...], folder: str | None, label: int | str | None, index_dir: str,
        wait: float, backend: str, as_json: bool) -> None:
    """Add IMAGE files (or a folder of them) to the bundle, embedded with its own encoder.

    The new items are searchable as soon as this returns; their ids are printed.
    """
    from .embed import load_encoder
    from .snapshot import bundle_encoder
    from .updates import add_images

    if bool(images) == bool(folder):
        raise click.UsageError("give IMAGE files or --images DIR (one of them)")
    if folder and label is not None:
        raise click.UsageError("--label goes with IMAGE files; with --images the subfolders "
                               "name the labels")
    skipped: list[str] = []
    if folder:
        from .data import load_image_folder

        loaded = load_image_folder(folder)
        pictures: Any = loaded.images
        labels: Any = [None if code < 0 else (loaded.classes[code] if loaded.classes
                                              else int(code))
                       for code in loaded.labels.tolist()]
        sources, skipped = loaded.sources, loaded.skipped
    else:
        pictures, labels, sources = list(images), label, list(images)

    def encoder(manifest: Any) -> Any:
        return bundle_encoder(Path(index_dir), manifest,
                              lambda keras, litert: load_encoder(keras, litert, backend))

    ids, manifest = add_images(index_dir, pictures, labels, sources, encoder=encoder,
                               timeout=wait)
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable file(s)", err=True)
    if as_json:
        _print_json({"index_dir": index_dir, "version": manifest.version,
                     "count": manifest.count, "ids": ids.tolist(), "sources": sources})
        return
    for item_id, source in zip(ids.tolist(), sources, strict=True):
        click.echo(f"{item_id}\t{source}")
    click.echo(f"added {len(ids)} item(s); {index_dir} is at version {manifest.version} with "
               f"{manifest.count} items", err=True)


@main.command()
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(0, 2**63 - 1))
@_INDEX_DIR
@_MILVUS_URI
@_WAIT
@_JSON
def remove(ids: tuple[int, ...], index_dir: str, wait: float, as_json: bool) -> None:
    """Remove items by ID; they never come back in results, and their ids are never reused.

    Exits with status 1 when an ID was not a live item (the others are still removed).
    """
    from .updates import remove as run_remove

    removal, manifest = run_remove(index_dir, list(ids), timeout=wait)
    if as_json:
        _print_json({"index_dir": index_dir, "version": manifest.version,
                     "removed": removal.removed, "missing": removal.missing,
                     "count": manifest.count})
    else:
        click.echo(f"removed {removal.removed} item(s); {index_dir} is at version "
                   f"{manifest.version} with {manifest.count} items")
    for item_id in removal.missing:
        click.echo(f"Error: no item with id {item_id} in {index_dir}", err=True)
    if removal.missing:
        sys.exit(1)


@main.command()
@_INDEX_DIR
@_MILVUS_URI
@_WAIT
@_JSON
def compact(index_dir: str, wait: float, as_json: bool) -> None:
    """Rebuild the bundle's live items into one FAISS index, reclaiming removed rows.

    The files of older versions are removed a few seconds after the new version is committed,
    once no reader can still be opening them; this command waits for that.
    """
    import time

    from .updates import compact as run_compact
    from .updates import reclaim

    started = time.perf_counter()
    before, after = run_compact(index_dir, timeout=wait)
    # Also when already compact: a compaction killed while it waited left its old files.
    freed = reclaim(index_dir, timeout=wait)
    summary = {"index_dir": index_dir, "version": after.version, "count": after.count,
               "reclaimed_rows": before.rows - after.rows, "freed_bytes": freed,
               "segments_before": len(before.segments), "segments_after": len(after.segments),
               "seconds": round(time.perf_counter() - started, 2)}
    if as_json:
        _print_json(summary)
    elif after is before:
        click.echo(f"{index_dir} is already compact (version {after.version}, "
                   f"{after.count} items)"
                   + (f"; {freed / 1e6:.1f} MB of old files removed" if freed else ""))
    else:
        click.echo(f"compacted {index_dir}: version {after.version}, {after.count} items, "
                   f"{summary['reclaimed_rows']} removed row(s) reclaimed, "
                   f"{summary['segments_before']} segment(s) -> {summary['segments_after']}, "
                   f"{freed / 1e6:.1f} MB of old files removed, {summary['seconds']:.1f} s")


@main.command()
@_INDEX_DIR
@_MILVUS_URI
@click.option("--model", type=click.Path(exists=True), help="The classifier (.keras, or a "
              "model folder) the bundle's encoder was cut from, whose head some scores use "
              "[default: the head the bundle keeps, else the shipped default model's if the "
              "bundle's encoder is the shipped one].")
@_WAIT
@_JSON
def calibrate(index_dir: str, model: str | None, wait: float, as_json: bool) -> None:
    """Fit the bundle's confidence and "not a digit" thresholds again, as a new version.

    Run it after adding many items, or on a bundle built before calibration existed.
    """
    from .calibration import calibrate as run_calibrate
    from .calibration import load_head

    manifest = run_calibrate(index_dir, load_head(model) if model else None, timeout=wait)
    calibration = manifest.calibration
    assert calibration is not None  # just fitted
    summary = {"index_dir": index_dir, "version": manifest.version,
               "ood_threshold": calibration.ood_threshold,
               "min_confidence": calibration.min_confidence,
               "head": calibration.head_weights is not None, **calibration.fitted_on}
    if as_json:
        _print_json(summary)
        return
    click.echo(f"calibrated {index_dir}: version {manifest.version}, fitted on "
               f"{summary['items']} items ({summary['items_wrong']} wrong) and "
               f"{summary['nondigits']} generated non-digits"
               f"{'' if summary['head'] else ', without a classifier head'}")


@main.command()
@click.argument("out_dir", type=click.Path())
@click.option("-n", "n", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many test digits to write.")
@click.option("--data", type=click.Path(), help=DATA_HELP)
def samples(out_dir: str, n: int, data: str | None) -> None:
    """Write MNIST test digits as PNG files (named with index and label) to try `query` on."""
    from .data import write_samples

    written = write_samples(out_dir, n=n, data=data)
    click.echo(f"wrote {len(written)} PNG files to {out_dir}")


@main.command()
@_INDEX_DIR
@_MILVUS_URI
@click.option("--verify", is_flag=True,
              help="Also compare every file with its checksum and check every row (reads the "
                   "whole bundle); names the files that are damaged.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the manifest and the figures below as one JSON object.")
def info(index_dir: str, verify: bool, as_json: bool) -> None:
    """Show what an index bundle holds, after loading it (checking each file's size).

    With --verify, every file is read and compared with its checksum.
    """
    from .model_choice import is_shipped_encoder
    from .snapshot import inspect_bundle

    report = inspect_bundle(index_dir, verify=verify)
    if as_json:
        _print_json(report.to_dict())
        return
    m = report.manifest
    unknown = report.unknown_files
    rows = {
        "bundle": index_dir,
        "version": f"{m.version} ({m.operation}, {m.committed_at})",
        "items": f"{m.count} live, {m.deleted} removed",
        **({"store": f"Milvus collection {m.store.collection} at {m.store.uri} "
                     f"({m.store.index} index)"} if m.store else {}),
        "segments": f"{len(m.segments)} ({report.sealed} sealed, "
                    f"{len(m.segments) - report.sealed} from adds)",
        "compaction would reclaim": f"{m.deleted} row(s), {report.reclaimable_bytes} bytes"
                                    + (f", merge {len(m.segments)} segments into 1"
                                       if len(m.segments) > 1 else ""),
        "old files": (f"{report.old_files_bytes} bytes (of superseded versions or unfinished "
                      "writes; the next commits remove them, `lenet-embed compact` at once)"
                      if report.old_files_bytes else "none"),
        **({"unknown files": ", ".join(unknown[:10])
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            + " (not lenet-embed's: never touched)"} if unknown else {}),
        **({"compaction hint": report.compaction_hint} if report.compaction_hint else {}),
        "dim": m.dim,
        "metric": m.metric,
        "factory": m.factory,
        "why this index": m.factory_reason or "not recorded (built before lenet-embed said why)",
        "search params": json.dumps(m.search_params),
        "data set": json.dumps(m.dataset),
        "created": m.created_at,
        "lenet-embed": m.lenet_embed_version,
        "size on disk": f"{report.bytes} bytes",
        "encoder sha256": m.encoder_sha256 + (" (the shipped default model)"
                                              if is_shipped_encoder(m.encoder_sha256) else ""),
        "checks": ("ok (the bundle loads; every file matches its checksum, every row checked)"
                   if report.verified else
                   "ok (the bundle loads; every file has its size; `info --verify` also compares "
                   "checksums)"),
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        click.echo(f"{key + ':':<{width + 1}} {value}")


@main.command()
@_search_options
@click.option("--data", type=click.Path(), help=DATA_HELP)
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Neighbours for the k-NN vote and the latency figures.")
@click.option("--json", "as_json", is_flag=True, help="Print every figure as one JSON object.")
@click.option("--report", type=click.Path(), help="Also write figures.json and PNG pictures "
              "(confusion matrix, worst retrievals, embedding map) into this folder.")
def evaluate(index_dir: str, ef_search: int | None, nprobe: int | None, threads: int | None,
             backend: str, data: str | None, k: int, as_json: bool, report: str | None) -> None:
    """Measure retrieval on the 10,000 MNIST test digits: accuracy, MAP@R, recall, speed, and
    top-1 on test digits drawn as degraded scans (blur, low resolution, JPEG, noise, strokes,
    paper).

    The bundle must come from `build-index` on the training split of the same data.
    """
    from .evaluate import evaluate as run_evaluate
    from .evaluate import write_report
    from .families import HELD_OUT

    index = _load_index(index_dir, ef_search, nprobe, threads, backend)
    evaluation = run_evaluate(index, data=data, k=k)
    if report:
        written = write_report(evaluation, report, index)
        click.echo(f"wrote {len(written)} files to {report}", err=True)
    figures = evaluation.to_dict()
    if as_json:
        _print_json(figures)
        return
    rows = [
        ("bundle", f"{figures['index_dir']} ({figures['count']} items, {figures['metric']}, "
                   f"{figures['factory']})"),
        ("queries", f"{figures['queries']} test digits"),
        ("1-NN accuracy", f"{figures['nn1_accuracy']:.4f}"),
        (f"{k}-NN accuracy", f"{figures['knn_accuracy']:.4f}"),
        ("precision@1 / @10 / @100", f"{figures['precision_at_1']:.4f} / "
         f"{figures['precision_at_10']:.4f} / {figures['precision_at_100']:.4f}"),
        ("R-precision", f"{figures['r_precision']:.4f}"),
        ("MAP@R", f"{figures['map_at_r']:.4f}"),
    ]
    if figures["recall_at_10"] is not None:
        params = ", ".join(f"{name} {value}" for name, value in figures["search_params"].items())
        recall = f"{figures['recall_at_10']:.4f} ({params or 'default parameters'})"
        rows.append(("recall@10 vs exact", recall))
        rows.append(("1-NN accuracy (this index)", f"{figures['index_nn1_accuracy']:.4f}"))
    rows += [(f"top-1, {name} ({figures['degraded_queries']} scans)", f"{top1:.4f}")
             for name, top1 in figures["degraded_top1"].items()]
    rows += [(f"top-1 answered, {name} ({figures['family_queries']} pictures"
              f"{', held out' if name in HELD_OUT else ''})", f"{top1:.4f}")
             for name, top1 in figures["family_top1"].items()]
    rows += [
        ("batch search", f"{figures['batch_qps']:.0f} queries/s"),
        ("single query, search only", f"p50 {figures['latency_ms_p50']:.3f} ms, "
                                      f"p99 {figures['latency_ms_p99']:.3f} ms"),
        ("single query, with embedding", f"p50 {figures['latency_with_embedding_ms_p50']:.3f} ms, "
                                         f"p99 {figures['latency_with_embedding_ms_p99']:.3f} ms"),
    ]
    trust = figures["trust"]
    if trust is not None:
        rows += [
            ("calibration error (ECE)", f"{trust['ece']:.4f}"),
            ("not-a-digit AUROC / FPR@95", f"{trust['auroc']:.4f} / {trust['fpr_at_95_tpr']:.4f}"),
            ("test digits answered", f"{trust['digits_answered']:.4f} (of them right: "
                                     f"{trust['answered_accuracy']:.4f})"),
            ("non-digits rejected", f"{trust['nondigits_rejected']:.4f} of "
                                    f"{trust['nondigits']} (" + ", ".join(
                                        f"{kind} {value:.3f}" for kind, value
                                        in trust["rejected_by_kind"].items()) + ")"),
            ("non-digits rejected, kinds held out", f"{trust['final_rejected']:.4f} of "
                                                    f"{trust['final_nondigits']} (" + ", ".join(
                f"{kind} {value:.3f}" for kind, value
                in trust["final_rejected_by_kind"].items())
                + f"; AUROC {trust['final_auroc']:.4f})"),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


@main.command()
@_search_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port to listen on.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes; each loads the bundle.")
@click.option("--allowed-host", "allowed_host", multiple=True, metavar="NAME",
              help="Also answer requests whose Host is NAME (repeatable; '*' for any). By "
              "default only this machine's own names are answered, which stops DNS rebinding.")
@click.option("--write-token-file", type=click.Path(dir_okay=False),
              help="Enable POST/DELETE /v1/items for requests with 'Authorization: Bearer "
              "<token>', the token being this file's first line (or $LENET_EMBED_WRITE_TOKEN).")
@click.option("--max-connections", type=click.IntRange(1, 1_000_000), default=1000,
              show_default=True, help="Connections and requests a server process takes at once; "
              "beyond it new requests get 503 (bounded by the open-file limit). Against idle and "
              "slow connections, put nginx in front (deploy/nginx.conf).")
@click.option("--decode-timeout", type=click.FloatRange(0.1, 60), default=2.0,
              show_default=True, help="Seconds an uploaded image may take to decode (and to "
              "wait for a decoder); over it the request gets 503, or 413 if the image itself "
              "is too costly.")
@click.option("--show-sources", is_flag=True,
              help="Give search results' sources and /v1/info's data set as full server paths "
              "(by default sources are relative to the images folder the bundle was built "
              "from, else file names, and folders are cut out of paths).")
def serve(index_dir: str, ef_search: int | None, nprobe: int | None, threads: int | None,
          backend: str, host: str, port: int, workers: int, allowed_host: tuple[str, ...],
          write_token_file: str | None, max_connections: int, decode_timeout: float,
          show_sources: bool) -> None:
    """Serve the index over HTTP: a JSON API under /v1, and a page to draw digits on at /.

    The service follows commits to the bundle (add, remove, compact, a rebuild) within a second,
    without a restart; SIGHUP reloads at once. Here --threads defaults to 1: concurrent
    requests, not threads, are the service's parallelism. Stop it with Ctrl-C.
    """
    from .serve import serve as run_serve

    threads = threads or 1
    index = _load_index(index_dir, ef_search, nprobe, threads, backend)
    run_serve(index, host=host, port=port, workers=workers, threads=threads,
              write_token_file=write_token_file, allowed_host=list(allowed_host),
              max_connections=max_connections, decode_timeout=decode_timeout,
              show_sources=show_sources)
