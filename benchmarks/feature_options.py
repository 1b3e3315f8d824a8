"""Which photo features raise the quality ceiling of rare-class search? Pooling, tile layouts, models.

Embeds the flower photos once per view layout with the built-in models through ONNX Runtime (the
graph with a ``feature_map`` output) and keeps, for every photo and view, the mean-pooled vector
(what raresift stores today), the spatial max, GeM (p = 3) and the mean of the 4 largest cells of
the final feature map, and the ImageNet logits (float16 ``.npy`` under ``--cache``; re-runs reuse
them). Then builds candidate features from those arrays and measures each against the answer key
on the same random 40% test splits (``np.random.default_rng(seed).permutation``, seeds 0..):

* ceiling: ``RareHead()`` trained on every photo of the pool split, precision@50 (and average
  precision) on the test split; also a multiple-instance head (a photo scores its best tile), alone
  and blended with the photo head, for the ceiling only (the workflow's learner takes one vector per photo);
* workflow: ``raresift.simulate.replay(..., protocol="default")`` with the text prior of
  "insect or spider" (from the logits of all the option's views), precision@50 at 25/50/100/200 labels;
* cost: model runs per photo, and photos/s of the option's whole embedding pipeline (decode, views,
  model, pooling) on this machine, median of 3 runs on the same 64 photos.

Layouts embedded: Lite2 whole + 3x3 (today), whole + 2x2, whole + 4x4, whole photo squeezed to 520 px
(a graph built here at that size), and Lite0 whole + 3x3. Options: A today's feature; B-D and x1-x5
other poolings of the 3x3 tiles; E/F 2x2 + 3x3 tiles; G/G' Lite2 + Lite0; H/H' 4x4 tiles; S/S' the
520-px whole photo; M/M+ the multiple-instance head. F, G', H', S' and M+ use the best of B, C, D, D'
by ceiling (the script picks it).

Usage::

    python benchmarks/feature_options.py [--quick] [--cache /work/devdata/features]
        [--images ../shared/datasets/flowers-daisy-dandelion] [--truth benchmarks/data/flowers_insects.csv]

``--quick`` measures 3 splits instead of 10. Threads: 2 (ONNX Runtime and BLAS). Results also go to
``CACHE/results.json``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse
import csv
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "datasets" / "flowers-daisy-dandelion"
DEFAULT_TRUTH = HERE / "data" / "flowers_insects.csv"
DEFAULT_CACHE = Path("/work/devdata/features")
THREADS = 2
QUERY = "insect or spider"
POOLS = ("mean", "smax", "gem", "top4")  # per view: spatial pooling of the final feature map
CHUNK = 128  # photos per saved chunk while embedding (an interrupted run resumes)
MODEL_CALL = 64  # most 260-px inputs per model call, as raresift embed (fewer at a larger side: same pixels)


def per_call(views: int, side: int) -> int:
    """Photos per model call for ``views`` inputs of ``side`` px each: ONNX Runtime's memory arena grows
    with the largest call, by gigabytes at 64 inputs of 520 px."""
    return max(1, min(MODEL_CALL, int(MODEL_CALL * (260 / side) ** 2)) // views)
LITE2, LITE0 = "efficientnet-lite2", "efficientnet-lite0"


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One embedding pass: a model and how each photo is cut into views."""

    key: str  # cache folder name
    model: str
    tiles: int
    resize: str = "crop"
    size: int | None = None  # input side; None = the built-in model's own (a custom size builds its own graph)

    @property
    def side(self) -> int:
        from raresift.embed.lite_onnx import BUILTIN_MODELS

        return self.size or BUILTIN_MODELS[self.model].size

    @property
    def views(self):
        from raresift.embed.decode import Views

        return Views(self.side, self.tiles, resize=self.resize)


LAYOUTS = {
    "lite2-t3": Layout("lite2-t3", LITE2, 3),  # today: whole + 3x3
    "lite0-t3": Layout("lite0-t3", LITE0, 3),  # for the Lite0 + Lite2 ensemble
    "lite2-t2": Layout("lite2-t2", LITE2, 2),  # its tiles join the 3x3 ones: whole + 2x2 + 3x3
    "lite2-s520": Layout("lite2-s520", LITE2, 0, "squeeze", 520),  # whole photo at twice the side (extra)
    "lite2-t4": Layout("lite2-t4", LITE2, 4),  # reference: whole + 4x4
}


