"""Latency of one labelling round, `raresift next --n 100 --json`, as a whole command, at 10^4..10^6 photos.

For each size it makes (once, under ``--workdir``) a project with ``raresift init --embeddings``
from synthetic 1280-d float32 vectors (clusters of non-negative vectors, like pooled CNN features;
the rare class is one cluster, 1%), imports 200 labels from a CSV (20 positive), reads the vector
file once (warm page cache), runs one round (the first round after the vectors change writes the
signed-square-root features and row norms the rounds score from, beside the vectors; timed and
shown as "first round"), reads those files once, then times ``raresift next PROJECT --n 100 --json``
from outside. A second, in-process run of the same round splits the time into start-up (interpreter
and imports, timed as ``raresift --version``), training, scoring and selection (everything else:
reading labels and splits, choosing, recording the round). Usage::

    python benchmarks/round_latency.py [--sizes 10000 100000 1000000] [--workdir /work/devdata/round-latency]
        [--repeats 3] [--clean]

The 10^6 project takes about 10 GB of disk (5 GB of vectors, 5 GB of features; plus 5 GB while it
is made); ``--clean`` removes it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 1280
N_LABELS = 200
N_POSITIVE_LABELS = 20
RARE_SHARE = 0.01
CLUSTERS = 400
_BLOCK = 50_000


def raresift_cmd() -> list[str]:
    exe = shutil.which("raresift", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "raresift"]


def synthetic_vectors(path: Path, n: int, *, seed: int = 0) -> np.ndarray:
    """Write an (n, DIM) float32 .npy of clustered non-negative vectors; returns the cluster of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(0.6, 1.0, size=(CLUSTERS, DIM)).astype(np.float32)
    cluster = rng.integers(1, CLUSTERS, size=n)
    cluster[rng.random(n) < RARE_SHARE] = 0  # cluster 0 = the rare class
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, _BLOCK):
        c = cluster[start : start + _BLOCK]
        block = centres[c] + rng.standard_normal((len(c), DIM), dtype=np.float32) * np.float32(0.6)
        np.maximum(block, 0, out=block)
        out[start : start + len(c)] = block
    out.flush()
    del out
    return cluster


def make_project(workdir: Path, n: int) -> Path:
    project = workdir / f"n{n}"
    if (project / "raresift.sqlite").is_file() and (project / "labels-imported").is_file():
        return project
    shutil.rmtree(project, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    matrix, ids = workdir / f"vectors-{n}.npy", workdir / f"ids-{n}.txt"
    t0 = time.perf_counter()
    cluster = synthetic_vectors(matrix, n)
    with open(ids, "w") as fh:
        fh.writelines(f"photos/{i // 1000:04d}/img_{i:07d}.jpg\n" for i in range(n))
    t1 = time.perf_counter()
    subprocess.run([*raresift_cmd(), "init", str(project), "--embeddings", str(matrix), "--ids", str(ids)],
                   check=True, capture_output=True)
    t2 = time.perf_counter()
    matrix.unlink()
    ids.unlink()
    from raresift import Project

    with Project(project) as p:
        pool = np.flatnonzero(p.splits() == "pool")
        paths = p.image_ids()
    rng = np.random.default_rng(1)
    pos = rng.choice(pool[cluster[pool] == 0], size=N_POSITIVE_LABELS, replace=False)
    neg = rng.choice(pool[cluster[pool] != 0], size=N_LABELS - N_POSITIVE_LABELS, replace=False)
    csv = workdir / f"labels-{n}.csv"
    with open(csv, "w") as fh:
        fh.write("path,label\n")
        fh.writelines(f"{paths[r]},1\n" for r in pos)
        fh.writelines(f"{paths[r]},0\n" for r in neg)
    subprocess.run([*raresift_cmd(), "import-labels", str(project), str(csv)], check=True, capture_output=True)
    (project / "labels-imported").write_text("")
    print(f"  made {project}: vectors {t1 - t0:.0f} s, raresift init --embeddings {t2 - t1:.0f} s", flush=True)
    return project


def warm(project: Path, *patterns: str) -> None:
    """Read the project's embedding files matching ``patterns`` once (warm page cache)."""
    for pattern in patterns:
        for path in (project / "embeddings").glob(pattern):
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def time_command(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def compare(project: Path, args) -> None:
    """`next` of this raresift and of ``--baseline-src`` on the same project, interleaved runs, medians."""
    env = dict(os.environ, PYTHONPATH=str(args.baseline_src))
    base_cmd = [sys.executable, "-m", "raresift", "next", str(project), "--n", str(args.n), "--json"]
    subprocess.run(base_cmd, check=True, capture_output=True, env=env)  # its own caches, once
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_command([sys.executable, "-m", "raresift", *base_cmd[3:]])[0])
        t0 = time.perf_counter()
        subprocess.run(base_cmd, check=True, capture_output=True, env=env)
        theirs.append(time.perf_counter() - t0)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"  side by side, {args.repeats} interleaved runs: this raresift {a:.2f} s, baseline {b:.2f} s, "
          f"ratio {a / b:.2f}", flush=True)


