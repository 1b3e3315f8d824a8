"""Product-quantised inverted files: 8-bit codes against 4-bit fast-scan codes of the same size.

For each kind, builds an inverted file (``sqrt(n)`` cells, ``nprobe = max(8, nlist // 64)``, as
:func:`raresift.index.build_index` does) and searches queries for ``pq_refine`` x 101 neighbours,
then re-ranks them by the exact vectors as :meth:`raresift.index.VectorIndex.neighbours` does.
Prints build time, search time (median of 3) and recall@101 against exact search:

* ``--caltech PROJECT``: a project's real whole-photo vectors (e.g. Caltech-101 with Lite2, 1,280-d),
  300 of its photos as queries: what the codes lose on real features;
* ``--synthetic VECTORS --n N``: the first N rows of a vector file (e.g. the 10^7 x 512-d file of
  ``scale_shards.py``), 100 queries: search speed at scale (those vectors are noise-like, so recall
  there says little).

Usage:
    python benchmarks/pq_kinds.py --caltech /work/devdata/coldstart/caltech
    python benchmarks/pq_kinds.py --synthetic /work/devdata/scale/p-10000000/embeddings/vectors.npy --n 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

K = 101
REFINE = 4


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def build(kind: str, m: int, X: np.ndarray, nlist: int):
    import faiss

    quantizer = faiss.IndexFlatIP(X.shape[1])
    if kind == "8-bit":
        index = faiss.IndexIVFPQ(quantizer, X.shape[1], nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQFastScan(quantizer, X.shape[1], nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.min_points_per_centroid = 1
    rng = np.random.default_rng(0)
    n_train = min(len(X), max(nlist * 40, 10000))
    t0 = time.perf_counter()
    index.train(X[np.sort(rng.choice(len(X), n_train, replace=False))])
    index.add(X)
    return index, time.perf_counter() - t0


def compare(label: str, X: np.ndarray, queries: np.ndarray) -> None:
    import faiss

    nlist = int(round(np.sqrt(len(X))))
    nprobe = max(8, nlist // 64)
    exact_index = faiss.IndexFlatIP(X.shape[1])
    exact_index.add(X)
    exact = exact_index.search(queries, K)[1]
    print(f"{label}: {len(X):,} x {X.shape[1]}-d, {len(queries)} queries, nlist {nlist}, nprobe {nprobe}, "
          f"{REFINE * K} fetched then re-ranked\n", flush=True)
    print("| codes | bytes a vector | build | search (median of 3) | recall@101 re-ranked |")
    print("|---|---:|---:|---:|---:|")
    for kind, m in (("8-bit", 64), ("4-bit fast-scan", 128), ("4-bit fast-scan", 64)):
        if X.shape[1] % m:
            continue
        index, built = build(kind, m, X, nlist)
        index.nprobe = nprobe
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            found = index.search(queries, REFINE * K)[1]
            times.append(time.perf_counter() - t0)
        recall = []
        for q, cand, truth in zip(queries, found, exact):
            cand = cand[cand >= 0]
            top = cand[np.argsort(-(X[cand] @ q), kind="stable")[:K]]
            recall.append(len(set(top.tolist()) & set(truth.tolist())) / K)
        nbytes = m if kind == "8-bit" else m // 2
        print(f"| {kind}, {m} sub-quantisers | {nbytes} | {built:.1f} s | {statistics.median(times):.3f} s | "
              f"{np.mean(recall):.3f} |", flush=True)
    print()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--caltech", type=Path, help="a project folder: its whole-photo vectors are the collection")
    ap.add_argument("--synthetic", type=Path, help="a .npy vector file (rows, [views,] dim)")
    ap.add_argument("--n", type=int, default=1_000_000, help="rows of --synthetic to index")
    args = ap.parse_args(argv)
    if not args.caltech and not args.synthetic:
        ap.error("give --caltech PROJECT and/or --synthetic VECTORS")
    if args.caltech:
        v = np.load(args.caltech / "embeddings" / "vectors.npy", mmap_mode="r")
        X = unit(v[:, 0, :] if v.ndim == 3 else v)
        X = X[np.any(X != 0, axis=1)]
        rows = np.random.default_rng(1).choice(len(X), 300, replace=False)
        compare(f"real vectors of {args.caltech.name}", X, X[rows])
    if args.synthetic:
        v = np.load(args.synthetic, mmap_mode="r")
        X = unit(v[: args.n, 0, :] if v.ndim == 3 else v[: args.n])
        rows = np.random.default_rng(1).choice(len(X), 100, replace=False)
        compare(f"first {args.n:,} rows of {args.synthetic.name}", X, X[rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
