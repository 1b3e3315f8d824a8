"""Quality on Caltech-101's rare classes: the write-up's protocol vs raresift's workflow and plain strategies.

Every class under 1% of the photos becomes the rare class in turn (answer key = its folder). For
each, simulated labelling sessions (each on its own random 40% test split) compare

* ``seed``: the reference write-up (300 random labels, then the 100 most uncertain);
* ``default``: raresift's workflow, with the class name as the text query (when the name matches
  an ImageNet concept; otherwise it starts by exploring k-means clusters), up to 400 labels;
* the plain strategies (random, uncertainty, uncertainty-sampling, top, diverse), starting from
  random labels, up to 200 labels.

Reported: precision@K on the test split (K = min(50, test positives)) and average precision (AP),
at 50, 100, 200 (300, 400) labels; a per-class table and the means, as markdown.

    python benchmarks/quality_caltech.py --project /path/to/caltech-project          # embedded project
    python benchmarks/quality_caltech.py --project /tmp/caltech --images ../shared/datasets/caltech101/101_ObjectCategories
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from raresift import Project
from raresift.learn.coldstart import concepts_for, text_scores_from_logits
from raresift.learn.features import gather
from raresift.learn.loop import clusters as project_clusters
from raresift.simulate import SimulationData, replay

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
PLAIN = ("random", "uncertainty", "uncertainty-sampling", "top", "diverse")


def _open(project: Path, images: Path) -> Project:
    if (project / "raresift.sqlite").exists():
        p = Project.open(project)
    else:
        p = Project.create(project, images=images)
        p.add_images()
    if p.store.count_status("new"):
        p.embed()
    return p


def _points(runs: list[dict]) -> dict[int, tuple[float, float]]:
    by: dict[int, list[tuple[float, float]]] = {}
    for run in runs:
        for pt in run["points"]:
            by.setdefault(pt["labels"], []).append((pt["precision"], pt["ap"]))
    return {k: (float(np.mean([a for a, _ in v])), float(np.nanmean([b for _, b in v]))) for k, v in by.items()}


@dataclass
class CaltechData:
    """What the sessions replay: every embedded photo's feature, ImageNet logits and class folder,
    and the project's own clusterings (the ones `raresift next` explores)."""

    X: np.ndarray
    logits: np.ndarray
    folder: np.ndarray
    clusters: list


def load(project: Path, images: Path = DEFAULT_IMAGES) -> CaltechData:
    """Open (or make and embed) the project and featurise its photos with today's feature settings."""
    with _open(project, images) as p:
        rows = np.flatnonzero(p.embedded_mask())
        ids = [p.image_ids()[r] for r in rows]
        X = gather(p.vectors(), rows)
        logits = np.asarray(p.imagenet_logits()[rows])
        clusters = [(ids_[rows], dist[rows]) for ids_, dist in project_clusters(p.store)]
    return CaltechData(X, logits, np.array([i.split("/")[0] for i in ids]), clusters)


def rare_classes(folder: np.ndarray, share: float = 0.01) -> list[str]:
    """The classes (folders) under ``share`` of the photos, smallest first."""
    names, counts = np.unique(folder, return_counts=True)
    return [c for c, n in sorted(zip(names, counts), key=lambda t: t[1]) if n < share * len(folder)]


