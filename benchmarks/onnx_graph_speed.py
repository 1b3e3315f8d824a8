"""ONNX Runtime speed of the built-in model's graph: built by raresift.embed.lite_onnx vs exported by torch.

Side by side in one run, on the same pre-decoded uint8 batch and with the same session settings as
``raresift embed`` (``raresift.embed.runtime.onnx_session``):

* ``built``: the graph written by ``lite_onnx.export_builtin`` (no PyTorch; what raresift runs now);
* ``torch-exported``: the graph ``torch.onnx.export`` wrote from the eager model (what raresift ran
  before, ``_EXPORT_VERSION`` 2; needs PyTorch and ``efficientnet-lite-pytorch``).

Prints the time to make each file, how well the two graphs' outputs agree, images/s of each (median
of ``--repeats`` timings, each of ``--runs`` batches; the two graphs alternate batch by batch so that
slow phases of a shared machine hit both alike) and their ratio, the same per CPU-second of the
process (steadier where other work shares the cores; ``--threads 1`` makes it free of thread-pool
spinning), and the node counts of both graphs. Usage::

    python benchmarks/onnx_graph_speed.py [--model efficientnet-lite2] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_PHOTOS = HERE.parent.parent / "shared" / "datasets" / "flowers-daisy-dandelion"


def photo_batch(size: int, batch: int, photos: Path) -> tuple[np.ndarray, str]:
    """``batch`` photos decoded and centre-cropped to ``size`` px, as ``raresift embed`` feeds the model."""
    from raresift.embed.decode import Views, load_views

    files = sorted(p for p in photos.rglob("*.jpg")) if photos.is_dir() else []
    source = f"{photos} ({len(files)} photos, every {max(1, len(files) // batch)}th)"
    if not files:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        files = [data / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")]
        source = "scikit-image sample photos, repeated"
    files = files[:: max(1, len(files) // batch)]
    files = (files * batch)[:batch]
    return np.concatenate([load_views(p, Views(size, 0, "crop")) for p in files]), source


def torch_export(name: str, path: Path, size: int) -> None:
    """The old export: models._torch_module through torch.onnx.export (TorchScript exporter, opset 17)."""
    import torch

    from raresift.embed.models import _torch_module

    module, _ = _torch_module(name)
    sample = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample,),
            str(path),
            input_names=["image"],
            output_names=["features", "logits"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def timings(sessions: dict, x: np.ndarray, repeats: int, runs: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images/s of each session, ``repeats`` times; each timing sums ``runs`` batches, and the graphs
    alternate batch by batch (the first one swapping each round), so a busy spell slows both alike.

    Returns (images per wall-clock second, images per CPU-second of this process). On a machine that
    other work keeps busy the second is the steadier measure of what each graph costs.
    """
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(repeats):
        spent = dict.fromkeys(sessions, 0.0)
        spent_cpu = dict.fromkeys(sessions, 0.0)
        for j in range(runs):
            order = list(sessions) if (r + j) % 2 == 0 else list(sessions)[::-1]
            for k in order:
                start, start_cpu = time.perf_counter(), time.process_time()
                sessions[k].run(["features", "logits"], {"image": x})
                spent[k] += time.perf_counter() - start
                spent_cpu[k] += time.process_time() - start_cpu
        for k in sessions:
            wall[k].append(runs * len(x) / spent[k])
            cpu[k].append(runs * len(x) / spent_cpu[k])
    return wall, cpu


def report(label: str, rates: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:>15}: {med[k]:7.1f} {label}  (timings {', '.join(f'{r:.1f}' for r in v)})")
    per_round = [b / t for b, t in zip(rates["built"], rates["torch-exported"])]
    print(f"ratio built / torch-exported, {label}: {med['built'] / med['torch-exported']:.3f} "
          f"(per timing: {', '.join(f'{r:.3f}' for r in per_round)})")


def main() -> None:
    from raresift.embed import lite_onnx
    from raresift.embed.models import BUILTIN_MODELS
    from raresift.embed.runtime import default_threads
    from raresift.embed.runtime import onnx_session as _session

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet-lite2", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timings per graph; the median is reported")
    ap.add_argument("--runs", type=int, default=3, help="batches per timing")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    ap.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    args = ap.parse_args()
    threads = args.threads or default_threads()
    size = BUILTIN_MODELS[args.model].size

    x, source = photo_batch(size, args.batch, args.photos)
    print(f"model {args.model}, {size} px, batch {len(x)} from {source}; {threads} threads; "
          f"median of {args.repeats} timings x {args.runs} batches; load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        built_path, torch_path = Path(tmp) / "built.onnx", Path(tmp) / "torch.onnx"
        t = time.perf_counter()
        lite_onnx.export_builtin(args.model, built_path)
        built_s = time.perf_counter() - t
        t = time.perf_counter()
        torch_export(args.model, torch_path, size)
        torch_s = time.perf_counter() - t
        print(f"make the file: built {built_s:.2f} s (no torch), torch-exported {torch_s:.2f} s "
              f"(torch import + model load + export)")
        sessions = {"built": _session(built_path, threads), "torch-exported": _session(torch_path, threads)}

        outs = {k: s.run(["features", "logits"], {"image": x}) for k, s in sessions.items()}  # also warms up
        for i, what in enumerate(("features", "logits")):
            a, b = outs["built"][i].astype(np.float64), outs["torch-exported"][i].astype(np.float64)
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            print(f"agreement, {what}: cosine min {cos.min():.7f} max {cos.max():.7f}, "
                  f"max |difference| {np.abs(a - b).max():.2e}")

        rates, cpu_rates = timings(sessions, x, args.repeats, args.runs)
        report("images/s", rates)
        report("images per CPU-second", cpu_rates)
        print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
        ops = {k: _op_counts(p) for k, p in (("built", built_path), ("torch-exported", torch_path))}
        for k, c in ops.items():
            print(f"{k:>15} graph: {sum(c.values())} nodes ({', '.join(f'{op} {n}' for op, n in sorted(c.items()))})")
    sys.stdout.flush()


def _op_counts(path: Path) -> dict[str, int]:
    import collections

    import onnx

    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


if __name__ == "__main__":
    main()
