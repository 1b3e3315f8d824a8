"""SEALS candidate pools: quality against the full scan on Caltech-101, round time against collection size.

Part 1, quality (``--caltech PROJECT``, an embedded Caltech-101 project, read only): every small
Caltech class in turn is the rare class. A simulated labelling session starts from 5 positives and
20 random photos of the pool split, then runs ``--rounds`` rounds of ``--batch`` photos chosen by
raresift's default strategy and head (``raresift.learn``), once scoring the whole pool ("full
scan") and once scoring only the SEALS candidate pool: the unlabelled photos among the ``k``
nearest neighbours of the labelled ones (FAISS index, ``raresift.index``). Quality =
average precision of the final model on the test split, and the share of the pool's positives
found among the labels. Reported: means over classes and seeds, and the SEALS - full difference.

Part 2, scale (``--scale-projects DIR...``, projects of synthetic vectors made by
``benchmarks/round_latency.py``): time of one round (200 labels) with SEALS (neighbour search of
the labelled photos, training, scoring the candidate pool, selection) next to the full scan's
scoring alone, at each collection size. Usage::

    python benchmarks/seals_scale.py --caltech /work/devdata/caltech \\
        --scale-projects /work/devdata/round-latency/n10000 /work/devdata/round-latency/n100000 \\
        /work/devdata/round-latency/n1000000
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from raresift.index import VectorIndex, build_index, candidate_pool
from raresift.learn.features import MatrixFeatures, featurize
from raresift.learn.session import Session, fit_scorer, sigmoid
from raresift.learn.strategies import get_strategy

SMALL_CLASSES = ("butterfly", "dragonfly", "ant", "scorpion", "crab", "starfish", "sunflower", "lotus",
                 "wild_cat", "cougar_face", "llama", "kangaroo")


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = truth[order].astype(np.float64)
    if hits.sum() == 0:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def read_project(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(features (n, d) float32 unit rows, paths, split names) of an embedded project, read only."""
    db = sqlite3.connect(f"file:{path / 'raresift.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT id, path, split, status FROM images ORDER BY id").fetchall()
    db.close()
    vec = np.load(path / "embeddings" / "vectors.npy", mmap_mode="r")
    keep = np.array([r[3] == "embedded" for r in rows])
    X = featurize(np.asarray(vec[: len(rows)])[keep])
    return X, [r[1] for r, k in zip(rows, keep) if k], np.array([r[2] for r, k in zip(rows, keep) if k])


class _Matrix:
    """Features by row, the way raresift.learn takes them."""

    def __init__(self, X):
        self.X = X

    def __getitem__(self, rows):
        return self.X[rows]


def simulate(X, truth, pool, test, *, index: VectorIndex | None, k: int, rounds: int, batch: int,
             seed: int) -> tuple[float, float, float]:
    """One session of raresift's learner (:class:`raresift.learn.session.Session`), picking from the whole
    pool or from the SEALS candidate pool; returns (test AP, share of pool positives found, mean pool share)."""
    rng = np.random.default_rng(seed)
    labels = np.full(len(X), -1, dtype=np.int8)
    pos = pool[truth[pool] == 1]
    first = np.concatenate([rng.choice(pos, size=min(5, len(pos)), replace=False),
                            rng.choice(pool, size=20, replace=False)])
    labels[first] = truth[first]
    in_pool = np.zeros(len(X), dtype=bool)
    in_pool[pool] = True
    session = Session(MatrixFeatures(X), labels, in_pool)
    pool_share = []
    for _ in range(rounds):
        labelled = session.labels >= 0
        if index is None:
            cand = in_pool & ~labelled
        else:
            cand = np.zeros(len(X), dtype=bool)
            cand[candidate_pool(index, X, np.flatnonzero(labelled), k=k, exclude=labelled | ~in_pool)] = True
        pool_share.append(cand.sum() / len(pool))
        picks = session.query(batch, "default", rng=rng, candidates=cand)
        session.update(picks.rows, truth[picks.rows])
    session.fit(rng)
    ap = average_precision(session.logits()[test], truth[test])
    lab = np.flatnonzero(session.labels >= 0)
    found = truth[lab].sum() / max(1, truth[pool].sum())
    return ap, float(found), float(np.mean(pool_share))


