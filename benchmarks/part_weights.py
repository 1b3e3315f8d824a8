"""How much should the whole photo weigh beside the tiles? The same sessions at several whole-photo weights.

The default feature of a tiled photo is the whole photo, the mean and the max over its tiles, each
signed-square-rooted, L2-normalised and scaled by ``raresift.learn.features.PART_WEIGHTS`` (then the
whole vector normalised again). The tiles help where the rare thing is small (the insects on the flower
photos) and can hurt where it fills the frame (Caltech-101). This script sets the whole photo's weight
to each value of ``--weights`` in turn, in this process only, and replays the same sessions for each
(same seeds, so the differences are paired):

* ``--flowers P``: ``simulate(protocol="default", query="insect or spider")`` on an embedded flower
  project with the insect key (benchmarks/data/flowers_insects.csv), precision@50 at 25 / 50 / 100 /
  200 labels, and the ceiling (the head on every pool photo), 10 splits;
* ``--caltech P``: ``quality_caltech.run_classes`` (the write-up's ``seed`` protocol and raresift's
  ``default``) on an embedded Caltech-101 project, precision@K at 25 ... 400 labels, mean over the
  classes, and per class at 100 and 200 labels.

    python benchmarks/part_weights.py --flowers /path/flowers --weights 0.5 1.0
    python benchmarks/part_weights.py --caltech /path/caltech --weights 0.5 1.0 --repeats 4

One thread (BLAS); run the two projects as two processes to use two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_caltech  # noqa: E402
import quality_flowers  # noqa: E402

from raresift.learn.features import PART_WEIGHTS  # noqa: E402
from raresift.simulate import simulate  # noqa: E402

CALTECH_CLASSES = "butterfly,dragonfly,ant,scorpion,crab,starfish,sunflower,lotus,bonsai,yin_yang"


def _set_whole(weight: float) -> None:
    # Every reader looks the weights up in this one dict when it featurises, and the caches are keyed by
    # its values, so changing it here changes the features of everything this process does next.
    PART_WEIGHTS["whole"] = float(weight)


def flowers(project: Path, weights: list[float], repeats: int) -> None:
    rows = []
    for w in weights:
        _set_whole(w)
        t = time.time()
        res = simulate(protocol="default", query="insect or spider", budget=200, repeats=repeats,
                       truth=quality_flowers.DEFAULT_TRUTH, project=project)
        top, _ = quality_flowers.ceiling(project, quality_flowers.DEFAULT_TRUTH, repeats)
        curve = {p["labels"]: p["precision_at_k_mean"] for p in res["curve"]}
        rows.append((w, curve, top))
        print(f"flowers whole={w}: {curve} ceiling {top:.3f} ({time.time() - t:.0f} s)", file=sys.stderr)
    print(f"\n**Flowers, insects** ({repeats} splits): precision@50\n")
    print("| whole weight | 25 | 50 | 100 | 200 | ceiling |")
    print("|---:|---:|---:|---:|---:|---:|")
    for w, curve, top in rows:
        print(f"| {w:g} | " + " | ".join(f"{curve.get(n, float('nan')):.3f}" for n in (25, 50, 100, 200))
              + f" | {top:.3f} |")


def caltech(project: Path, weights: list[float], repeats: int, classes: list[str]) -> None:
    """``classes`` empty: every class under 1% of the photos."""
    cols = (25, 50, 100, 200, 300, 400)
    out = []
    for w in weights:
        _set_whole(w)
        t0 = time.time()
        data = quality_caltech.load(project)
        classes = classes or quality_caltech.rare_classes(data.folder)  # as quality_caltech.py does by default
        results, has_concept = quality_caltech.run_classes(data, classes, repeats=repeats, t0=t0)
        out.append((w, results, has_concept))
    print(f"\n**Caltech-101**, {len(classes)} classes, {repeats} sessions each: precision@K, mean over classes\n")
    print("| whole weight | " + " | ".join(str(n) for n in cols) + " | seed 300 / 400 | concept classes 100 / 200 |")
    print("|---:|" + "---:|" * (len(cols) + 2))
    for w, results, has_concept in out:
        d = [np.mean([results[c]["default"][n][0] for c in classes]) for n in cols]
        s = [np.mean([results[c]["seed"][n][0] for c in classes]) for n in (300, 400)]
        named = [c for c in classes if has_concept[c]]
        k = [np.mean([results[c]["default"][n][0] for c in named]) for n in (100, 200)]
        print(f"| {w:g} | " + " | ".join(f"{v:.3f}" for v in d) + f" | {s[0]:.3f} / {s[1]:.3f} | "
              f"{k[0]:.3f} / {k[1]:.3f} |")
    base = out[0][1]
    for w, results, _ in out[1:]:
        diffs = np.array([[results[c]["default"][n][0] - base[c]["default"][n][0] for n in (100, 200, 300, 400)]
                          for c in classes])
        per_class = diffs.mean(axis=1)
        print(f"\nwhole {w:g} minus {out[0][0]:g}, per class, mean over 100-400 labels: "
              + ", ".join(f"{c} {v:+.3f}" for c, v in zip(classes, per_class))
              + f"; mean {per_class.mean():+.3f} ± {per_class.std(ddof=1) / np.sqrt(len(classes)):.3f} (se over classes)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowers", type=Path, help="embedded flower project (tiled)")
    ap.add_argument("--caltech", type=Path, help="embedded Caltech-101 project (tiled)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0], help="whole-photo weights (first = baseline)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="splits for the flowers (default 10), sessions per class for Caltech (default 4)")
    ap.add_argument("--classes", default=CALTECH_CLASSES,
                    help="Caltech classes, comma-separated, or 'rare': every class under 1%% of the photos "
                         "(default: the 10 classes of RESULTS.md's Caltech tables)")
    args = ap.parse_args(argv)
    if not (args.flowers or args.caltech):
        ap.error("give --flowers and/or --caltech")
    with threadpool_limits(1):
        if args.flowers:
            flowers(args.flowers, args.weights, args.repeats or 10)
        if args.caltech:
            classes = [] if args.classes == "rare" else args.classes.split(",")
            caltech(args.caltech, args.weights, args.repeats or 4, classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
