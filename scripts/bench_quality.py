"""Retrieval quality of the training recipes, side by side, measured in one run.

Trains every recipe (the tutorial's ``seed`` is the baseline) with a fixed seed on MNIST, builds a
cosine and an L2 bundle from each model over the 60,000 training digits, evaluates each on the
10,000 test digits, and prints four tables: test accuracy, 1-NN accuracy and MAP@R (cosine and
L2); training seconds, wall-clock and processor (every thread), each also as a ratio of the
baseline's (a shared machine stretches the first, not the second), against the seed recipe as
`train` runs it and against the seed recipe trained with Keras's own conv1 kernel, which is how
it ran before training computed conv1 as a matmul (timed only: the same model to float rounding);
how far the cosine bundle's
answers can be trusted (ECE, AUROC and FPR@95 on the generated non-digits, digits answered and
non-digits rejected at its thresholds, those of the ``final`` split, of kinds no choice saw,
apart); and top-1 (cosine, k=10) on the degraded test set, per
degradation (``lenet_embed/degrade.py``).

    python scripts/bench_quality.py [--data PATH] [--seed 1] [--recipes seed,outlier] [--json]

Data comes from ``--data``, else ``$LENET_EMBED_MNIST``, else Keras's downloader. Takes about
fifteen minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from lenet_embed import RECIPES, build_index, load_mnist, train
from lenet_embed.cli import run_script
from lenet_embed.evaluate import evaluate
from lenet_embed.families import HELD_OUT

BASELINE = "seed"
STOCK = "seed, stock conv1"


def time_stock_seed(dataset: object, seed: int, workdir: Path) -> dict[str, float | str]:
    """Train the seed recipe with Keras's own conv1 kernel: the training time it used to take."""
    trained = train(data=dataset, recipe=BASELINE, seed=seed, out=workdir / "stock.keras",
                    verbose=0, stock_conv1=True)
    return {"recipe": STOCK, "test_accuracy": round(trained.test_accuracy, 4),
            "epochs": trained.epochs, "train_seconds": trained.seconds,
            "train_cpu_seconds": trained.cpu_seconds}


def measure(recipe: str, dataset: object, seed: int, workdir: Path) -> dict[str, float | str]:
    """Train one recipe, then evaluate a cosine and an L2 bundle built from it."""
    model = workdir / f"{recipe}.keras"
    trained = train(data=dataset, recipe=recipe, seed=seed, out=model, verbose=0)
    row: dict[str, float | str] = {
        "recipe": recipe,
        "test_accuracy": round(trained.test_accuracy, 4),
        "epochs": trained.epochs,
        "train_seconds": trained.seconds,
        "train_cpu_seconds": trained.cpu_seconds,
    }
    for metric in ("cosine", "l2"):
        index_dir = workdir / f"{recipe}-{metric}"
        build_index(data=dataset, model=model, index_dir=index_dir, metric=metric,
                    factory="Flat")
        figures = evaluate(index_dir, data=dataset)
        if metric == "cosine":
            row["nn1_accuracy"] = round(figures.nn1_accuracy, 4)
            trust = figures.trust
            if trust is not None:  # docs/guide/trust.md, docs/benchmarks.md
                row["ece"] = round(trust.ece, 4)
                row["ood_auroc"] = round(trust.auroc, 4)
                row["ood_fpr95"] = round(trust.fpr_at_95_tpr, 4)
                row["digits_answered"] = round(trust.digits_answered, 4)
                row["nondigits_rejected"] = round(trust.nondigits_rejected, 4)
                row["final_rejected"] = round(trust.final_rejected or 0.0, 4)
                row["final_auroc"] = round(trust.final_auroc or 0.0, 4)
            row.update({f"top1_{name}": top1 for name, top1 in figures.degraded_top1.items()})
            row.update({f"family_{name}": top1 for name, top1 in figures.family_top1.items()})
        row[f"map_at_r_{metric}"] = round(figures.map_at_r, 4)
    return row


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="MNIST folder or mnist.npz")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help="comma-separated recipes to compare (the baseline, seed, always "
                        "runs first) [default: all]")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(RECIPES)}")

    dataset = load_mnist(args.data)
    recipes = [BASELINE, *(name for name in chosen if name != BASELINE)]
    with tempfile.TemporaryDirectory() as tmp:
        stock = time_stock_seed(dataset, args.seed, Path(tmp))
        rows = [measure(name, dataset, args.seed, Path(tmp)) for name in recipes]
    # Wall-clock time, and processor time: on a machine whose cores are lent to others now and
    # then (a shared VM) a run's wall-clock time moves by a third, the work it did does not.
    for key, ratio in (("train_seconds", "train_time_ratio"),
                       ("train_cpu_seconds", "train_cpu_ratio")):
        for row in [stock, *rows]:
            row[ratio] = round(float(row[key]) / float(rows[0][key]), 2)
            row[f"{ratio}_vs_stock"] = round(float(row[key]) / float(stock[key]), 2)
    if args.json:
        print(json.dumps([stock, *rows], indent=2))
        return
    _table(rows, ["recipe", "test_accuracy", "nn1_accuracy", "map_at_r_cosine", "map_at_r_l2",
                  "epochs"])
    print()
    _table([stock, *rows], ["recipe", "train_seconds", "train_time_ratio", "train_cpu_seconds",
                            "train_cpu_ratio", "train_time_ratio_vs_stock",
                            "train_cpu_ratio_vs_stock"])
    print()
    _table(rows, ["recipe", "ece", "ood_auroc", "ood_fpr95", "digits_answered",
                  "nondigits_rejected", "final_rejected", "final_auroc"])
    print()
    _table(rows, ["recipe", *(c for c in rows[0] if c.startswith("top1_"))])
    print("\npicture families (lenet_embed/families.py), top-1 of the answers with refusals "
          f"counted wrong; held out from every choice: {', '.join(HELD_OUT)}\n")
    _table(rows, ["recipe", *(c for c in rows[0] if c.startswith("family_"))])


def _table(rows: list[dict[str, float | str]], columns: list[str]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")


if __name__ == "__main__":
    run_script(main)
