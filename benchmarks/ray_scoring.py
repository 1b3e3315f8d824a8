"""Ray Data jobs over a project's vectors against the local engine, side by side on one project.

For a project made by ``raresift init --embeddings`` (e.g. by ``benchmarks/scale_shards.py``) with labels,
runs as whole commands in fresh processes, interleaved ``--repeats`` times on copies of the project:

* ``raresift next P --n 100 --pool full --seed S --json`` with ``--engine local`` and ``--engine ray`` (a
  local Ray started by the command: the cost a one-machine user pays) and checks that both pick the same
  photos;
* ``raresift index P --rebuild --json`` with both engines (``--kind``, default auto) and checks that both
  indexes return the same neighbours for 200 photos.

Prints each command's median time and the ray / local ratio.

Usage:
    python benchmarks/ray_scoring.py --project /work/devdata/scale/p-1000000 --work /tmp/rayscore
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def run(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"raresift {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def copy_project(source: Path, target: Path) -> Path:
    """A copy that shares the (read-only) vector file by a hard link; index and caches are dropped."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(source / "raresift.sqlite", target / "raresift.sqlite")
    (target / "learn").mkdir()
    (target / "embeddings").mkdir()
    for f in (source / "embeddings").iterdir():
        if f.name.startswith("vectors") or f.name.startswith("logits") or f.name.startswith("sqrt"):
            (target / "embeddings" / f.name).hardlink_to(f)
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kind", default="auto")
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {k: [] for k in ("next local", "next ray", "index local", "index ray")}
    same_picks = []
    for r in range(args.repeats):
        picks = {}
        for engine in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
            p = copy_project(args.project, args.work / f"next-{engine}")
            seconds, out = run("next", str(p), "--n", "100", "--pool", "full", "--seed", str(100 + r), "--json",
                               "--engine", engine)
            times[f"next {engine}"].append(seconds)
            picks[engine] = [item["image_id"] for item in json.loads(out)]
        same_picks.append(picks["local"] == picks["ray"])
        print(f"repeat {r}: next local {times['next local'][-1]:.2f} s, ray {times['next ray'][-1]:.2f} s, "
              f"same picks: {same_picks[-1]}", flush=True)
    if not args.skip_index:
        results = {}
        for r in range(args.repeats):
            for engine in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
                p = args.work / f"next-{engine}"
                seconds, out = run("index", str(p), "--rebuild", "--kind", args.kind, "--engine", engine, "--json")
                times[f"index {engine}"].append(seconds)
                results[engine] = json.loads(out)
            print(f"repeat {r}: index local {times['index local'][-1]:.1f} s, ray {times['index ray'][-1]:.1f} s",
                  flush=True)
        from raresift.index import VectorIndex

        local = VectorIndex.load(args.work / "next-local" / "embeddings" / "index.faiss")
        remote = VectorIndex.load(args.work / "next-ray" / "embeddings" / "index.faiss")
        vectors = np.load(args.work / "next-local" / "embeddings" / "vectors.npy", mmap_mode="r")
        queries = np.asarray(vectors[:: max(1, len(vectors) // 200), 0, :][:200], dtype=np.float32)
        same_index = np.array_equal(local.search(queries, 20)[1], remote.search(queries, 20)[1])
        print(f"index: {results['local']['kind']}, {results['local']['photos']:,} photos; "
              f"same neighbours for 200 photos: {same_index}")
    print("\n| command | local (median) | ray (median) | ray / local |")
    print("|---|---:|---:|---:|")
    for what in ("next", "index"):
        if times[f"{what} local"]:
            lo, ra = statistics.median(times[f"{what} local"]), statistics.median(times[f"{what} ray"])
            print(f"| `{what}` | {lo:.2f} s | {ra:.2f} s | {ra / lo:.2f}x |")
    print(f"same picks in every repeat: {all(same_picks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
