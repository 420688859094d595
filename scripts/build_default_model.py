"""Rebuild the default model that ships with lenet-embed (``lenet_embed/default_model``).

    python scripts/build_default_model.py [--data PATH] [--out lenet_embed/default_model]
        [--work /tmp/lenet-embed-default-model]

One command, deterministic at its seed (the same weights, head and LiteRT file on this machine;
``encoder.keras`` also records the moment it was saved, so its sha256 changes with every run,
and the card with it): trains the default recipe (``lenet_embed.training``'s
``DEFAULT_RECIPE``) at the default seed on the MNIST training split, exactly as
``lenet-embed train`` does, then writes the model folder that :mod:`lenet_embed.model_choice`
reads: the Keras encoder, its LiteRT export, the classifier head the calibration uses, and the
model card (``card.json`` with every file's sha256, and ``MODEL_CARD.md``) with the figures
measured on the test split by ``lenet_embed.evaluate`` on a Flat bundle built from the folder
itself, as a base install builds one (LiteRT embedding).

Training takes minutes, the rest about two more. The trained classifier is kept in ``--work``
with a record of how it was trained (recipe, seed, data, package version): a second run with the
same recipe, seed and data reuses it and only exports and measures again (``--retrain`` trains
anyway). ``--remeasure`` neither trains nor exports: it measures the folder in ``--out`` again,
its files untouched, and rewrites its card (after a change to preprocessing or calibration).
Needs the ``train`` extra (TensorFlow) and MNIST (``--data`` or $LENET_EMBED_MNIST).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lenet_embed import LenetEmbedError, build_index, load_mnist
from lenet_embed.bundle import package_version
from lenet_embed.calibration import classifier_head
from lenet_embed.cli import run_script
from lenet_embed.embed import KerasEncoder, LiteRTEncoder, litert_flatbuffer
from lenet_embed.evaluate import evaluate
from lenet_embed.model import encoder_of, load_classifier
from lenet_embed.model_choice import (
    CARD_FILE,
    CARD_MARKDOWN,
    HEAD_FILE,
    KERAS_FILE,
    LITERT_FILE,
    MODEL_FILES,
    SHIPPED_DIR,
    ModelFolder,
    sha256_of,
    spot_figures,
    write_head,
)
from lenet_embed.recipes import DEFAULT_RECIPE, DEFAULT_SEED, get_recipe
from lenet_embed.training import train

RECORD = "train.json"
# Figures of lenet_embed.evaluate kept on the card.
RETRIEVAL = ("nn1_accuracy", "knn_accuracy", "precision_at_10", "r_precision", "map_at_r")
TRUST = ("ece", "auroc", "fpr_at_95_tpr", "digits_answered", "answered_accuracy",
         "nondigits_rejected", "final_rejected", "final_auroc")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def trained_classifier(args: argparse.Namespace, source: str) -> tuple[Path, dict[str, Any]]:
    """The classifier trained by the default recipe at the default seed: the one kept in
    ``--work`` if its record matches, else a new one."""
    recipe = get_recipe(DEFAULT_RECIPE)
    wanted = {"recipe": asdict(recipe), "seed": DEFAULT_SEED, "data": source,
              "lenet_embed_version": package_version()}
    model, record = args.work / "lenet.keras", args.work / RECORD
    if not args.retrain and model.is_file() and record.is_file():
        kept = json.loads(record.read_text())
        if {key: kept.get(key) for key in wanted} == wanted:
            _say(f"reusing {model} (trained by the {DEFAULT_RECIPE!r} recipe at seed "
                 f"{DEFAULT_SEED}; --retrain trains again)")
            return model, kept
    _say(f"training the {DEFAULT_RECIPE!r} recipe at seed {DEFAULT_SEED} into {model}")
    record.unlink(missing_ok=True)
    result = train(data=args.data, recipe=recipe, seed=DEFAULT_SEED, out=model)
    kept = {**wanted, "result": result.to_dict()}
    record.write_text(json.dumps(kept, indent=2) + "\n")
    return model, kept


def kept_record(data: dict[str, Any]) -> dict[str, Any]:
    """How the model of an existing card was trained, as :func:`trained_classifier` records
    it."""
    return {"recipe": data["recipe"], "seed": data["seed"],
            "lenet_embed_version": data["built_with"]["lenet_embed"],
            "result": data["training"]}


def export(model: Path, out: Path, work: Path) -> Any:
    """Write the encoder (Keras and LiteRT, the exporter's SavedModel staged in ``work``) and
    the head into ``out``; return the Keras encoder."""
    classifier = load_classifier(str(model))
    head = classifier_head(classifier)
    if head is None:
        raise LenetEmbedError(f"{model}: has no classifier head")
    encoder = encoder_of(classifier)
    out.mkdir(parents=True, exist_ok=True)
    (out / CARD_FILE).unlink(missing_ok=True)  # the folder is not a model until its card is
    encoder.save(out / KERAS_FILE)
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as staging:
        (out / LITERT_FILE).write_bytes(litert_flatbuffer(encoder, Path(staging) / "litert"))
    write_head(out / HEAD_FILE, *head)
    return encoder


def measure(out: Path, keras_encoder: Any, dataset: Any, work: Path) -> dict[str, Any]:
    """The card's figures: spot figures, LiteRT against Keras, and lenet_embed.evaluate's on a
    Flat bundle built from the folder."""
    litert = LiteRTEncoder(out / LITERT_FILE)
    head = ModelFolder.open(out).head()
    probe = dataset.test.images[:1000].astype(np.float32) / 255.0
    difference = float(np.abs(litert.embed(probe) - KerasEncoder(keras_encoder).embed(probe))
                       .max())
    spot = spot_figures(litert, head, dataset)
    bundle = work / "index"
    shutil.rmtree(bundle, ignore_errors=True)
    _say("building a Flat bundle of the training split with the folder's LiteRT encoder")
    build_index(data=dataset, model=out, index_dir=bundle, factory="Flat", backend="litert")
    _say("evaluating it on the test split")
    evaluation = evaluate(bundle, data=dataset, k=10)
    figures = evaluation.to_dict()
    queries = evaluation.details["queries"].astype(np.float64)
    head_accuracy = float(np.mean((queries @ head[0] + head[1]).argmax(axis=1)
                                  == dataset.test.labels))
    return {
        "test_queries": figures["queries"],
        "head_accuracy_litert": head_accuracy,
        **{name: figures[name] for name in RETRIEVAL},
        "degraded_top1": figures["degraded_top1"],
        "degraded_queries": figures["degraded_queries"],
        "family_top1": figures["family_top1"],
        "family_queries": figures["family_queries"],
        "trust": ({name: figures["trust"][name] for name in TRUST}
                  if figures["trust"] else None),
        "litert_vs_keras_max_abs_difference": difference,
        "spot": spot,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def card(out: Path, record: dict[str, Any], figures: dict[str, Any] | None) -> dict[str, Any]:
    """The machine-readable card (``figures`` None: not measured yet)."""
    result = record.get("result", {})
    return {
        "name": "lenet-embed default model",
        "recipe": record["recipe"],
        "seed": record["seed"],
        "data": "MNIST: trained on the 60,000 training digits; figures on the 10,000 test digits",
        "training": {"test_accuracy": result.get("test_accuracy"),
                     "seconds": result.get("seconds"), "cpu_seconds": result.get("cpu_seconds"),
                     "style": result.get("style")},
        "figures": figures,
        "built_with": {"lenet_embed": record["lenet_embed_version"],
                       **{name: _version(name) for name in ("tensorflow", "keras",
                                                             "ai-edge-litert")}},
        "files": {name: {"bytes": (out / name).stat().st_size,
                         "sha256": sha256_of(out / name)} for name in MODEL_FILES},
    }


def markdown(data: dict[str, Any]) -> str:
    """MODEL_CARD.md: the card for people."""
    f, t, recipe = data["figures"], data["training"], data["recipe"]
    lines = [
        "# lenet-embed default model",
        "",
        "The LeNet-5 encoder (image -> 84-d `fc2` features) that `lenet-embed build-index` and "
        "`calibrate` use when no `--model` is given and `models/lenet.keras` does not exist. "
        "Rebuilt by `python scripts/build_default_model.py`; `card.json` holds the same facts "
        "for programs, and the sha256 of every file that `lenet-embed` checks before use.",
        "",
        "## Recipe and data",
        "",
        f"- recipe `{recipe['name']}` at seed {data['seed']}: {recipe['description']}",
        f"- {data['data']}",
        f"- trained in {t['seconds']} s ({t['cpu_seconds']} s of processor time), "
        f"style {t['style']}; built with " + ", ".join(
            f"{name} {version}" for name, version in data["built_with"].items() if version),
        "",
        "## Figures (MNIST test split, cosine, exact search)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| test accuracy (Keras classifier) | {t['test_accuracy']:.4f} |",
        f"| test accuracy (LiteRT encoder + head) | {f['head_accuracy_litert']:.4f} |",
        f"| 1-NN accuracy | {f['nn1_accuracy']:.4f} |",
        f"| 10-NN accuracy | {f['knn_accuracy']:.4f} |",
        f"| MAP@R | {f['map_at_r']:.4f} |",
        f"| R-precision | {f['r_precision']:.4f} |",
        f"| LiteRT vs Keras, largest difference of an embedding value | "
        f"{f['litert_vs_keras_max_abs_difference']:.2e} |",
    ]
    if f["trust"]:
        lines += [f"| {name.replace('_', ' ')} | {value:.4f} |"
                  for name, value in f["trust"].items()]
    lines += ["", f"Robustness, top-1 of degraded scans ({f['degraded_queries']} each):", "",
              "| degradation | top-1 |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in f["degraded_top1"].items()]
    lines += ["", f"Robustness, top-1 answered per family ({f['family_queries']} pictures each):",
              "", "| family | top-1 |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in f["family_top1"].items()]
    spot = f["spot"]
    lines += ["", f"Spot figures, which `tests/test_default_model.py` recomputes: head accuracy "
              f"{spot['head_accuracy']:.4f} on the first {spot['queries']:,} test digits, 1-NN "
              f"{spot['nn1_accuracy']:.4f} among the first {spot['items']:,} training digits.",
              "", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| {name} | {entry['bytes']:,} | `{entry['sha256']}` |"
              for name, entry in data["files"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the options, train (or reuse), export, measure and write the card."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("LENET_EMBED_MNIST"),
                        help="MNIST (default: $LENET_EMBED_MNIST)")
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lenet-embed-default-model"))
    parser.add_argument("--retrain", action="store_true",
                        help="train even if --work holds a classifier of the same recipe")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure the model in --out again and rewrite its card, its files "
                        "untouched")
    args = parser.parse_args()
    if args.data is None:
        raise LenetEmbedError("give --data or set $LENET_EMBED_MNIST (MNIST's four IDX files)")
    dataset = load_mnist(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.remeasure:
        record = kept_record(ModelFolder.open(args.out).card)
        keras_encoder = KerasEncoder.load(args.out / KERAS_FILE).model
    else:
        model, record = trained_classifier(args, dataset.source)
        keras_encoder = export(model, args.out, args.work)
        # The card lists the files first, so that the folder is a model the build below can use.
        (args.out / CARD_FILE).write_text(json.dumps(card(args.out, record, None), indent=2)
                                          + "\n")
    figures = measure(args.out, keras_encoder, dataset, args.work)
    data = card(args.out, record, figures)
    (args.out / CARD_MARKDOWN).write_text(markdown(data))
    (args.out / CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    ModelFolder.open(args.out)  # as every reader checks it
    total = sum(entry["bytes"] for entry in data["files"].values())
    print(f"wrote {args.out}: {total / 1e6:.2f} MB of model files; 1-NN "
          f"{figures['nn1_accuracy']:.4f}, MAP@R {figures['map_at_r']:.4f}, test accuracy "
          f"{data['training']['test_accuracy']}")


if __name__ == "__main__":
    run_script(main)