def graph_path(cache: Path, model: str, side: int, feature_map: bool) -> Path:
    """The ONNX file: the package's own export for the built-in size, else one built here at ``side``."""
    from raresift.embed import lite_onnx
    from raresift.embed.models import exported_onnx_path

    if side == lite_onnx.BUILTIN_MODELS[model].size:
        return exported_onnx_path(model, feature_map=feature_map)
    target = cache / "models" / f"{model}-{side}{'-fmap' if feature_map else ''}.onnx"
    if not target.is_file():
        import onnx

        target.parent.mkdir(parents=True, exist_ok=True)
        proto = lite_onnx.build_model(lite_onnx.read_torch_weights(lite_onnx.weights_file(model)), model,
                                      size=side, feature_map=feature_map)
        tmp = target.with_suffix(".tmp")
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, target)
    return target


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def pool_map(fmap: np.ndarray) -> dict[str, np.ndarray]:
    """Spatial poolings of a (B, C, h, w) feature map, each (B, C) float32."""
    f = fmap.reshape(fmap.shape[0], fmap.shape[1], -1)
    pos = np.clip(f, 0, None)
    return {
        "smax": f.max(axis=2),
        "gem": np.cbrt((pos**3).mean(axis=2)),
        "top4": -np.partition(-f, 3, axis=2)[:, :, :4].mean(axis=2),
    }


def run_views(sess, batch: np.ndarray, *, feature_map: bool) -> dict[str, np.ndarray]:
    """One model call on (V, s, s, 3) uint8 views: mean vector and logits (and the map's poolings)."""
    names = ["features", "logits"] + (["feature_map"] if feature_map else [])
    out = sess.run(names, {"image": np.ascontiguousarray(batch)})
    res = {"mean": out[0], "logits": out[1]}
    if feature_map:
        res.update(pool_map(out[2]))
    return res


def embed_layout(layout: Layout, paths: list[Path], cache: Path, log) -> dict[str, np.ndarray]:
    """Every pooled view vector of every photo for one layout, from the cache or embedded now."""
    from raresift.embed.decode import load_views

    folder = cache / layout.key
    final = {name: folder / f"{name}.npy" for name in (*POOLS, "logits")}
    if all(p.is_file() for p in final.values()):
        meta = json.loads((folder / "meta.json").read_text())
        if meta["paths"] != [str(p) for p in paths]:
            sys.exit(f"{folder} holds other photos; delete it to re-embed")
        return {name: np.load(p, mmap_mode="r") for name, p in final.items()}
    folder.mkdir(parents=True, exist_ok=True)
    sess = session(graph_path(cache, layout.model, layout.side, feature_map=True))
    views = layout.views
    t0 = time.time()
    with ThreadPoolExecutor(1) as decoder:  # decode the next photo while the model runs
        for start in range(0, len(paths), CHUNK):
            part = folder / f"chunk{start:06d}.npz"
            if part.is_file():
                continue
            chunk = paths[start : start + CHUNK]
            acc: dict[str, list[np.ndarray]] = {}
            step = per_call(views.count, views.size)
            futures = [decoder.submit(load_views, p, views) for p in chunk]
            for i in range(0, len(chunk), step):
                batch = np.concatenate([f.result() for f in futures[i : i + step]])
                res = run_views(sess, batch, feature_map=True)
                for name, arr in res.items():
                    acc.setdefault(name, []).append(arr.reshape(-1, views.count, arr.shape[-1]).astype(np.float16))
            tmp = part.with_suffix(".tmp.npz")
            np.savez(tmp, **{name: np.concatenate(v) for name, v in acc.items()})
            os.replace(tmp, part)
            done = min(start + CHUNK, len(paths))
            log(f"  {layout.key}: {done}/{len(paths)} photos, {time.time() - t0:.0f} s")
    chunks = [np.load(folder / f"chunk{s:06d}.npz") for s in range(0, len(paths), CHUNK)]
    for name, p in final.items():
        np.save(p, np.concatenate([c[name] for c in chunks]))
    (folder / "meta.json").write_text(json.dumps({
        "model": layout.model, "tiles": layout.tiles, "resize": layout.resize, "side": layout.side,
        "views": views.count, "embed_seconds_this_run": round(time.time() - t0, 1),
        "paths": [str(p) for p in paths]}, indent=1))
    for s in range(0, len(paths), CHUNK):
        (folder / f"chunk{s:06d}.npz").unlink()
    return {name: np.load(p, mmap_mode="r") for name, p in final.items()}


