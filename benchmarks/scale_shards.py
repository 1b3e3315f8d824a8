"""Collections of 10^5..10^7 imported vectors from shards: init time, a round's time, peak memory, disk.

For each size: writes ``--shards`` ``.npy`` shards of float16 vectors (``--dim``, default 512) with
their ids (a planted rare class: 0.1% of the rows share a direction), then times, as whole commands
in fresh processes:

* ``raresift init P --embeddings SHARDS/`` (streamed; from ``pool_auto_min`` photos on it also builds
  the FAISS index of the knn pools);
* ``raresift import-labels P labels.csv`` (200 labels: 20 of the rare class, 180 others);
* ``raresift next P --n 100 --json`` (the default ``--pool auto``), the first round, then ``--repeats``
  rounds each after the previous batch is answered from the planted key (``import-labels``): every
  round then searches the neighbours of 100 new labels, as in a real session.

Peak memory: the largest resident set of the command's process (``ru_maxrss`` of the child). Disk:
the vector file and everything else the project keeps beside it (index, caches), as a share of it.

Usage:
    python benchmarks/scale_shards.py --work /work/devdata/scale --sizes 100000 1000000 10000000
    python benchmarks/scale_shards.py --work /work/devdata/scale --sizes 10000000 --reuse   # same project again
    python benchmarks/scale_shards.py --work /work/devdata/scale --sizes 10000000 --reuse --concept c2  # 200 labels again
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


def planted(n: int, dim: int, seed: int = 0) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """The generator (after the draws), the rare class's direction and its rows."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    rare = np.sort(rng.choice(n, size=max(20, n // 1000), replace=False))
    return rng, direction, rare


