"""Does a knn candidate pool rank as well as scoring every photo? `simulate --pool knn` against `--pool full`.

Both through :func:`raresift.simulate.simulate` (the learner of ``raresift next``), on the same
projects, seeds and test splits, so the two columns differ only by the pool:

* flowers: the insect key (``benchmarks/data/flowers_insects.csv``), default protocol, query
  "insect or spider", ``--repeats`` splits; precision@50 at 25 / 50 / 100 / 200 labels;
* Caltech-101 (``--caltech PROJECT``, an embedded project of the Caltech photos, optional): each of
  ``--classes`` as the rare class (its folder; the rest negatives), query = the class name where it
  matches an ImageNet concept (else exploration), 2 repeats;
  precision@K (K = min(50, test positives)) and positives found after 200 labels.

A knn round scores the neighbours (k = 100) of every labelled photo plus 1,000 random photos, so on
these small collections (1,531 and 9,144 photos) it already scores most of them; the point here is
that the ranking it produces is not worse. ``benchmarks/round_latency.py --pools`` measures the time.

Usage:
    python benchmarks/pool_knn.py --flowers /work/devdata/flowers [--caltech /work/devdata/coldstart/caltech]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from raresift.learn.coldstart import concepts_for
from raresift.simulate import simulate

HERE = Path(__file__).resolve().parent
POINTS = (25, 50, 100, 200)
CLASSES = ("butterfly", "dragonfly", "ant", "scorpion", "crab", "starfish", "sunflower", "lotus")


def at(curve: list[dict], key: str) -> dict[int, float]:
    return {p["labels"]: p[key] for p in curve if p["labels"] in POINTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowers", type=Path, default=None, help="an embedded project of the flower photos")
    ap.add_argument("--caltech", type=Path, default=None, help="an embedded project of the Caltech-101 photos")
    ap.add_argument("--classes", default=",".join(CLASSES))
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    threadpool_limits(1)
    t0 = time.time()
    print("# `simulate --pool knn` against `--pool full`\n")
    res = {}
    for pool in ("full", "knn") if args.flowers is not None else ():
        res[pool] = simulate(project=args.flowers, truth=HERE / "data" / "flowers_insects.csv", protocol="default",
                             query="insect or spider", budget=200, repeats=args.repeats, seed=0, k=50, pool=pool)
    if res:
        print(f"Flowers, insects ({args.repeats} splits), precision@50 (mean) after N labels:\n")
        print("| pool | " + " | ".join(str(p) for p in POINTS) + " |\n|---|" + "---:|" * len(POINTS))
        for pool in ("full", "knn"):
            prec = at(res[pool]["curve"], "precision_at_k_mean")
            print(f"| {pool} | " + " | ".join(f"{prec[p]:.3f}" for p in POINTS) + " |")
        sd = at(res["full"]["curve"], "precision_at_k_sd")
        print(f"\nsd between splits (full): {' / '.join(f'{sd[p]:.3f}' for p in POINTS)}\n", flush=True)
    if args.caltech is not None:
        rows = []
        for cls in args.classes.split(","):
            out = {}
            for pool in ("full", "knn"):
                words = cls.replace("_", " ")
                r = simulate(project=args.caltech, truth_folder=cls, protocol="default",
                             query=words if concepts_for(words) else None, budget=200, repeats=2, seed=0, k=None,
                             pool=pool)
                last = r["curve"][-1]
                out[pool] = (last["precision_at_k_mean"], last["positives_found_mean"], r["k"])
            rows.append((cls, out))
            print(f"<!-- {cls}: {out} -->", file=sys.stderr, flush=True)
        print("Caltech-101, each class the rare class, query = its name, 2 repeats, after 200 labels:\n")
        print("| class | precision@K full | knn | positives found full | knn |\n|---|---:|---:|---:|---:|")
        for cls, out in rows:
            print(f"| {cls} | {out['full'][0]:.3f} | {out['knn'][0]:.3f} | {out['full'][1]:.1f} | {out['knn'][1]:.1f} |")
        mean = {p: (np.mean([o[p][0] for _, o in rows]), np.mean([o[p][1] for _, o in rows])) for p in ("full", "knn")}
        print(f"| mean | {mean['full'][0]:.3f} | {mean['knn'][0]:.3f} | {mean['full'][1]:.1f} | {mean['knn'][1]:.1f} |")
    print(f"\n_{time.time() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