def quality(args) -> None:
    X, paths, splits = read_project(args.caltech)
    classes = np.array([p.split("/")[0] for p in paths])
    pool, test = np.flatnonzero(splits == "pool"), np.flatnonzero(splits == "test")
    t0 = time.perf_counter()
    index = build_index(X, kind="flat")
    print(f"Caltech-101: {len(X)} photos ({len(pool)} pool, {len(test)} test); flat index in "
          f"{time.perf_counter() - t0:.2f} s", flush=True)
    names = [c for c in SMALL_CLASSES if c in set(classes)][: args.classes]
    results: dict[str, list[tuple[float, float, float]]] = {"full": []}
    for k in args.k:
        results[f"seals k={k}"] = []
    for name in names:
        truth = (classes == name).astype(np.int64)
        for seed in range(args.seeds):
            results["full"].append(simulate(X, truth, pool, test, index=None, k=0, rounds=args.rounds,
                                            batch=args.batch, seed=seed))
            for k in args.k:
                results[f"seals k={k}"].append(simulate(X, truth, pool, test, index=index, k=k,
                                                        rounds=args.rounds, batch=args.batch, seed=seed))
        line = ", ".join(f"{m} AP {100 * statistics.mean(r[0] for r in v[-args.seeds:]):.1f}"
                         for m, v in results.items())
        print(f"  {name:<12} ({truth.sum()} photos): {line}", flush=True)
    print()
    labels = 25 + args.rounds * args.batch
    print(f"Caltech-101, {len(names)} rare classes x {args.seeds} seeds, {labels} labels "
          f"(5 positives + 20 random, then {args.rounds} rounds of {args.batch}, default strategy)")
    print()
    print("| pool | test AP (points) | vs full scan | positives found | vs full scan | scored per round |")
    print("|---|---:|---:|---:|---:|---:|")
    full_ap = 100 * np.nanmean([r[0] for r in results["full"]])
    full_found = 100 * np.mean([r[1] for r in results["full"]])
    for m, v in results.items():
        ap = 100 * np.nanmean([r[0] for r in v])
        found = 100 * np.mean([r[1] for r in v])
        share = 100 * np.mean([r[2] for r in v])
        print(f"| {m} | {ap:.1f} | {ap - full_ap:+.1f} | {found:.1f}% | {found - full_found:+.1f} | {share:.0f}% |")


def scale(args) -> None:
    from raresift import Project
    from raresift.learn.features import gather

    print()
    print("| photos | index (kind, build) | SEALS round: search | training | scoring | selection | "
          "**total** | candidates | first round (all 200 searched) | full scan: scoring alone |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in args.scale_projects:
        with Project.open(path) as p:
            vectors = p.vectors()
            n = vectors.shape[0]
            t0 = time.perf_counter()
            from raresift.index import project_index

            index = project_index(p.store, save=args.save_index)
            build = time.perf_counter() - t0
            index._faiss()
            index.path = None  # keep the timed rounds free of the on-disk neighbour cache
            rows = p.db.execute(
                "SELECT c.image_id - 1, c.value FROM current_labels c JOIN images i ON i.id = c.image_id "
                "WHERE i.split = 'pool'").fetchall()
        lab = np.array([r[0] for r in rows], dtype=np.int64)
        y = np.array([r[1] for r in rows], dtype=np.int64)
        rng = np.random.default_rng(0)
        timings, firsts = [], []
        for r in range(2 * args.repeats):
            # Even runs: a first round (every labelled photo searched). Odd runs: a steady round, where
            # the neighbours of the labels before the last batch are cached and the last 100 are new.
            index._knn_cache.clear()
            if r % 2:
                index.neighbours(vectors, lab[:-100], args.k[-1] + 1)
            t = [time.perf_counter()]
            exclude = np.zeros(n, dtype=bool)
            exclude[lab] = True
            cand = candidate_pool(index, vectors, lab, k=args.k[-1], exclude=exclude)
            with Project.open(path) as p:  # the test split of the candidates only: no O(n) read
                test_ids = set()
                for s in range(0, len(cand), 900):
                    chunk = (cand[s : s + 900] + 1).tolist()
                    q = f"SELECT id FROM images WHERE split = 'test' AND id IN ({','.join('?' * len(chunk))})"
                    test_ids.update(r[0] - 1 for r in p.db.execute(q, chunk))
            cand = cand[~np.isin(cand, np.fromiter(test_ids, dtype=np.int64, count=len(test_ids)))]
            t.append(time.perf_counter())
            weak = np.unique(rng.integers(0, n, size=2000))  # weak negatives: random rows of the collection
            weak = weak[~exclude[weak]]
            train_x = gather(vectors, np.concatenate([lab, weak]))
            scorer = fit_scorer(_Matrix(train_x), np.arange(len(lab)), y,
                                unlabeled=np.arange(len(lab), len(train_x)), rng=rng)
            t.append(time.perf_counter())
            cand_x = gather(vectors, cand)
            proba = sigmoid(scorer.head.decision_function(cand_x))
            t.append(time.perf_counter())
            get_strategy("default")(proba, 100, rng=rng, features=_Matrix(cand_x))
            t.append(time.perf_counter())
            (timings if r % 2 else firsts).append(np.diff(t))
        med = np.median(np.array(timings), axis=0)
        first = float(np.median([f.sum() for f in firsts]))
        # Full scan, scoring alone, for comparison (same head, every row).
        t0 = time.perf_counter()
        for start in range(0, n, 8192):
            scorer.head.decision_function(featurize(vectors[start : start + 8192]))
        full = time.perf_counter() - t0
        print(f"| {n:,} | {index.kind}, {build:.1f} s | {med[0]:.2f} s | {med[1]:.2f} s | {med[2]:.3f} s | "
              f"{med[3]:.2f} s | **{med.sum():.2f} s** | {len(cand):,} | {first:.2f} s | {full:.2f} s |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caltech", type=Path, default=None, help="embedded Caltech-101 project (read only)")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 30, 100], help="neighbours per labelled photo")
    ap.add_argument("--scale-projects", type=Path, nargs="*", default=[])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--save-index", action="store_true", help="keep the built index in the project")
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} usable CPUs", flush=True)
    if args.caltech:
        quality(args)
    if args.scale_projects:
        scale(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