def compare_pools(project: Path, args) -> dict[str, float]:
    """`next --pool full` against `next --pool knn` on the same project: the first knn round (it builds the
    FAISS index and keeps it), then interleaved runs of both; medians."""
    cmd = [*raresift_cmd(), "next", str(project), "--n", str(args.n), "--json", "--pool"]
    first, _ = time_command([*cmd, "knn"])
    full, knn = [], []
    for _ in range(args.repeats):
        full.append(time_command([*cmd, "full"])[0])
        knn.append(time_command([*cmd, "knn"])[0])
    out = {"knn_first": first, "full": statistics.median(full), "knn": statistics.median(knn)}
    print(f"  --pool full {out['full']:.2f} s, --pool knn {out['knn']:.2f} s (ratio {out['knn'] / out['full']:.2f}; "
          f"the first knn round, building the index: {first:.1f} s), {args.repeats} interleaved runs", flush=True)
    return out


def split_round(project: Path, n: int) -> dict[str, float]:
    """One round in this process, timed by part (wrapping the learner's fit and scoring)."""
    from raresift import Project
    from raresift.learn.session import Session

    parts = {"training": 0.0, "scoring": 0.0}
    real_fit, real_logits = Session.fit, Session.logits

    def timed(real, name):
        def run(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return real(self, *a, **k)
            finally:
                parts[name] += time.perf_counter() - t0
        return run

    Session.fit, Session.logits = timed(real_fit, "training"), timed(real_logits, "scoring")
    try:
        t0 = time.perf_counter()
        with Project(project) as p:
            batch = p.next(n, seed=0)
        total = time.perf_counter() - t0
    finally:
        Session.fit, Session.logits = real_fit, real_logits
    if len(batch) != n:
        raise RuntimeError(f"next returned {len(batch)} photos, expected {n}")
    parts["selection"] = total - parts["training"] - parts["scoring"]
    return parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--workdir", type=Path, default=Path("/work/devdata/round-latency"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--clean", action="store_true", help="delete the projects afterwards")
    ap.add_argument("--pools", action="store_true",
                    help="also time `next --pool knn` against `--pool full` (interleaved) at every size")
    ap.add_argument("--split", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one timed round
    ap.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                    help="the src/ folder of another raresift (e.g. a git worktree of an older commit): its "
                    "`next` is timed on the same project, interleaved with this one's, and the ratio printed")
    args = ap.parse_args(argv)
    if args.split is not None:
        print(json.dumps(split_round(args.split, args.n)))
        return 0

    print(f"load average {os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} usable CPUs", flush=True)
    rows = []
    pools: dict[int, dict[str, float]] = {}
    for size in args.sizes:
        project = make_project(args.workdir, size)
        # The first round after the vectors change writes the features cache (signed square roots,
        # float32) and the row norms beside the vectors; later rounds only read them. Dropped here so
        # that "first round" is always that one, as after `raresift init --embeddings`.
        for cache in [*(project / "embeddings").glob("sqrt*.npy")]:
            cache.unlink()
        warm(project, "vectors.npy")
        first, out = time_command([*raresift_cmd(), "next", str(project), "--n", str(args.n), "--json"])
        assert out.count('"path"') == args.n, out[:200]
        warm(project, "sqrt*.npy")
        startup = statistics.median(time_command([*raresift_cmd(), "--version"])[0] for _ in range(3))
        walls = []
        for _ in range(args.repeats):
            wall, out = time_command([*raresift_cmd(), "next", str(project), "--n", str(args.n), "--json"])
            assert out.count('"path"') == args.n, out[:200]
            walls.append(wall)
        # In a fresh process, so imports are paid inside the round as they are by the command.
        _, out = time_command([sys.executable, __file__, "--split", str(project), "--n", str(args.n)])
        parts = json.loads(out.strip().splitlines()[-1])
        rows.append((f"{size:,}", statistics.median(walls), min(walls), first, startup, parts))
        print(f"  {size:>9,}: median {rows[-1][1]:.2f} s over {args.repeats} runs (first round {first:.2f} s)",
              flush=True)
        if args.baseline_src is not None:
            compare(project, args)
        if args.pools:
            pools[size] = compare_pools(project, args)
        if args.clean:
            shutil.rmtree(project, ignore_errors=True)
    print()
    print(f"`raresift next --n {args.n} --json`, {N_LABELS} labels, {DIM}-d float32 vectors, warm page cache")
    print()
    print("| photos | whole command (median) | best | first round | start-up | training | scoring | selection + rest |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, med, best, first, startup, p in rows:
        inproc = p["training"] + p["scoring"] + p["selection"]
        share = {k: v / (inproc + startup) for k, v in p.items()}
        print(f"| {size} | {med:.2f} s | {best:.2f} s | {first:.2f} s | {startup:.2f} s "
              f"({startup / (inproc + startup):.0%}) | {p['training']:.2f} s ({share['training']:.0%}) | "
              f"{p['scoring']:.2f} s ({share['scoring']:.0%}) | {p['selection']:.2f} s ({share['selection']:.0%}) |")
    if pools:
        print()
        print("| photos | `--pool full` | `--pool knn` | knn / full | first knn round (builds the index) |")
        print("|---:|---:|---:|---:|---:|")
        for size, v in pools.items():
            print(f"| {size:,} | {v['full']:.2f} s | {v['knn']:.2f} s | {v['knn'] / v['full']:.2f} | {v['knn_first']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
