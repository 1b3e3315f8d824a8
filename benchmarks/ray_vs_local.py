"""Do the local engine and `embed --engine ray` compute the same vectors? The same photos embedded both ways.

Copies the first ``--n`` photos of a folder (default: 200 of the flower photos, both subfolders),
registers them in two projects, runs `raresift embed` (default model and tiles) once locally and once
with ``--engine ray`` (a local Ray), and prints the minimum cosine between the two engines' vectors,
per view, and the share of photos whose vectors are bit for bit equal. Usage::

    python benchmarks/ray_vs_local.py [--images DIR] [--n 200] [--workdir /tmp/ray-vs-local]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FLOWERS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flowers-daisy-dandelion"


def main(argv: list[str] | None = None) -> int:
    from raresift import Project
    from raresift.cli import main as raresift

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=FLOWERS)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ray-vs-local"))
    args = ap.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    photos = args.workdir / "photos"
    photos.mkdir(parents=True)
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    subfolders = sorted({f.parent for f in files})
    per = max(1, args.n // max(1, len(subfolders)))
    chosen = [f for d in subfolders for f in [g for g in files if g.parent == d][:per]][: args.n]
    for f in chosen:
        shutil.copy2(f, photos / f"{f.parent.name}__{f.name}")
    with Project.create(args.workdir / "local", images=photos) as p:
        p.add_images()
    shutil.copytree(args.workdir / "local", args.workdir / "ray")
    times = {}
    for name, extra in (("local", []), ("ray", ["--engine", "ray"])):
        t0 = time.perf_counter()
        if raresift(["embed", str(args.workdir / name), "--no-progress", *extra]) != 0:
            return 1
        times[name] = time.perf_counter() - t0
    with Project(args.workdir / "local") as a, Project(args.workdir / "ray") as b:
        info = a.embedding_info()
        x, y = np.asarray(a.vectors(), np.float32), np.asarray(b.vectors(), np.float32)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    print(f"{len(chosen)} photos, {info['model']}, {info['views']} views each; local {times['local']:.0f} s, "
          f"ray {times['ray']:.0f} s")
    print(f"min cosine local vs ray: all views {cos.min():.7f}, whole photo {cos[:, 0].min():.7f}"
          + (f", tiles {cos[:, 1:].min():.7f}" if cos.shape[1] > 1 else ""))
    print(f"photos with bit-for-bit equal vectors: {(x == y).all(axis=(1, 2)).mean():.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