def load_key(truth: Path, images: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Photos (sorted), labels, and the key's ``unsure`` flags (all False when the column is absent)."""
    with open(truth, newline="", encoding="utf-8-sig") as fh:
        rows = {r["path"]: (int(r["label"]), r.get("unsure", "0").strip() == "1") for r in csv.DictReader(fh)}
    names = sorted(rows)
    paths = [images / p for p in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"{len(missing)} photos of the answer key are missing under {images}, e.g. {missing[0]}")
    y = np.array([rows[p][0] for p in names], dtype=np.int64)
    unsure = np.array([rows[p][1] for p in names], dtype=bool)
    return paths, y, unsure


# --------------------------------------------------------------------------------------------------
# Speed: the option's whole pipeline (decode once, cut views, model, pooling) on the same photos
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One model's share of a pipeline: views of one layout (without its whole view when ``tiles_only``)."""

    model: str
    side: int
    tiles: int
    resize: str = "crop"
    tiles_only: bool = False
    feature_map: bool = False

    def count(self) -> int:
        return self.tiles * self.tiles + (0 if self.tiles_only else 1)


def _lite2(tiles: int, fmap: bool, *, tiles_only: bool = False) -> Pass:
    return Pass(LITE2, 260, tiles, tiles_only=tiles_only, feature_map=fmap)


# Timing plans: what each option must run per photo. "plain" graphs (features + logits) where the
# option only needs the mean-pooled vectors, the feature-map graph plus pooling where it needs more.
PLANS: dict[str, tuple[Pass, ...]] = {
    "t3": (_lite2(3, False),),
    "t3-fmap": (_lite2(3, True),),
    "t2t3": (_lite2(3, False), _lite2(2, False, tiles_only=True)),
    "t2t3-fmap": (_lite2(3, True), _lite2(2, True, tiles_only=True)),
    "t4": (_lite2(4, False),),
    "t4-fmap": (_lite2(4, True),),
    "l0l2": (_lite2(3, False), Pass(LITE0, 224, 3)),
    "l0l2-fmap": (_lite2(3, True), Pass(LITE0, 224, 3, feature_map=True)),
    "s520": (_lite2(0, True), Pass(LITE2, 520, 0, "squeeze", feature_map=True)),
    "t3-s520": (_lite2(3, True), Pass(LITE2, 520, 0, "squeeze", feature_map=True)),
}


def _cut_all(path: Path, passes: tuple[Pass, ...]) -> list[np.ndarray]:
    from raresift.embed.decode import Views, cut_views, open_rgb

    views = [Views(p.side, p.tiles, resize=p.resize) for p in passes]
    im = open_rgb(path, min_side=max(v.min_side for v in views))
    try:
        return [cut_views(im, v)[1:] if p.tiles_only else cut_views(im, v) for p, v in zip(passes, views)]
    finally:
        im.close()


def _pipeline(paths: list[Path], passes: tuple[Pass, ...], sessions: list, decoder) -> None:
    step = min(per_call(p.count(), p.side) for p in passes)
    futures = [decoder.submit(_cut_all, p, passes) for p in paths]
    for i in range(0, len(paths), step):
        cut = [f.result() for f in futures[i : i + step]]
        for j, (p, sess) in enumerate(zip(passes, sessions)):
            run_views(sess, np.concatenate([c[j] for c in cut]), feature_map=p.feature_map)


def _release() -> None:
    """Hand freed memory (a closed session's arena) back to the system: the machine is shared."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_speed(paths: list[Path], cache: Path, repeats: int, log) -> dict:
    """Photos/s of every plan (median of ``repeats``, plans interleaved so load hits all alike) and the
    time of one Lite0 run and one 520-px Lite2 run relative to one Lite2 run, model only, same photos.

    Each timing opens its sessions, warms them up with one full-size call (ONNX Runtime's arena grows on
    the first calls), times, and closes them: one plan's arenas in memory at a time."""
    from raresift.embed.decode import Views, load_views

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in PLANS}
    with ThreadPoolExecutor(1) as decoder:
        for rep in range(repeats):
            for name, passes in PLANS.items():
                sessions = [session(graph_path(cache, p.model, p.side, feature_map=p.feature_map)) for p in passes]
                _pipeline(paths[: min(per_call(p.count(), p.side) for p in passes)], passes, sessions, decoder)
                t0 = time.perf_counter()
                _pipeline(paths, passes, sessions, decoder)
                times[name].append(time.perf_counter() - t0)
                del sessions
                _release()
            log(f"  speed: repeat {rep + 1}/{repeats} done")
    # Model only, pre-decoded: the same photos' 3x3 views for each model (plain graphs), and whole photos
    # at 260 (crop) and 520 (squeeze) through the feature-map graphs (the kind the 520-px options run).
    batches = {
        "lite2": (LITE2, 260, False, np.concatenate([load_views(p, Views(260, 3, "crop")) for p in paths])),
        "lite0": (LITE0, 224, False, np.concatenate([load_views(p, Views(224, 3, "crop")) for p in paths])),
        "lite2-whole": (LITE2, 260, True, np.concatenate([load_views(p, Views(260, 0, "crop")) for p in paths])),
        "lite2-520": (LITE2, 520, True, np.concatenate([load_views(p, Views(520, 0, "squeeze")) for p in paths])),
    }
    model_s: dict[str, list[float]] = {k: [] for k in batches}
    for rep in range(repeats):
        for k, (model, side, fmap, views) in batches.items():
            s = session(graph_path(cache, model, side, feature_map=fmap))
            step = per_call(1, side)
            s.run(["features", "logits"], {"image": views[:step]})
            t0 = time.perf_counter()
            for i in range(0, len(views), step):
                s.run(["features", "logits"], {"image": views[i : i + step]})
            model_s[k].append((time.perf_counter() - t0) / len(views))
            del s
            _release()
    med = {k: statistics.median(v) for k, v in model_s.items()}
    return {
        "photos": len(paths), "repeats": repeats,
        "photos_per_s": {name: len(paths) / statistics.median(t) for name, t in times.items()},
        "seconds": times,
        "model_s_per_run": med,
        "lite0_over_lite2": med["lite0"] / med["lite2"],
        "s520_over_lite2": med["lite2-520"] / med["lite2-whole"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# --------------------------------------------------------------------------------------------------
# Candidate features
# --------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return (x / norm).astype(np.float32)


def ss(x) -> np.ndarray:
    """float32 copy, signed square root (raresift's power normalisation)."""
    from raresift.learn.features import signed_sqrt

    return signed_sqrt(np.array(x, dtype=np.float32))


def combine(parts: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Each part unit length times its weight, weights scaled so that the whole row has unit length."""
    w = np.array([wt for _, wt in parts], dtype=np.float64)
    w /= np.sqrt((w**2).sum())
    return np.concatenate([_unit(p) * np.float32(wi) for (p, _), wi in zip(parts, w)], axis=1)


class Views3:
    """Pooled view vectors of one option's views: ``whole(pool)`` (n, d) and ``tiles(pool)`` (n, T, d)."""

    def __init__(self, whole: dict, tile_sets: list[dict]):
        self._whole = whole
        self._tiles = tile_sets

    def whole(self, pool: str = "mean") -> np.ndarray:
        return ss(self._whole[pool][:, 0])

    def tiles(self, pool: str = "mean") -> np.ndarray:
        return ss(np.concatenate([np.asarray(t[pool][:, 1:]) for t in self._tiles], axis=1))


def topk_mean(t: np.ndarray, k: int) -> np.ndarray:
    return -np.partition(-t, k - 1, axis=1)[:, :k].mean(axis=1)


# Recipes: a list of parts (what, pool, weight); what = whole | tmean | tmax | ttop2 (mean of the 2 largest tiles).
RECIPES: dict[str, list[tuple[str, str, float]]] = {
    "today": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1)],
    "+max(smax)": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmax", "smax", 1)],
    "+mean(gem)": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmean", "gem", 1)],
    "smax tiles": [("whole", "mean", 0.5), ("tmean", "smax", 1), ("tmax", "smax", 1)],
    "gem tiles": [("whole", "mean", 0.5), ("tmean", "gem", 1), ("tmax", "gem", 1)],
    "+max(gem)": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmax", "gem", 1)],
    "+max(top4)": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmax", "top4", 1)],
    "+max(smax) x2": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmax", "smax", 2)],
    "+max(smax)+max(gem)": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("tmax", "smax", 1),
                            ("tmax", "gem", 1)],
    "today top2": [("whole", "mean", 0.5), ("tmean", "mean", 1), ("tmax", "mean", 1), ("ttop2", "mean", 1)],
}
FMAP_POOLS = {"smax", "gem", "top4"}


