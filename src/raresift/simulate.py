"""Replay whole labelling sessions with a known answer key (an oracle labels what is asked).

Two protocols:

* ``seed`` - the reference write-up: a random 40% test split, 300 random labels, one round of the
  100 most uncertain photos, precision@K (K = 50) on the test split after 300 and 400 labels;
* ``default`` - raresift's workflow: a cold start from the text query (or examples, or random),
  then batches of the default strategy, retraining after each, up to the budget.

Each repeat draws its own random test split from ``seed + repeat`` (the stored split of the
project is ignored, as the write-up did). Everything after the features are loaded runs in
memory: no database writes per simulated round.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, NotReadyError
from .learn.features import MatrixFeatures
from .learn.session import Session, knn_by_default, standardise
from .learn.strategies import get_strategy
from .settings import check_pool, default

__all__ = ["PROTOCOLS", "SimulationData", "curve_points", "load_truth", "replay", "simulate"]

PROTOCOLS = ("seed", "default")
SEED_RANDOM_LABELS = 300
SEED_ROUND = 100
DEFAULT_BATCH = default("batch")
DEFAULT_BUDGET = default("budget")
DEFAULT_K = default("k")


@dataclass
class SimulationData:
    """What a replay needs: features of every photo, the answer key, and optional cold-start prior."""

    X: np.ndarray  # (n, d) float32 features
    y: np.ndarray  # (n,) 0/1 truth
    prior: np.ndarray | None = None  # (n,) cold-start score (text query / examples), or None
    test_fraction: float = 0.4
    clusters: list[tuple[np.ndarray, np.ndarray]] | None = None  # exploring levels (group id, priority per row)
    pool: np.ndarray | None = None  # (n,) bool: a fixed pool split (the project's); None = draw one per repeat
    extra: tuple[np.ndarray, np.ndarray] | None = None  # (features, labels) of example photos from outside
    prior_kind: str = "text"
    views: int = 1  # view vectors per photo in the project (whole photo + tiles): what a full scan reads


def curve_points(budget: int) -> list[int]:
    """Label counts at which the default protocol reports: 25, 50, 100, 200, then every 100, and the budget."""
    pts = {p for p in (25, 50, 100, 200) if p <= budget}
    pts |= set(range(300, budget + 1, 100))
    pts.add(budget)
    return sorted(pts)


def _precision_at_k(scores: np.ndarray, y: np.ndarray, k: int, rng: np.random.Generator) -> float:
    k = min(k, len(scores))
    jitter = rng.random(len(scores))
    order = np.lexsort((jitter, scores))[::-1][:k]
    return float(y[order].mean()) if k else float("nan")


def _average_precision(scores: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    if y.sum() == 0:
        return float("nan")
    jitter = rng.random(len(scores))
    order = np.lexsort((jitter, scores))[::-1]
    hits = y[order]
    cum = np.cumsum(hits)
    return float((cum / np.arange(1, len(hits) + 1))[hits == 1].mean())


def replay(
    data: SimulationData,
    *,
    protocol: str = "default",
    rng: np.random.Generator,
    k: int | None = DEFAULT_K,
    budget: int = DEFAULT_BUDGET,
    batch: int = DEFAULT_BATCH,
    strategy: str = "default",
    head_params: dict | None = None,
    prior_weight: float | None = None,
    pool: str = "full",
) -> dict[str, Any]:
    """One simulated session, driven through :class:`raresift.learn.session.Session` (the learner of
    ``raresift next``). Returns ``{"k", "prevalence", "points": [{labels, precision, ap, found}],
    "rounds": [{"seed", "rows", "strategies"}]}``; round r is what ``raresift next --seed SEED`` picks
    on a project holding the same labels.

    ``k=None`` means K = min(50, positives in this repeat's test split). ``pool``: as ``raresift next
    --pool`` (``knn``: rounds score the neighbours of the labelled photos in an exact index of the
    features, plus a random sample; ``auto``: where ``next`` would, from ``pool_auto_min`` view vectors on).
    """
    n = len(data.y)
    check_pool(pool)
    neighbours = None
    if pool == "knn" or (pool == "auto" and knn_by_default(n, data.views)):
        from .index import build_index, candidate_pool

        index = build_index(data.X, kind="flat")
        knn_k = default("knn_k")

        def neighbours(rows: np.ndarray) -> np.ndarray:
            return candidate_pool(index, data.X, rows, k=knn_k) if len(rows) else np.empty(0, dtype=np.int64)
    if data.pool is not None:
        in_pool = np.asarray(data.pool, dtype=bool)
        test = np.flatnonzero(~in_pool)
    else:
        perm = rng.permutation(n)
        test = np.sort(perm[: round(data.test_fraction * n)])
        in_pool = np.ones(n, dtype=bool)
        in_pool[test] = False
    y_test = data.y[test]
    kk = min(DEFAULT_K, int(y_test.sum())) if k is None else k
    kk = max(kk, 1)
    extra = {} if prior_weight is None else {"prior_weight": prior_weight}
    session = Session(MatrixFeatures(data.X), np.full(n, -1, dtype=np.int8), in_pool, prior=data.prior,
                      prior_kind=data.prior_kind, clusters=data.clusters, head_params=head_params,
                      extra=data.extra, **extra)
    points: list[dict[str, float]] = []
    rounds: list[dict[str, Any]] = []

    def record() -> None:
        s = session.logits(rng)[test]
        lab = np.flatnonzero(session.labels >= 0)
        points.append({
            "labels": len(lab),
            "precision": _precision_at_k(s, y_test, kk, rng),
            "ap": _average_precision(s, y_test, rng),
            "found": int(data.y[lab].sum()),
        })

    def ask(size: int, name: str, *, report: bool) -> bool:
        """One round: the session fits and picks, the oracle answers. False when nothing is left."""
        seed = int(rng.integers(2**31))
        picks = session.query(size, name, rng=np.random.default_rng(seed), neighbours=neighbours)
        if report:
            record()
        if not len(picks.rows):
            return False
        rounds.append({"seed": seed, "rows": picks.rows.tolist(), "strategies": picks.sources})
        session.update(picks.rows, data.y[picks.rows])
        return True

    def n_labels() -> int:
        return int((session.labels >= 0).sum())

    if protocol == "seed":
        pool_rows = np.flatnonzero(in_pool)
        first = rng.choice(pool_rows, size=min(SEED_RANDOM_LABELS, len(pool_rows)), replace=False)
        session.update(first, data.y[first])
        ask(SEED_ROUND, "uncertainty", report=True)
        session.fit(rng)
        record()
    elif protocol == "default":
        get_strategy(strategy)
        wanted = curve_points(budget)
        exhausted = False
        while n_labels() < budget and not exhausted:
            # Batches end exactly on the reporting points.
            nxt = min([p for p in wanted if p > n_labels()] + [budget])
            exhausted = not ask(min(batch, nxt - n_labels()), strategy, report=n_labels() in wanted)
        if not exhausted:
            session.fit(np.random.default_rng(int(rng.integers(2**31))))
            if n_labels() in wanted:
                record()
    else:
        raise InputError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return {"k": kk, "prevalence": float(y_test.mean()), "points": points, "rounds": rounds}


def _summarise(runs: list[dict[str, Any]], k: int | None) -> dict[str, Any]:
    by_labels: dict[int, list[dict]] = {}
    for run in runs:
        for p in run["points"]:
            by_labels.setdefault(p["labels"], []).append(p)
    curve = []
    for labels in sorted(by_labels):
        ps = by_labels[labels]
        prec = np.array([p["precision"] for p in ps])
        ap = np.array([p["ap"] for p in ps], dtype=float)
        curve.append({
            "labels": labels,
            "precision_at_k_mean": round(float(prec.mean()), 4),
            "precision_at_k_sd": round(float(prec.std(ddof=1)) if len(prec) > 1 else 0.0, 4),
            "positives_found_mean": round(float(np.mean([p["found"] for p in ps])), 2),
            "average_precision_mean": round(float(np.nanmean(ap)), 4) if np.isfinite(ap).any() else None,
            "repeats": len(ps),
        })
    return {
        "k": k if k is not None else [r["k"] for r in runs],
        "random_precision_at_k_mean": round(float(np.mean([r["prevalence"] for r in runs])), 4),
        "curve": curve,
    }


def load_truth(ids: list[str], *, truth: str | os.PathLike | None = None, truth_folder: str | None = None
               ) -> tuple[np.ndarray, dict[str, int]]:
    """Answer key over ``ids``: array of 1 / 0 / -1 (not in the key) and counts.

    ``truth`` is a CSV with header ``path,label``; ``truth_folder`` NAME makes every photo under a
    folder called NAME positive (all others negative).
    """
    if (truth is None) == (truth_folder is None):
        raise InputError("give the answer key as --truth FILE.csv or --truth-folder NAME (one of them)")
    y = np.full(len(ids), -1, dtype=np.int8)
    if truth_folder is not None:
        name = truth_folder.strip("/")
        for i, p in enumerate(ids):
            y[i] = int(name in p.split("/")[:-1])
        if not (y == 1).any():
            raise InputError(f"no photo lies under a folder called {truth_folder!r}")
        return y, {"unmatched": 0}
    path = Path(truth)
    if not path.is_file():
        raise InputError(f"answer key {path} does not exist")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise InputError(f"{path} line 1: expected a header with columns path,label")
    ip, il = header.index("path"), header.index("label")
    pos = {p: i for i, p in enumerate(ids)}
    unmatched = 0
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il) or row[il].strip() not in ("0", "1"):
            raise InputError(f"{path} line {lineno}: expected path,label with label 1 or 0")
        i = pos.get(row[ip].strip())
        if i is None:
            unmatched += 1
            continue
        y[i] = int(row[il].strip())
    if not (y == 1).any():
        raise InputError(f"{path} marks no photo of the project as positive (label 1); check the paths")
    return y, {"unmatched": unmatched}


def _open_project(images, project, embed_options, progress):
    import tempfile

    from .project import Project

    tmpdir = None
    if project is not None and (Path(project) / "raresift.sqlite").exists():
        proj = Project.open(project)
        if images is not None and proj.images_root is not None and Path(images).resolve() != proj.images_root:
            proj.close()
            raise InputError(f"{project} holds a project of {proj.images_root}, not {images}")
    else:
        if images is None:
            raise InputError("give --images DIR (photos to embed) or --project DIR (an embedded project)")
        if project is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="raresift-simulate-")
            project = Path(tmpdir.name) / "project"
        proj = Project.create(project, images=images, exist_ok=True)
        proj.add_images()
    if proj.store.count_status("new"):
        opts = dict(embed_options or {})
        if progress is not None:
            opts.setdefault("progress", progress)
        proj.embed(**opts)
    return proj, tmpdir


def simulate(
    *,
    images: str | os.PathLike | None = None,
    truth: str | os.PathLike | None = None,
    truth_folder: str | None = None,
    protocol: str = "default",
    strategy: str = "default",
    query: str | None = None,
    examples: list[str | os.PathLike] | None = None,
    budget: int = DEFAULT_BUDGET,
    repeats: int = default("repeats"),
    seed: int = 0,
    project: str | os.PathLike | None = None,
    k: int | None = DEFAULT_K,
    batch: int = DEFAULT_BATCH,
    test_fraction: float = 0.4,
    split: str = "random",
    trace: bool = False,
    json_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    embed_options: dict | None = None,
    progress: Callable[[int], None] | None = None,
    pool: str = default("pool"),
    concept: str | None = None,
) -> dict[str, Any]:
    """Replay ``repeats`` labelling sessions against an answer key and summarise precision@K by labels.

    The photos are embedded into ``project`` (kept for re-runs; a temporary folder if None) unless it
    already holds an embedded project. Returns a JSON-able dict with ``k``,
    ``random_precision_at_k_mean`` and ``curve`` (one point per label count: ``labels``,
    ``precision_at_k_mean``, ``precision_at_k_sd``, ``positives_found_mean``, ...). Writes the dict
    to ``json_path`` and a plot to ``plot_path`` (default: ``json_path`` with ``.png``) when given.
    ``progress`` is called with 1 after each repeat. ``pool``: which photos a round scores, as
    ``raresift next --pool`` (see :func:`replay`). ``concept``: the sessions start from that concept's
    query and examples as `next --concept NAME` remembers them, where ``query`` / ``examples`` are not
    given (an existing project only; the answer key still says what is positive).

    ``examples`` are image files from anywhere that show the class (one photo on your phone): they
    start every session as `next --examples FILE` does (a positive that trains, and the prior of
    similarity to it); combined with ``query``, the text prior is fused with theirs.

    ``split="random"`` (the write-up's protocol) draws a new test split of ``test_fraction`` per repeat;
    ``split="project"`` keeps the project's own test split. With ``trace``, the result also holds
    ``sessions``: per repeat, the rounds (seed, image ids, strategies) in the order they were asked:
    ``raresift next --seed SEED`` on a project with the same labels picks the same photos.
    """
    check_pool(pool)
    from .learn.coldstart import concepts_for, text_scores
    from .learn.features import gather
    from .learn.loop import clusters as project_clusters

    if split not in ("random", "project"):
        raise InputError(f"unknown split {split!r}; valid: random, project")
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    get_strategy(strategy)
    for name, value, low in (("--budget", budget, 1), ("--repeats", repeats, 1), ("--batch", batch, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise InputError(f"--k must be a whole number >= 1, got {k!r}")
    if not 0 < test_fraction < 1:
        raise InputError(f"the test fraction must be in (0, 1), got {test_fraction}")
    concepts = None
    if query is not None:
        concepts = concepts_for(query)
        if not concepts:
            raise InputError(f"no ImageNet concept matches {query!r}; try other words or leave --query out")
    if concept is not None:
        from .store.labels import check_concept

        check_concept(concept)
        if project is None:
            raise InputError("--concept needs --project: the concept's query and examples are kept in a project")
    proj, tmpdir = _open_project(images, project, embed_options, None)
    try:
        stored_examples: list[str] = []
        if concept is not None:
            proj.store.concept = concept
            if query is None and proj.store.meta(proj.store.concept_key("learn.query")):
                query = proj.store.meta(proj.store.concept_key("learn.query"))
                concepts = concepts_for(query)
            if not examples:
                stored_examples = json.loads(proj.store.meta(proj.store.concept_key("learn.examples")) or "[]")
        mask = proj.embedded_mask()
        ids = proj.image_ids()
        y_all, key_info = load_truth(ids, truth=truth, truth_folder=truth_folder)
        rows = np.flatnonzero(mask[: len(y_all)] & (y_all >= 0))
        if len(rows) < 10:
            raise NotReadyError(f"only {len(rows)} embedded photos have an answer; a simulation needs more")
        vectors = proj.vectors()
        X = gather(vectors, rows)
        prior = text_scores(proj.store.logits(), mask, query)[rows] if query is not None else None
        extra = None
        if examples or stored_examples:
            from .learn.coldstart import example_scores
            from .learn.loop import example_features

            keys = [proj.add_example(e) for e in examples] if examples else stored_examples
            feats = example_features(proj.store, keys)
            extra = (feats, np.ones(len(keys), dtype=np.int64))
            sim = example_scores(vectors, mask, feats)[rows]
            prior = sim if prior is None else np.fmax(standardise(prior), standardise(sim))
        clusters = None
        if protocol == "default" and prior is None:  # the project's own clusterings, as `next` explores them
            clusters = [(ids[rows], prio[rows]) for ids, prio in project_clusters(proj.store)]
        pool_mask = (proj.splits()[rows] == "pool") if split == "project" else None
        views = int(proj.store.embedding_info()["views"])  # views embedded, as `next` counts them (not parts kept)
        project_path = str(proj.path) if tmpdir is None else None
    finally:
        proj.close()
        if tmpdir is not None:
            tmpdir.cleanup()
    data = SimulationData(X, y_all[rows].astype(np.int64), prior, test_fraction, clusters, pool_mask, extra,
                          "text" if query is not None else "examples", views)
    if protocol == "seed" and len(rows) * (1 - test_fraction) < SEED_RANDOM_LABELS + SEED_ROUND:
        raise InputError(f"the seed protocol labels {SEED_RANDOM_LABELS + SEED_ROUND} pool photos; "
                         f"this collection has only {int(len(rows) * (1 - test_fraction))}")
    runs = []
    for r in range(repeats):
        runs.append(replay(data, protocol=protocol, rng=np.random.default_rng(seed + r), k=k, budget=budget,
                           batch=batch, strategy=strategy, pool=pool))
        if progress is not None:
            progress(1)
    result = _summarise(runs, k)
    result.update({
        "protocol": protocol,
        "strategy": strategy if protocol == "default" else "uncertainty",
        "query": query,
        "examples": [str(e) for e in examples] if examples else None,
        "concepts": [c[1] for c in concepts] if concepts else None,
        "budget": budget if protocol == "default" else SEED_RANDOM_LABELS + SEED_ROUND,
        "batch": batch if protocol == "default" else SEED_ROUND,
        "repeats": repeats,
        "seed": seed,
        "photos": len(rows),
        "positives": int(data.y.sum()),
        "answer_key_unmatched": key_info["unmatched"],
        "project": project_path,
        "split": split,
    })
    if trace:
        result["sessions"] = [[{"seed": r["seed"], "image_ids": [int(rows[i]) + 1 for i in r["rows"]],
                                "strategies": r["strategies"]} for r in run["rounds"]] for run in runs]
    if json_path is not None:
        jp = Path(json_path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(result, indent=2) + "\n")
        if plot_path is None:
            plot_path = jp.with_suffix(".png")
    if plot_path is not None:
        plot(result, plot_path)
        result["plot"] = str(plot_path)
    return result


def plot(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Draw precision@K against labels (mean +- sd) and the random baseline; save as PNG."""
    # The object-oriented API on an Agg canvas: no pyplot, so a notebook's backend stays as it was.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = result["curve"]
    xs = [p["labels"] for p in curve]
    ys = np.array([p["precision_at_k_mean"] for p in curve])
    sd = np.array([p["precision_at_k_sd"] for p in curve])
    k = result["k"] if isinstance(result["k"], int) else "K"
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    label = f"{result.get('protocol', '')} ({result.get('strategy', '')})"
    ax.plot(xs, ys, marker="o", label=label)
    ax.fill_between(xs, np.clip(ys - sd, 0, 1), np.clip(ys + sd, 0, 1), alpha=0.2)
    ax.axhline(result["random_precision_at_k_mean"], color="grey", linestyle="--", label="random sampling")
    ax.set_xlabel("labels")
    ax.set_ylabel(f"precision@{k} on the test split")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{result.get('repeats', '')} simulated sessions" + (f", query {result['query']!r}" if result.get("query") else ""))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
