"""Which embedding options rank a rare class best? Tiles (0 / 2 / 3) and resize (squeeze / crop).

Same protocol for every option, so only the representation differs: per repeat, a random 40% test
split, 300 random labelled photos from the rest, an L2-regularised logistic regression on
L2-normalised features (class_weight balanced), precision@K on the test split (K = min(50, test
positives)). Prints mean and sd over repeats, and the embedding time of each project if known.

    python benchmarks/embed_options.py --truth truth.csv \\
        --project squeeze-t3=/data/flowers-t3 --project crop=/data/flowers-crop

A project embedded with tiles N also stands for tiles 0 (its view 0 is the whole photo), and for
every way of pooling the tiles ("+mean", "+max": tile vectors pooled and concatenated to view 0).
``--truth-folder NAME`` takes positives = photos under subfolder NAME instead of a CSV.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import numpy as np


def load_truth(project, truth_csv: Path | None, folder: str | None) -> np.ndarray:
    ids = project.image_ids()
    if folder is not None:
        return np.array([1 if p.split("/")[0] == folder else 0 for p in ids], dtype=np.int8)
    with open(truth_csv, newline="", encoding="utf-8-sig") as fh:
        key = {row["path"]: int(row["label"]) for row in csv.DictReader(fh)}
    missing = [p for p in ids if p not in key]
    if missing:
        sys.exit(f"truth file lacks {len(missing)} project ids, e.g. {missing[0]}")
    return np.array([key[p] for p in ids], dtype=np.int8)


def features(vectors: np.ndarray, pool: str) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    full = v[:, 0]
    if pool == "full":
        out = full
    else:
        tiles = v[:, 1:]
        pooled = tiles.mean(axis=1) if pool == "mean" else tiles.max(axis=1)
        out = np.concatenate([_l2(full), _l2(pooled)], axis=1)
    return _l2(out)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def precision_at_k(X, y, *, repeats: int, n_labels: int, seed: int, C: float) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    out = []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        order = rng.permutation(len(y))
        n_test = int(round(0.4 * len(y)))
        test, rest = order[:n_test], order[n_test:]
        train = rng.choice(rest, size=min(n_labels, len(rest)), replace=False)
        if y[train].min() == y[train].max():
            out.append(float("nan"))
            continue
        head = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(X[train], y[train])
        scores = head.decision_function(X[test])
        k = int(min(50, y[test].sum()))
        top = test[np.argsort(-scores)[:k]]
        out.append(float(y[top].mean()) if k else float("nan"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--truth", type=Path)
    ap.add_argument("--truth-folder")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--labels", type=int, default=300)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from raresift import Project

    rows = []
    for spec in args.project:
        name, _, path = spec.partition("=")
        with Project.open(path) as project:
            if project.store.layout != "views":
                raise SystemExit(f"{path} keeps compact vectors; these options pool every view: embed it with "
                                 "`raresift embed --layout views`")
            y = load_truth(project, args.truth, args.truth_folder)
            mask = project.embedded_mask()
            vec = np.asarray(project.vectors())[mask]
            y = y[mask]
            pools = ["full"] + (["mean", "max"] if vec.shape[1] > 1 else [])
            for pool in pools:
                X = features(vec, pool)
                p = precision_at_k(X, y, repeats=args.repeats, n_labels=args.labels, seed=args.seed, C=args.C)
                p = [v for v in p if v == v]
                rows.append((name, pool, len(y), int(y.sum()), statistics.mean(p), statistics.pstdev(p), len(p)))
    print(f"protocol: {args.labels} random labels, 40% test split, logistic regression C={args.C}, "
          f"precision@min(50, test positives), {args.repeats} repeats")
    print(f"{'option':<20} {'tiles pooled':<12} {'photos':>7} {'positives':>9} {'P@K mean':>9} {'sd':>6} {'n':>3}")
    for name, pool, n, pos, mean, sd, k in rows:
        print(f"{name:<20} {pool:<12} {n:>7} {pos:>9} {mean:>9.3f} {sd:>6.3f} {k:>3}")


if __name__ == "__main__":
    main()