def build(views: Views3, recipe: str) -> np.ndarray:
    parts = []
    for what, pool, w in RECIPES[recipe]:
        if what == "whole":
            parts.append((views.whole(pool), w))
        else:
            t = views.tiles(pool)
            parts.append((t.mean(axis=1) if what == "tmean" else t.max(axis=1) if what == "tmax" else topk_mean(t, 2), w))
    return combine(parts)


def needs_fmap(recipe: str) -> bool:
    return any(pool in FMAP_POOLS for _, pool, _ in RECIPES[recipe])


# --------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------


def split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split replay draws for this seed (its first draw), and the pool."""
    perm = np.random.default_rng(seed).permutation(n)
    test = np.sort(perm[: round(0.4 * n)])
    pool = np.setdiff1d(np.arange(n), test)
    return test, pool


def precision_at(scores: np.ndarray, y: np.ndarray, k: int = 50) -> float:
    return float(y[np.argsort(-scores, kind="stable")[:k]].mean())


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    hits = y[np.argsort(-scores, kind="stable")]
    return float((np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits == 1].mean())


def scored(s: np.ndarray, y: np.ndarray, sure: np.ndarray) -> tuple[float, float, float]:
    """precision@50, average precision, and precision@50 among the photos the key is sure of."""
    return precision_at(s, y), average_precision(s, y), precision_at(s[sure], y[sure])


def ceiling(X: np.ndarray, y: np.ndarray, sure: np.ndarray, seeds: list[int]) -> list[tuple[float, float, float]]:
    """:func:`scored` on the test split of a RareHead trained on every pool photo (all of them labelled)."""
    from raresift.learn.head import RareHead

    out = []
    for seed in seeds:
        test, pool = split(len(y), seed)
        head = RareHead().fit(X[pool], y[pool], X_unlabeled=None)
        out.append(scored(head.decision_function(X[test]), y[test], sure[test]))
    return out


def mil_ceiling(T: np.ndarray, y: np.ndarray, sure: np.ndarray, seeds: list[int], X_photo: np.ndarray | None,
                iters: int = 3, keep: int = 2) -> dict[str, list[tuple[float, float, float]]]:
    """Multiple-instance head: a linear tile score (logistic regression on tile features, C and class
    balance as RareHead's), a photo scores its best tile. Round 1 takes every tile of a positive photo
    as positive; later rounds keep only the ``keep`` best-scored tiles of each positive photo (the
    others leave the training set). With ``X_photo``, also the blend: standardised photo-head score +
    standardised best-tile score."""
    from sklearn.linear_model import LogisticRegression

    from raresift.learn.head import RareHead

    n, t, d = T.shape
    res: dict[str, list[tuple[float, float, float]]] = {"mil": [], "blend": []}
    for seed in seeds:
        test, pool = split(n, seed)
        Xi = T[pool].reshape(-1, d)
        yi = np.repeat(y[pool], t)
        use = np.ones(len(Xi), dtype=bool)
        lr = None
        for _ in range(iters):
            lr = LogisticRegression(C=RareHead().C, class_weight="balanced", max_iter=300)
            lr.fit(Xi[use], yi[use])
            s = lr.decision_function(Xi).reshape(len(pool), t)
            best = np.argsort(-s, axis=1)[:, :keep]
            keep_mask = np.zeros((len(pool), t), dtype=bool)
            np.put_along_axis(keep_mask, best, True, axis=1)
            use = (np.repeat(y[pool], t) == 0) | keep_mask.ravel()
        st = lr.decision_function(T[test].reshape(-1, d)).reshape(len(test), t).max(axis=1)
        res["mil"].append(scored(st, y[test], sure[test]))
        if X_photo is not None:
            head = RareHead().fit(X_photo[pool], y[pool], X_unlabeled=None)
            sp = head.decision_function(X_photo[test])
            z = (sp - sp.mean()) / sp.std() + (st - st.mean()) / st.std()
            res["blend"].append(scored(z, y[test], sure[test]))
    return res


def workflow(X: np.ndarray, y: np.ndarray, prior: np.ndarray, seeds: list[int]) -> dict[int, list[float]]:
    from raresift.simulate import SimulationData, replay

    out: dict[int, list[float]] = {}
    for seed in seeds:
        run = replay(SimulationData(X, y, prior), protocol="default", rng=np.random.default_rng(seed), k=50, budget=200)
        for p in run["points"]:
            out.setdefault(p["labels"], []).append(p["precision"])
    return out


# --------------------------------------------------------------------------------------------------
# Options and the report
# --------------------------------------------------------------------------------------------------


@dataclass
class Option:
    name: str
    what: str
    X: np.ndarray | None  # photo features (None: a multiple-instance head, ceiling only)
    logits: np.ndarray  # (n, views, 1000): the prior of the workflow
    plan: str  # timing plan
    ceil: list[tuple[float, float, float]] | None = None
    flow: dict[int, list[float]] | None = None


class Checkpoint:
    """Measurements kept in ``CACHE/measured.json`` as they finish, so that a run killed half-way (a
    shared machine) resumes where it stopped; ``--fresh`` measures everything again. A measurement is
    keyed by what it measured: the option, the splits, and a digest of its feature matrix."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.data = {} if fresh or not path.is_file() else json.loads(path.read_text())
        self.reused = 0

    @staticmethod
    def key(*parts, X: np.ndarray | None = None) -> str:
        import hashlib

        digest = "" if X is None else hashlib.sha1(np.ascontiguousarray(X).tobytes()).hexdigest()[:16]
        return "|".join(str(p) for p in parts) + "|" + digest

    def get(self, key: str, compute):
        if key in self.data:
            self.reused += 1
            return self.data[key]
        value = compute()
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=float))
        os.replace(tmp, self.path)
        return value