def run_classes(data: CaltechData, classes: list[str], *, repeats: int, plain_repeats: int = 0, seed: int = 0,
                t0: float | None = None):
    """Each class the rare class in turn: ``seed`` and ``default`` sessions (and the plain strategies),
    as ``{class: {method: {labels: (precision@K, AP)}}}``, and which classes have an ImageNet concept."""
    t0 = time.time() if t0 is None else t0
    results: dict[str, dict[str, dict[int, tuple[float, float]]]] = {}
    has_concept: dict[str, bool] = {}
    for i, c in enumerate(classes, 1):
        y = (data.folder == c).astype(np.int64)
        concepts = concepts_for(c.replace("_", " "))
        has_concept[c] = bool(concepts)
        prior = text_scores_from_logits(data.logits, concepts) if concepts else None
        rng = lambda r: np.random.default_rng(seed + r)
        res = {"seed": _points([replay(SimulationData(data.X, y), protocol="seed", rng=rng(r), k=None)
                                for r in range(repeats)])}
        res["default"] = _points([replay(SimulationData(data.X, y, prior, clusters=None if concepts else data.clusters),
                                         protocol="default", rng=rng(r), k=None, budget=400)
                                  for r in range(repeats)])
        for s in PLAIN if plain_repeats else ():
            res[s] = _points([replay(SimulationData(data.X, y), protocol="default", strategy=s, rng=rng(r), k=None,
                                     budget=200) for r in range(plain_repeats)])
        results[c] = res
        print(f"[{i}/{len(classes)} {time.time() - t0:.0f}s] {c}: seed@400 {res['seed'][400][0]:.2f}, "
              f"default@100 {res['default'][100][0]:.2f} @400 {res['default'][400][0]:.2f}", file=sys.stderr)
    return results, has_concept


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="embedded Caltech-101 project, or where to make one")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--repeats", type=int, default=2, help="sessions per class for seed and default (default 2)")
    ap.add_argument("--plain-repeats", type=int, default=1, help="sessions per class per plain strategy (default 1; 0 = skip)")
    ap.add_argument("--classes", default=None, help="comma-separated class folders (default: every class under --share)")
    ap.add_argument("--share", type=float, default=0.01, help="rare = under this share of the photos (default 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    threadpool_limits(1)  # a fair share of a machine that others use too
    data = load(args.project, args.images)
    names, counts = np.unique(data.folder, return_counts=True)
    classes = args.classes.split(",") if args.classes else rare_classes(data.folder, args.share)
    print(f"Caltech-101: {len(data.folder)} photos, {len(classes)} rare classes (< {args.share:.0%}); "
          f"{args.repeats} sessions per class (plain strategies: {args.plain_repeats})", file=sys.stderr)
    results, has_concept = run_classes(data, classes, repeats=args.repeats, plain_repeats=args.plain_repeats,
                                       seed=args.seed, t0=t0)
    _report(results, has_concept, dict(zip(names, counts)), args, time.time() - t0)
    return 0


def _report(results, has_concept, counts, args, seconds) -> None:
    methods = list(next(iter(results.values())))
    print("### Caltech-101 rare classes: precision@K (K = min(50, test positives)), mean over classes\n")
    print(f"{len(results)} classes under {args.share:.0%} of the photos; {args.repeats} sessions per class for seed "
          f"and default, {args.plain_repeats} per plain strategy; {seconds / 60:.0f} min on one core.\n")
    groups = [("all classes", list(results)),
              ("class name matches an ImageNet concept", [c for c in results if has_concept[c]]),
              ("no matching concept (default explores)", [c for c in results if not has_concept[c]])]
    labels_cols = [25, 50, 100, 200, 300, 400]
    for title, cls in groups:
        if not cls:
            continue
        print(f"**{title}** ({len(cls)} classes): precision@K / AP\n")
        print("| method | " + " | ".join(f"{n} labels" for n in labels_cols) + " |")
        print("|---|" + "---:|" * len(labels_cols))
        for m in methods:
            cells = []
            for n in labels_cols:
                vals = [results[c][m].get(n) for c in cls]
                if any(v is None for v in vals):
                    cells.append("")
                    continue
                cells.append(f"{np.mean([v[0] for v in vals]):.3f} / {np.nanmean([v[1] for v in vals]):.3f}")
            print(f"| {m} | " + " | ".join(cells) + " |")
        wins = {n: sum(results[c]["default"][n][0] >= results[c]["seed"][n][0] for c in cls) for n in (300, 400)}
        quarter = sum(results[c]["default"][100][0] >= results[c]["seed"][400][0] for c in cls)
        print(f"\ndefault >= seed: {wins[300]}/{len(cls)} classes at 300 labels, {wins[400]}/{len(cls)} at 400; "
              f"default with 100 labels >= seed with 400: {quarter}/{len(cls)}\n")
    print("<details><summary>per class: precision@K (seed 300 / 400; default 50 / 100 / 200 / 400)</summary>\n")
    print("| class | photos | concept | seed 300 | seed 400 | default 50 | default 100 | default 200 | default 400 |")
    print("|---|---:|:---:|---:|---:|---:|---:|---:|---:|")
    for c, r in results.items():
        s, d = r["seed"], r["default"]
        print(f"| {c} | {counts[c]} | {'yes' if has_concept[c] else 'no'} | {s[300][0]:.2f} | {s[400][0]:.2f} | "
              f"{d[50][0]:.2f} | {d[100][0]:.2f} | {d[200][0]:.2f} | {d[400][0]:.2f} |")
    print("\n</details>")


if __name__ == "__main__":
    sys.exit(main())