def write_shards(folder: Path, n: int, dim: int, shards: int, seed: int = 0) -> np.ndarray:
    """The shards of ``n`` float16 vectors; returns the rows of the planted rare class."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, direction, rare = planted(n, dim, seed)
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    for k in range(shards):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        out = np.lib.format.open_memmap(folder / f"part-{k:04d}.npy", mode="w+", dtype=np.float16, shape=(hi - lo, dim))
        for start in range(lo, hi, 262144):
            stop = min(hi, start + 262144)
            block = np.abs(rng.normal(size=(stop - start, dim))).astype(np.float32)
            hit = rare[(rare >= start) & (rare < stop)] - start
            block[hit] += 4.0 * np.abs(direction)
            out[start - lo : stop - lo] = block
        out.flush()
        del out
        with open(folder / f"part-{k:04d}.txt", "w") as fh:
            fh.writelines(f"s3://bucket/img/{i:09d}.jpg\n" for i in range(lo, hi))
    return rare


_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "sys.stderr.write('\\nmaxrss %d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
         "sys.exit(r.returncode)")


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak resident MB, stdout) of a command, run under a fresh wrapper process whose only child
    it is (``ru_maxrss`` of its children is then this command's own peak)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {done.stderr[-2000:]}")
    peak_kb = int(done.stderr.rsplit("maxrss", 1)[1].split()[0])
    return wall, peak_kb / 1024, done.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the shards and projects")
    ap.add_argument("--reuse", action="store_true",
                    help="use the project WORK/p-N made by an earlier run (skip writing the shards and init)")
    ap.add_argument("--concept", default=None,
                    help="label under this concept (a fresh one: 200 labels, as in a new project); with --reuse "
                         "the cached neighbour lists of earlier labels are removed first, so the first round "
                         "searches the neighbours of its 200 labels as a new project's would")
    ap.add_argument("--warm", action="store_true",
                    help="read the project's vector and index files once before its rounds (a warm page cache: "
                         "rounds re-rank with scattered reads of the vector file, 40,000 of which take 7-12 s from disk)")
    args = ap.parse_args(argv)
    concept = ["--concept", args.concept] if args.concept else []
    raresift = [sys.executable, "-m", "raresift"]
    print(f"load average {os.getloadavg()[0]:.1f}; {args.dim}-d float16 vectors in {args.shards} .npy shards\n", flush=True)
    rows = []
    for n in args.sizes:
        folder = args.work / f"shards-{n}"
        project = args.work / f"p-{n}"
        if args.reuse and (project / "raresift.sqlite").is_file():
            rare = planted(n, args.dim)[2]
            gen = init_s = init_mb = float("nan")
            if args.concept:
                (project / "embeddings" / "index-knn.npz").unlink(missing_ok=True)
        else:
            shutil.rmtree(project, ignore_errors=True)
            t0 = time.perf_counter()
            rare = write_shards(folder, n, args.dim, args.shards)
            gen = time.perf_counter() - t0
            init_s, init_mb, _ = timed([*raresift, "init", str(project), "--embeddings", str(folder)])
        if args.warm:
            for path in (project / "embeddings" / "vectors.npy", project / "embeddings" / "index.faiss"):
                with open(path, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
        rng = np.random.default_rng(1)
        others = rng.choice(np.setdiff1d(np.arange(n), rare), size=180, replace=False)
        labels = project.parent / f"labels-{n}.csv"
        labels.write_text("path,label\n" + "".join(f"s3://bucket/img/{i:09d}.jpg,1\n" for i in rare[:20])
                          + "".join(f"s3://bucket/img/{i:09d}.jpg,0\n" for i in others))
        lab_s, lab_mb, _ = timed([*raresift, "import-labels", str(project), str(labels), *concept])
        first, first_mb, out = timed([*raresift, "next", str(project), "--n", "100", "--json", *concept])
        assert out.count('"path"') == 100, out[:300]
        rare_set = set(rare.tolist())
        walls, mbs = [], []
        for r in range(args.repeats):
            # The person answers the batch (from the planted key); the next round then searches the
            # neighbours of 100 new labels, as every round of a real session does.
            answers = project.parent / f"answers-{n}-{r}.csv"
            answers.write_text("path,label\n" + "".join(f"{item['path']},{int(item['image_id'] - 1 in rare_set)}\n"
                                                        for item in json.loads(out)))
            timed([*raresift, "import-labels", str(project), str(answers), *concept])
            w, mb, out = timed([*raresift, "next", str(project), "--n", "100", "--json", *concept])
            walls.append(w)
            mbs.append(mb)
            print(f"    round after 100 new labels: {w:.2f} s, peak {mb:,.0f} MB", flush=True)
        found = sum(1 for i in rare if f"{i:09d}.jpg" in out)
        emb = project / "embeddings"
        vec_bytes = (emb / "vectors.npy").stat().st_size
        other = sum(p.stat().st_size for p in emb.rglob("*") if p.is_file() and p.name != "vectors.npy")
        rows.append((n, gen, init_s, init_mb, lab_s, first, statistics.median(walls), max([first_mb, *mbs]),
                     vec_bytes, other, found))
        print(f"  {n:>11,}: init {init_s:.1f} s ({init_mb:.0f} MB), next first {first:.2f} s, median "
              f"{statistics.median(walls):.2f} s, peak {max([first_mb, *mbs]):.0f} MB, disk beside the vectors "
              f"{other / vec_bytes:.2f}x", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print()
    print("| photos | writing the shards | `init --embeddings DIR` | its peak memory | `import-labels` (200) | "
          "first `next --n 100` | next ones, each after 100 new labels (median) | peak memory of `next` | vectors | index + caches | "
          "rare photos in the last batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, gen, init_s, init_mb, lab_s, first, med, next_mb, vec_bytes, other, found in rows:
        print(f"| {n:,} | {gen:.0f} s | {init_s:.1f} s | {init_mb:,.0f} MB | {lab_s:.1f} s | {first:.2f} s | {med:.2f} s | "
              f"{next_mb:,.0f} MB | {vec_bytes / 2**30:.2f} GiB | {other / 2**30:.2f} GiB ({other / vec_bytes:.2f}x) | "
              f"{found} of 100 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
