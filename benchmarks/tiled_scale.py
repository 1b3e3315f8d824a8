"""A round on a tiled project at 10^6 photos: whole photo + 3 x 3 tiles, 1280-d float16 (25.6 KB a photo).

Writes a project whose vector file looks like what ``raresift embed --tiles 3`` writes (10 views per
photo; synthetic values: 400 clusters of non-negative vectors, tiles scattered around their photo, a 1%
rare class whose signal sits in one tile of each rare photo), through the store's own API, then runs
``prepare_scoring`` (what ``embed`` runs at its end: from ``pool_auto_min`` view vectors on it builds the
FAISS index), imports 200 labels (20 rare) and times, as whole commands in fresh processes:

* ``raresift next P --n 100 --json`` (``--pool auto``: a knn pool at this size), the first and the median
  of ``--repeats`` more, each after 100 new labels (so each round searches new neighbours);
* one ``--pool full`` round, for comparison.

From ``pool_auto_min`` view vectors on, ``prepare_scoring`` also writes every photo's feature once
(float16, ``pooled_features``), which the rounds read instead of featurising 10 views a photo.

``--layout compact`` (what ``embed`` now writes by default) keeps, per photo, the three parts of its
feature and a byte per value for the evidence (``raresift.learn.features.compact_views``): a new project is
written that way, and with ``--reuse`` a project kept as views is converted by ``raresift compact`` (timed)
first. ``--layout views`` is the layout before.

Prints bytes per photo, the disk beside the vectors, each command's time and peak memory (the largest
resident set, which counts the pages of memory-mapped files).

Usage:
    python benchmarks/tiled_scale.py --work /work/devdata/tiled --photos 1000000 [--layout views]
    python benchmarks/tiled_scale.py --work /work/devdata/tiled --photos 1000000 --reuse --concept c2  # 200 labels again
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VIEWS, TILES = 10, 3
CLUSTERS = 400
_BLOCK = 20_000


def make_project(path: Path, n: int, dim: int, seed: int = 0, layout: str = "compact") -> np.ndarray:
    """The project and its vectors; returns the rows of the rare class."""
    from raresift import Project
    from raresift.learn.features import compact_views
    from raresift.learn.loop import prepare_scoring

    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(CLUSTERS, dim))).astype(np.float32)
    noise = (0.5 * rng.normal(size=(65_536, dim))).astype(np.float32)
    signal = 3.0 * np.abs(rng.normal(size=dim)).astype(np.float32)
    rare = np.sort(rng.choice(n, size=n // 100, replace=False))
    with Project.create(path) as project:
        store = project.store
        vec, _ = store.open_vectors_for_writing(n, VIEWS, dim, np.float16, logits=False, layout=layout)
        tiles = store.open_tiles_for_writing(n, dim) if layout == "compact" else None
        for start in range(0, n, _BLOCK):
            stop = min(n, start + _BLOCK)
            m = stop - start
            base = centres[rng.integers(0, CLUSTERS, m)]
            block = np.empty((m, VIEWS, dim), dtype=np.float32)
            block[:, 0] = base + noise[rng.integers(0, len(noise), m)]
            for v in range(1, VIEWS):
                block[:, v] = base + noise[rng.integers(0, len(noise), m)]
            hit = rare[(rare >= start) & (rare < stop)] - start
            block[hit, 1 + rng.integers(0, VIEWS - 1, len(hit))] += signal  # the rare thing is in one tile
            block[hit, 0] += 0.2 * signal  # and barely in the squeezed whole photo
            np.maximum(block, 0, out=block)
            if tiles is not None:
                vec[start:stop], tiles[start:stop] = compact_views(block)
            else:
                vec[start:stop] = block.astype(np.float16)
        vec.flush()
        if tiles is not None:
            tiles.flush()
        del vec, tiles
        store.register_external([f"img/{i:08d}.jpg" for i in range(n)])
        store.set_meta(**{"embed.model": "external:synthetic-tiles", "embed.dim": str(dim),
                          "embed.views": str(VIEWS), "embed.tiles": str(TILES), "embed.logits": "0",
                          "embed.dtype": "float16", "embed.layout": layout})
        t0 = time.perf_counter()
        prepare_scoring(store)
        print(f"prepare_scoring (the index): {time.perf_counter() - t0:.1f} s", flush=True)
    return rare


def timed(*args: str) -> tuple[float, int, str]:
    """``raresift ARGS`` in a fresh process: (seconds, its peak resident MB, stdout), as scale_shards measures."""
    from scale_shards import timed as timed_command  # beside this script

    seconds, peak_mb, out = timed_command([sys.executable, "-m", "raresift", *args])
    return seconds, int(peak_mb), out


def labels_csv(path: Path, rows: np.ndarray, rare: set[int]) -> Path:
    path.write_text("path,label\n" + "".join(f"img/{r:08d}.jpg,{int(r in rare)}\n" for r in rows))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--photos", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="use the project an earlier run wrote (prepare_scoring again)")
    ap.add_argument("--concept", default=None,
                    help="label under this concept (a fresh one: 200 labels, as in a new project); with --reuse the "
                         "cached neighbour lists of earlier labels are removed first, so the first round searches "
                         "the neighbours of its 200 labels as a new project's would")
    ap.add_argument("--warm", action="store_true",
                    help="read the project's vector and index files once before the rounds (a warm page cache)")
    ap.add_argument("--layout", choices=("compact", "views"), default="compact",
                    help="how the vectors are kept (with --reuse: a views project is converted by `raresift compact`)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    project = args.work / f"tiled-{args.photos}"
    t0 = time.perf_counter()
    if args.reuse and (project / "raresift.sqlite").is_file():
        from raresift import Project
        from raresift.learn.loop import prepare_scoring

        rng = np.random.default_rng(0)  # the draws of make_project, up to the rare rows
        np.abs(rng.normal(size=(CLUSTERS, args.dim)))
        rng.normal(size=(65_536, args.dim))
        np.abs(rng.normal(size=args.dim))
        rare = np.sort(rng.choice(args.photos, size=args.photos // 100, replace=False))
        with Project.open(project) as p:
            have = p.store.layout
        if args.layout == "compact" and have == "views":
            seconds, rss, out = timed("compact", str(project), "--json", "--no-progress")
            print(f"raresift compact: {seconds:.1f} s, peak {rss:,} MB: {out.strip()}", flush=True)
        elif args.layout != have:
            raise SystemExit(f"{project} is kept as {have}; only views -> compact converts (or write a new project)")
        with Project.open(project) as p:
            prepare_scoring(p.store)
        print(f"prepare_scoring on the existing project: {time.perf_counter() - t0:.1f} s", flush=True)
        if args.concept:
            (project / "embeddings" / "index-knn.npz").unlink(missing_ok=True)
    else:
        rare = make_project(project, args.photos, args.dim, layout=args.layout)
        print(f"project written in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.warm:
        t1 = time.perf_counter()
        for path in sorted((project / "embeddings").glob("*.npy")) + [project / "embeddings" / "index.faiss"]:
            if path.name.startswith("tilemax") or not path.is_file():
                continue  # read by the evidence of 100 photos a round only
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        print(f"warmed the page cache in {time.perf_counter() - t1:.1f} s", flush=True)
    rare_set = set(rare.tolist())
    concept = ["--concept", args.concept] if args.concept else []
    rng = np.random.default_rng(1)
    others = rng.choice(np.setdiff1d(np.arange(args.photos), rare), size=180 + 100 * (args.repeats + 1), replace=False)
    first = np.concatenate([rare[:20], others[:180]])
    timed("import-labels", str(project), str(labels_csv(args.work / "labels-0.csv", first, rare_set)), *concept)
    rounds = []
    for r in range(args.repeats + 1):
        seconds, rss, out = timed("next", str(project), "--n", "100", "--json", *concept)
        batch = json.loads(out)
        hits = sum(int(item["image_id"] - 1 in rare_set) for item in batch)
        rounds.append((seconds, rss, hits))
        print(f"round {r}: {seconds:.2f} s, peak {rss:,} MB, rare in the batch {hits} of {len(batch)}", flush=True)
        # Answer the batch (from the key) and 100 more random labels: the next round searches new neighbours.
        answered = np.array([item["image_id"] - 1 for item in batch], dtype=np.int64)
        more = others[180 + 100 * r : 180 + 100 * (r + 1)]
        timed("import-labels", str(project), str(labels_csv(args.work / f"labels-{r + 1}.csv",
                                                              np.concatenate([answered, more]), rare_set)), *concept)
    full_s, full_rss, out = timed("next", str(project), "--n", "100", "--pool", "full", "--json", *concept)
    full_hits = sum(int(item["image_id"] - 1 in rare_set) for item in json.loads(out))
    emb = project / "embeddings"
    kept = {"vectors.npy"} if args.layout == "views" else {"parts.npy", "tilemax.npy"}
    vectors = sum((emb / name).stat().st_size for name in kept)
    beside = sum(f.stat().st_size for f in emb.iterdir() if f.is_file() and f.name not in kept)
    params = json.loads(subprocess.run(
        [sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
         "'SELECT params FROM rounds ORDER BY id DESC LIMIT 1 OFFSET 1').fetchone()[0])",
         str(project / "raresift.sqlite")], capture_output=True, text=True, check=True).stdout)
    print(f"\n{args.photos:,} photos x {VIEWS} views x {args.dim}-d float16, layout {args.layout} ({', '.join(sorted(kept))}): "
          f"{vectors / args.photos:,.0f} bytes a photo "
          f"({vectors / 1e9:.1f} GB), beside them {beside / 1e9:.2f} GB ({beside / vectors:.2f}x: the index and the features)")
    print(f"pool of the knn rounds: {params['pool']}")
    print(f"first next (knn): {rounds[0][0]:.2f} s, peak {rounds[0][1]:,} MB")
    later = rounds[1:]
    print(f"next (knn) after 100 new labels, median of {len(later)}: {statistics.median(s for s, _, _ in later):.2f} s, "
          f"peak {max(m for _, m, _ in later):,} MB, rare per batch {[h for _, _, h in rounds]}")
    print(f"next --pool full: {full_s:.2f} s, peak {full_rss:,} MB, rare in the batch {full_hits}")
    print(f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024:,} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
