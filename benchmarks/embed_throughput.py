"""Embedding throughput, side by side in one run on the same photos.

Prints images/s for:

* ``raresift embed --tiles 0``: the whole command (process start, model load, decode, model, saving),
  timed from outside as a user would;
* the eager-PyTorch loop a user would write with the same model: PIL open + convert + resize to the
  model's size (224 px for Lite0, 260 for Lite2),
  normalise in numpy/torch, ``EfficientNet.from_pretrained(...)`` forward, batch 32;
* the model alone on pre-decoded uint8 tensors (ONNX Runtime, the same session settings as
  ``raresift embed``): the limit for the whole command;
* ``raresift embed --tiles 2`` and ``--tiles 3`` (5 and 10 model inputs per photo).

Every figure is the median of ``--repeats`` runs, interleaved so that slow phases of a shared
machine hit all of them alike. Usage::

    python benchmarks/embed_throughput.py [--photos DIR] [--repeats 2] [--eager-limit N] [--model NAME]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_PHOTOS = HERE.parent.parent / "shared" / "datasets" / "flowers-daisy-dandelion"
EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTS and p.is_file())


def warm_cache(paths: list[Path]) -> None:
    for p in paths:
        p.read_bytes()


def raresift_cmd() -> list[str]:
    exe = shutil.which("raresift", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "raresift"]


def time_embed_command(photos: Path, work: Path, tiles: int, limit: int | None, model: str) -> tuple[float, int]:
    """Wall time of `raresift embed` as a whole process, on a freshly registered project."""
    project = work / f"p{tiles}-{time.monotonic_ns()}"
    subprocess.run([*raresift_cmd(), "init", str(project), "--images", str(photos), "--test-fraction", "0"],
                   check=True, capture_output=True)
    cmd = [*raresift_cmd(), "embed", str(project), "--tiles", str(tiles), "--model", model, "--no-progress"]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    from raresift import Project

    with Project.open(project) as p:
        n = p.status()["embedded"]
    shutil.rmtree(project, ignore_errors=True)
    return wall, n


def eager_pytorch(paths: list[Path], model_name: str, batch: int = 32) -> tuple[float, float]:
    """The loop a user would write. Returns (seconds for the loop, seconds to load the model)."""
    import contextlib
    import importlib
    import io

    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    from raresift.embed.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS[model_name]
    weights = getattr(importlib.import_module(spec.weights_module), spec.weights_class).get_model_file_path()
    size = spec.size

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(model_name, weights_path=weights)
    model.eval()
    load = time.perf_counter() - t0
    feats = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(paths), batch):
            arrays = []
            for p in paths[start : start + batch]:
                im = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32))
            x = (np.stack(arrays) - 127.0) / 128.0
            x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
            feats.append(model.extract_features(x).mean((2, 3)).numpy())
    return time.perf_counter() - t0, load


def predecode(paths: list[Path], size: int) -> np.ndarray:
    from raresift.embed.decode import Views, load_views

    views = Views(size=size)
    return np.concatenate([load_views(p, views) for p in paths])


def model_only(images: np.ndarray, model_name: str, batch: int = 32) -> float:
    """Seconds for the ONNX Runtime model (same settings as `raresift embed`) over pre-decoded tensors."""
    from raresift.embed.models import load_model

    model = load_model(model_name)
    model(images[:batch])  # first run allocates
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        model(images[start : start + batch])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eager-limit", type=int, default=None, help="photos for the eager loop (default: all)")
    ap.add_argument("--tiles", type=int, nargs="*", default=[2, 3], help="tile modes to report besides 0")
    ap.add_argument("--tile-limit", type=int, default=None, help="photos for the tile modes (default: all)")
    ap.add_argument("--model", default=None, help="built-in model (default: raresift's default model)")
    args = ap.parse_args(argv)
    from raresift.embed.models import BUILTIN_MODELS, DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL
    size = BUILTIN_MODELS[model].size

    paths = list_photos(args.photos)
    if not paths:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 2
    warm_cache(paths)
    print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    eager_paths = paths[: args.eager_limit] if args.eager_limit else paths
    print(f"{len(paths)} photos under {args.photos}; {os.cpu_count()} CPUs visible, "
          f"{len(os.sched_getaffinity(0))} usable; model {model}", flush=True)
    images = predecode(paths, size)

    rates: dict[str, list[float]] = {"model": [], "embed0": [], "eager": [], "eager_total": []}
    with tempfile.TemporaryDirectory(prefix="raresift-bench-") as tmp:
        work = Path(tmp)
        for r in range(args.repeats):
            rates["model"].append(len(images) / model_only(images, model))
            wall, n = time_embed_command(args.photos, work, 0, None, model)
            rates["embed0"].append(n / wall)
            loop, load = eager_pytorch(eager_paths, model)
            rates["eager"].append(len(eager_paths) / loop)
            rates["eager_total"].append(len(eager_paths) / (loop + load))
            print(f"  repeat {r + 1}: model-only {rates['model'][-1]:.1f}/s, raresift embed --tiles 0 "
                  f"{rates['embed0'][-1]:.1f}/s, eager PyTorch {rates['eager'][-1]:.1f}/s", flush=True)
        tile_rates = {}
        for t in args.tiles:
            wall, n = time_embed_command(args.photos, work, t, args.tile_limit, model)
            tile_rates[t] = n / wall
    med = {k: statistics.median(v) for k, v in rates.items()}
    print()
    print("| what | images/s | vs eager PyTorch | vs model only |")
    print("|---|---:|---:|---:|")
    print(f"| model only, ONNX Runtime on pre-decoded tensors (limit) | {med['model']:.1f} | "
          f"{med['model'] / med['eager']:.1f}x | 1.00 |")
    print(f"| `raresift embed --tiles 0` (whole command) | {med['embed0']:.1f} | "
          f"**{med['embed0'] / med['eager']:.1f}x** | **{med['embed0'] / med['model']:.2f}** |")
    print(f"| eager-PyTorch loop (loop only, model load not counted) | {med['eager']:.1f} | 1.0x | "
          f"{med['eager'] / med['model']:.2f} |")
    print(f"| eager-PyTorch loop incl. model load | {med['eager_total']:.1f} | "
          f"{med['eager_total'] / med['eager']:.2f}x | {med['eager_total'] / med['model']:.2f} |")
    for t, rate in tile_rates.items():
        views = 1 + t * t
        print(f"| `raresift embed --tiles {t}` ({views} views/photo) | {rate:.1f} | "
              f"{rate / med['eager']:.1f}x | {rate * views / med['model']:.2f} (model inputs/s vs limit) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