def runs_text(plan: str, speed: dict | None) -> str:
    passes = PLANS[plan]
    l2 = sum(p.count() for p in passes if p.model == LITE2 and p.side == 260)
    l0 = sum(p.count() for p in passes if p.model == LITE0)
    big = sum(p.count() for p in passes if p.model == LITE2 and p.side != 260)
    if not l0 and not big:
        return str(l2)
    text = f"{l2}" + (f" + {l0} Lite0" if l0 else "") + (f" + {big} at 520 px" if big else "")
    if speed is None:
        return text
    eq = l2 + l0 * speed["lite0_over_lite2"] + big * speed["s520_over_lite2"]
    return f"{text} = {eq:.1f}"


def fmt(values: list[float] | None, sd: bool = False) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{m:.3f} ± {statistics.stdev(values):.3f}" if sd and len(values) > 1 else f"{m:.3f}"


def main(argv: list[str] | None = None) -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--truth", type=Path, default=DEFAULT_TRUTH)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="embeddings, model files, results (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="3 splits instead of 10")
    ap.add_argument("--splits", type=int, default=10, help="test splits (seeds 0..N-1; default 10)")
    ap.add_argument("--threads", type=int, default=THREADS, help="ONNX Runtime and BLAS threads (default %(default)s)")
    ap.add_argument("--fresh", action="store_true", help="measure again what CACHE/measured.json holds")
    ap.add_argument("--embed-only", action="store_true", help="embed (fill the cache) and stop")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    ap.add_argument("--no-workflow", action="store_true", help="ceilings only (no simulated sessions)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RARESIFT_CACHE_DIR", str(args.cache / "models"))
    THREADS = args.threads
    from threadpoolctl import threadpool_limits

    threadpool_limits(THREADS)
    from raresift.learn.coldstart import concepts_for, text_scores_from_logits
    from raresift.learn.features import featurize

    t_start = time.time()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    paths, y, unsure = load_key(args.truth, args.images)
    sure = ~unsure
    n = len(y)
    log(f"{n} photos, {int(y.sum())} positive, {int(unsure.sum())} marked unsure by the key")
    E = {key: embed_layout(layout, paths, args.cache, log) for key, layout in LAYOUTS.items()}
    if args.embed_only:
        return 0
    # Sanity: the whole-photo view is the same pixels in every crop layout of a model.
    for key in ("lite2-t2", "lite2-t4"):
        diff = float(np.abs(np.asarray(E[key]["mean"][:, 0], np.float32) - np.asarray(E["lite2-t3"]["mean"][:, 0], np.float32)).max())
        log(f"whole view of {key} vs lite2-t3: max |difference| {diff:.2g}")

    cp = Checkpoint(args.cache / "measured.json", args.fresh)
    speed = None
    if not args.no_speed:
        sample = [paths[i] for i in np.sort(np.random.default_rng(12345).choice(n, 64, replace=False))]
        log("speed: 64 photos, every plan 3 times ...")
        speed = cp.get(Checkpoint.key("speed", sorted(PLANS), [str(p) for p in sample]),
                       lambda: measure_speed(sample, args.cache, 3, log))

    seeds = list(range(3 if args.quick else args.splits))
    concepts = concepts_for(QUERY)
    v3 = Views3(E["lite2-t3"], [E["lite2-t3"]])
    v23 = Views3(E["lite2-t3"], [E["lite2-t2"], E["lite2-t3"]])
    v4 = Views3(E["lite2-t4"], [E["lite2-t4"]])
    v0 = Views3(E["lite0-t3"], [E["lite0-t3"]])
    lg3 = E["lite2-t3"]["logits"]
    lg23 = np.concatenate([lg3, E["lite2-t2"]["logits"][:, 1:]], axis=1)
    lg4 = E["lite2-t4"]["logits"]
    lg02 = np.concatenate([lg3, E["lite0-t3"]["logits"]], axis=1)
    lg520 = np.concatenate([lg3[:, :1], E["lite2-s520"]["logits"]], axis=1)
    lg3_520 = np.concatenate([lg3, E["lite2-s520"]["logits"]], axis=1)

    today = build(v3, "today")
    gap = float(np.abs(today - featurize(np.asarray(E["lite2-t3"]["mean"]))).max())
    log(f"option A vs raresift.learn.features.featurize: max |difference| {gap:.2g}")
    assert gap < 1e-3, "option A must be today's feature"

    def plan_of(base: str, recipe: str) -> str:
        return base + ("-fmap" if needs_fmap(recipe) else "")

    # Step 1: every pooling recipe on today's layout; the best of B-D (by ceiling) is tried on other layouts.
    letters = {"today": "A", "+max(smax)": "B", "+mean(gem)": "C", "smax tiles": "D", "gem tiles": "D'"}
    options: list[Option] = []
    extra = 0
    for recipe in RECIPES:
        if recipe not in letters:
            extra += 1
        name = letters.get(recipe, f"x{extra}")
        options.append(Option(name, f"whole + 3x3, {recipe}", build(v3, recipe), lg3, plan_of("t3", recipe)))
    for o in options:
        o.ceil = cp.get(Checkpoint.key("ceiling", o.name, o.what, seeds, X=o.X), lambda: ceiling(o.X, y, sure, seeds))
        log(f"ceiling {o.name} {o.what}: {fmt([c[0] for c in o.ceil])} ({time.time() - t_start:.0f} s)")
    bd = [o for o in options if o.name in ("B", "C", "D", "D'")]
    best_opt = max(bd, key=lambda o: (statistics.mean(c[0] for c in o.ceil), statistics.mean(c[1] for c in o.ceil)))
    best = best_opt.what.split(", ", 1)[1]
    log(f"best of B-D by ceiling: {best}")

    def s520_parts(base: np.ndarray | None) -> np.ndarray:
        hi = E["lite2-s520"]
        parts = [(ss(hi["mean"][:, 0]), 1.0), (ss(hi["smax"][:, 0]), 1.0)]
        if base is None:
            return combine([(v3.whole("mean"), 0.5), *parts])
        # the base keeps its parts' weights (each tile part 1), the two 520-px parts weigh 1 each
        return combine([(base, float(np.sqrt(sum(w * w for _, _, w in RECIPES[best])))), *parts])

    more = [
        Option("E", "whole + 2x2 + 3x3, today", build(v23, "today"), lg23, "t2t3"),
        Option("F", f"whole + 2x2 + 3x3, {best}", build(v23, best), lg23, plan_of("t2t3", best)),
        Option("G", "Lite2 (A) + Lite0 (A), concatenated", combine([(today, 1), (build(v0, "today"), 1)]), lg02, "l0l2"),
        Option("G'", f"Lite2 + Lite0, each {best}", combine([(build(v3, best), 1), (build(v0, best), 1)]), lg02,
               plan_of("l0l2", best)),
        Option("H", "whole + 4x4, today (reference)", build(v4, "today"), lg4, "t4"),
        Option("H'", f"whole + 4x4, {best} (reference)", build(v4, best), lg4, plan_of("t4", best)),
        Option("S", "whole 260 + whole 520 px squeezed (mean, spatial max)", s520_parts(None), lg520, "s520"),
        Option("S'", f"whole + 3x3 {best} + whole 520 px (mean, spatial max)", s520_parts(build(v3, best)), lg3_520,
               "t3-s520"),
    ]
    for o in more:
        o.ceil = cp.get(Checkpoint.key("ceiling", o.name, o.what, seeds, X=o.X), lambda: ceiling(o.X, y, sure, seeds))
        log(f"ceiling {o.name} {o.what}: {fmt([c[0] for c in o.ceil])} ({time.time() - t_start:.0f} s)")
    options += more
    # Multiple-instance heads (ceiling only: the workflow's learner takes one vector per photo).
    tile_feats = np.stack([combine([(ss(E["lite2-t3"]["mean"][:, t]), 1), (ss(E["lite2-t3"]["smax"][:, t]), 1)])
                           for t in range(1, 10)], axis=1)
    x_best = build(v3, best)
    mil = cp.get(Checkpoint.key("mil", best, seeds, X=np.concatenate([tile_feats.reshape(n, -1), x_best], axis=1)),
                 lambda: mil_ceiling(tile_feats, y, sure, seeds, x_best))
    options.append(Option("M", "3x3 tiles, MIL: best tile's linear score (tile mean + spatial max)", None, lg3,
                          "t3-fmap", ceil=mil["mil"]))
    options.append(Option("M+", f"M blended with the head on whole + 3x3 {best} (z-scores summed)", None, lg3,
                          "t3-fmap", ceil=mil["blend"]))
    log(f"ceiling M: {fmt([c[0] for c in mil['mil']])}, M+: {fmt([c[0] for c in mil['blend']])}")

    if not args.no_workflow:
        for o in options:
            if o.X is None:
                continue
            prior = text_scores_from_logits(np.asarray(o.logits, dtype=np.float32), concepts)
            flow = cp.get(Checkpoint.key("workflow", o.name, o.what, seeds, X=np.concatenate([o.X, prior[:, None]], axis=1)),
                          lambda: {str(k): v for k, v in workflow(o.X, y, prior, seeds).items()})
            o.flow = {int(k): v for k, v in flow.items()}
            log(f"workflow {o.name} {o.what}: " + " ".join(f"{k}:{fmt(v)}" for k, v in sorted(o.flow.items()))
                + f" ({time.time() - t_start:.0f} s)")

    # The report.
    base = options[0]
    print(f"# Feature options on the flower photos: {n} photos, {int(y.sum())} with an insect or spider")
    print()
    print(f"{len(seeds)} random 40% test splits (seeds {seeds[0]}-{seeds[-1]}). ceiling: RareHead() on every pool "
          "photo, precision@50 (mean ± sd) and average precision on the test split; Δ: paired difference to A "
          f"(mean ± standard error). Workflow: replay(protocol='default'), prior = text query {QUERY!r}, "
          "precision@50 after 25 / 50 / 100 / 200 labels (mean). 'sure photos': the same ranking with the "
          f"{int(unsure.sum())} photos the key marks unsure ({int((unsure & (y == 1)).sum())} positive) left out of "
          "the test split.")
    if speed:
        la, lb = speed["loadavg_before"], speed["loadavg_after"]
        print(f"Speed: the option's whole pipeline (decode, views, model, pooling; ONNX Runtime, {THREADS} threads), "
              f"median of {speed['repeats']} on the same {speed['photos']} photos; load average "
              f"{la[0]:.1f} before, {lb[0]:.1f} after on {os.cpu_count()} cores (a shared machine: compare rows, "
              f"not absolute rates). Model runs in Lite2-run equivalents: one Lite0 run = "
              f"{speed['lite0_over_lite2']:.2f}, one 520-px Lite2 run = {speed['s520_over_lite2']:.2f} "
              f"(model only, same photos, median of 3). Measured {speed['measured_at']}.")
    print()
    print("| option | features | model runs per photo | photos/s | ceiling p@50 | Δ vs A | ceiling AP | "
          "ceiling p@50, sure photos | p@50 at 25 / 50 / 100 / 200 labels |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for o in options:
        d = [c[0] - b[0] for c, b in zip(o.ceil, base.ceil)]
        delta = "" if o is base else f"{statistics.mean(d):+.3f}" + (
            f" ± {statistics.stdev(d) / np.sqrt(len(d)):.3f}" if len(d) > 1 else "")
        rate = f"{speed['photos_per_s'][o.plan]:.2f}" if speed else "-"
        flow = " / ".join(fmt(o.flow.get(k)) for k in (25, 50, 100, 200)) if o.flow else "-"
        print(f"| {o.name} | {o.what} | {runs_text(o.plan, speed)} | {rate} | {fmt([c[0] for c in o.ceil], sd=True)} | "
              f"{delta} | {fmt([c[1] for c in o.ceil])} | {fmt([c[2] for c in o.ceil])} | {flow} |")
    print()
    print(f"Best of B-D by ceiling (used for F, G', H', S', M+): {best}. Total {time.time() - t_start:.0f} s"
          + (f"; {cp.reused} measurements read back from {cp.path} (an earlier, interrupted run; --fresh "
             "measures again)." if cp.reused else "."))
    out = args.cache / ("results-quick.json" if args.quick else "results.json")
    out.write_text(json.dumps({
        "seeds": seeds, "best_of_BD": best, "speed": speed,
        "options": [{"name": o.name, "features": o.what, "plan": o.plan, "runs": runs_text(o.plan, speed),
                     "ceiling": o.ceil, "workflow": o.flow} for o in options]}, indent=1, default=float))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
