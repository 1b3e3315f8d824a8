"""Cold starts on a rare class of about 1 in 450 (Caltech-101), and explorers for the start without any hint.

Setup. One raresift project of all Caltech-101 photos (9,144; folder = class), made with
``raresift init`` and ``raresift embed --tiles 0`` (whole photo only, no tiles: embedding then
takes a few minutes on 2 cores; Caltech objects fill the frame). For each chosen class the answer
key (a CSV ``path,label``) lists every photo of the other classes as 0 and only 20 randomly chosen
photos of the class as 1; the class's other photos are left out of the key, so ``simulate`` drops
them from the collection: the class is 20 of about 8,700 photos (1 in ~435). One further photo of
the class, not among the 20, is the "outside example photo" (passed by its file path, so it is
copied into the project's examples and embedded as a file from outside). ``simulate`` holds out a
random 40% test split per session, so about 12 of the 20 positives are in the pool that can be
labelled; the tables report those pool positives too.

Classes: ``--classes`` classes (default 20) with at least 40 photos, drawn at random (``--seed``),
half whose name matches an ImageNet concept (``concepts_for``) and half that match none.
BACKGROUND_Google (clutter, not a class) and Faces / Faces_easy (the same photos, one set cropped:
either as the class would have near-copies of its photos as negatives) are never drawn.

Part 1, start kinds, each through ``raresift.simulate.simulate(protocol="default", budget=300,
k=None)`` with ``--repeats`` sessions per class: ``text`` (query = the class name; classes with a
concept only), ``example`` (the one outside example photo), ``none`` (no hint: exploration).

Part 2, explorers for the start without any hint: the same sessions through
``raresift.simulate.replay`` on ``SimulationData(X, y, prior=None, clusters=LEVELS)`` (X as
``simulate`` builds it), with ``raresift.learn.session.explore_picks`` replaced by each variant's
picker for the length of the replay. The variants' precomputations see only the photos of the
simulated collection (the key's rows); ``shipped`` is raresift's explorer fitted on the collection
only, ``shipped-project`` the same fitted on all 9,144 photos (what ``simulate`` explores: optimistic,
as the class's left-out photos shape the groups), ``kmeans-collection`` raresift 0.1's
coarse-then-fine k-means. Reported: mean positives found after
50/100/200/300 labels, over classes and repeats (sessions of one class and repeat share their test
split across variants), the mean number of labels until the first positive, and per class.

Usage:
    python benchmarks/coldstart_caltech.py --work /work/devdata/coldstart            # ~1 h on one core
    python benchmarks/coldstart_caltech.py --work DIR --images DIR --repeats 2 --seed 0 --variants shipped,kmeans-collection --skip-starts
    python benchmarks/coldstart_caltech.py --work DIR --tiles 3 --variants shipped     # on raresift's default tiles

``--work`` holds the project (``WORK/caltech``), the answer keys (``WORK/keys``) and the results
of every simulated class and variant (``WORK/results``, keyed by the settings and the variant's
source code, so a re-run only computes what changed; ``--fresh`` ignores them).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import inspect
import json
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

import raresift.learn.session as session_module
from raresift import Project
from raresift.learn.coldstart import cluster_features, cluster_levels, concepts_for, explore_levels, explore_picks
from raresift.learn.features import PART_WEIGHTS, gather, log_sum_exp
from raresift.learn.loop import clusters as project_clusters
from raresift.simulate import SimulationData, load_truth, replay, simulate

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
NEVER = ("BACKGROUND_Google", "Faces", "Faces_easy")
POINTS = (50, 100, 200, 300)
KINDS = ("text", "example", "none")
PREFERRED = Path("/work/shared/datasets/caltech101/101_ObjectCategories")


# ---------------------------------------------------------------------------------------- setup
def ensure_project(project: Path, images: Path, tiles: int = 0) -> None:
    """``raresift init`` + ``raresift embed --tiles TILES`` (the embed resumes where it stopped)."""
    cli = [sys.executable, "-m", "raresift"]
    if not (project / "raresift.sqlite").exists():
        subprocess.run(cli + ["init", str(project), "--images", str(images)], check=True)
    with Project.open(project) as p:
        todo = int((~p.embedded_mask()).sum())
        info = p.embedding_info()
    if todo or info is None:
        subprocess.run(cli + ["embed", str(project), "--tiles", str(tiles), "--no-progress"], check=True)
    with Project.open(project) as p:
        info = p.embedding_info()
    if (info.get("tiles") or 0) != tiles:
        raise SystemExit(f"{project} was embedded with tiles={info.get('tiles')}; this run wants --tiles {tiles}")


def choose_classes(ids: list[str], n: int, min_photos: int, seed: int) -> tuple[list[str], list[str]]:
    """``n // 2`` classes with an ImageNet concept and ``n - n // 2`` without, at random, each >= min_photos."""
    names, counts = np.unique([p.split("/")[0] for p in ids], return_counts=True)
    ok = [str(c) for c, k in zip(names, counts) if k >= min_photos and c not in NEVER]
    with_c = [c for c in ok if concepts_for(c.replace("_", " "))]
    without = [c for c in ok if not concepts_for(c.replace("_", " "))]
    rng = np.random.default_rng(seed)
    a = sorted(rng.choice(with_c, size=min(n // 2, len(with_c)), replace=False).tolist())
    b = sorted(rng.choice(without, size=min(n - n // 2, len(without)), replace=False).tolist())
    return a, b


def make_key(cls: str, ids: list[str], images: Path, keys: Path, seed: int, positives: int = 20
             ) -> tuple[Path, Path]:
    """The answer key of ``cls`` (every other photo 0, ``positives`` of the class 1, the rest left out) and
    the outside example photo (one more photo of the class, not in the key)."""
    rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
    own = sorted(p for p in ids if p.split("/")[0] == cls)
    pick = rng.choice(len(own), size=positives + 1, replace=False)
    pos, example = [own[i] for i in pick[:positives]], own[pick[positives]]
    keys.mkdir(parents=True, exist_ok=True)
    path = keys / f"{cls}.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in ids:
            if p.split("/")[0] != cls:
                w.writerow([p, 0])
        for p in pos:
            w.writerow([p, 1])
    return path, (images / example).resolve()


def pool_positives(y: np.ndarray, seed: int, test_fraction: float = 0.4) -> int:
    """Positives in the pool of the session replayed with ``np.random.default_rng(seed)`` (its first draw
    is the test split, as in :func:`raresift.simulate.replay`)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    test = perm[: round(test_fraction * len(y))]
    return int(y.sum() - y[test].sum())


def found_at(curve: list[dict], key: str = "positives_found_mean") -> dict[int, float]:
    return {int(p["labels"]): float(p[key]) for p in curve if int(p["labels"]) in POINTS}


class Cache:
    """JSON results under a folder, keyed by a hash of everything that determines them."""

    def __init__(self, folder: Path, fresh: bool):
        self.folder, self.fresh = folder, fresh
        folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, key: object, compute: Callable[[], dict]) -> dict:
        h = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = self.folder / f"{name.replace('/', '_')}-{h}.json"
        if path.exists() and not self.fresh:
            return json.loads(path.read_text())
        out = compute()
        path.write_text(json.dumps(out, indent=1) + "\n")
        return out


def kmeans_picks(levels: list[tuple[np.ndarray, np.ndarray]], cand: np.ndarray, labelled: np.ndarray, n: int,
                 rng: np.random.Generator) -> np.ndarray:
    """raresift 0.1's explorer, kept for the reference rows: ``levels`` are k-means clusterings (cluster id,
    distance to the centre per row), coarse first; from each level, the most central candidate of every
    cluster without a labelled or picked photo, clusters in random order; random candidates fill up."""
    n = min(n, len(cand))
    picks: list[int] = []
    taken = np.zeros(len(cand), dtype=bool)
    for ids, dist in levels:
        if len(picks) >= n:
            break
        cid = ids[cand]
        covered = np.union1d(ids[labelled], cid[taken])
        open_ = np.setdiff1d(np.unique(cid[~taken]), covered)
        rng.shuffle(open_)
        if not len(open_):
            continue
        free = np.flatnonzero(~taken)
        order = free[np.lexsort((dist[cand[free]], cid[free]))]  # by cluster, most central first
        first = np.r_[0, np.flatnonzero(np.diff(cid[order])) + 1]
        central = dict(zip(cid[order[first]].tolist(), order[first].tolist()))
        for c in open_[: n - len(picks)].tolist():
            picks.append(central[c])
            taken[central[c]] = True
    if len(picks) < n:
        rest = np.flatnonzero(~taken)
        picks += rng.choice(rest, size=n - len(picks), replace=False).tolist()
    return np.array(picks, dtype=np.int64)


# ---------------------------------------------------------------------------------------- explorers
@dataclass
class Explorer:
    """A way to explore without any hint: ``build(ctx)`` precomputes levels ``[(group id, priority)]`` of the
    collection's rows; ``pick(levels, cand, labelled, n, rng)`` stands in for ``explore_picks``."""

    name: str
    about: str
    build: Callable[[dict], list[tuple[np.ndarray, np.ndarray]]]
    pick: Callable = kmeans_picks


def knn(X: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest other rows of every row by cosine similarity (rows are unit length): (index, similarity),
    most similar first."""
    n = len(X)
    idx = np.empty((n, k), dtype=np.int32)
    sim = np.empty((n, k), dtype=np.float32)
    for s in range(0, n, block):
        S = X[s : s + block] @ X.T
        S[np.arange(len(S)), np.arange(s, s + len(S))] = -np.inf
        part = np.argpartition(-S, k, axis=1)[:, :k]
        ps = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-ps, axis=1)
        idx[s : s + block] = np.take_along_axis(part, order, axis=1)
        sim[s : s + block] = np.take_along_axis(ps, order, axis=1)
    return idx, sim


def explore_by_priority(levels: list[tuple[np.ndarray, np.ndarray]], cand: np.ndarray, labelled: np.ndarray, n: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Like ``explore_picks``, but the open groups of a level come in order of priority, not at random.

    ``levels``: ``[(group id per row, priority per row)]``; a lower priority is picked first; group id
    -1 = in no group. From each level in turn: the groups that hold no labelled photo and none picked
    in this batch, in order of their best (lowest) candidate priority; that candidate is taken. Random
    candidates fill up when every group is covered.
    """
    n = min(n, len(cand))
    picks: list[int] = []
    taken = np.zeros(len(cand), dtype=bool)
    for ids, prio in levels:
        if len(picks) >= n:
            break
        cid = ids[cand]
        covered = set(np.unique(ids[labelled]).tolist())
        free = np.flatnonzero((cid >= 0) & ~taken)
        jitter = rng.random(len(free))
        order = free[np.lexsort((jitter, prio[cand[free]]))]  # best priority first, ties at random
        for pos in order.tolist():
            c = int(cid[pos])
            if c in covered:
                continue
            covered.add(c)
            picks.append(pos)
            taken[pos] = True
            if len(picks) >= n:
                break
    if len(picks) < n:
        rest = np.flatnonzero(~taken)
        picks += rng.choice(rest, size=n - len(picks), replace=False).tolist()
    return np.array(picks, dtype=np.int64)


def explore_farthest(levels: list[tuple[np.ndarray, np.ndarray]], cand: np.ndarray, labelled: np.ndarray, n: int,
                     rng: np.random.Generator, *, X: np.ndarray) -> np.ndarray:
    """Farthest-point (k-centre) coverage: each pick is the candidate least similar to every photo labelled
    or picked so far; the first of a session is the most central photo of the collection (``levels[0]``)."""
    n = min(n, len(cand))
    Xc = X[cand]
    best = np.full(len(cand), -np.inf, dtype=np.float32)
    if len(labelled):
        for s in range(0, len(labelled), 512):
            best = np.maximum(best, (Xc @ X[labelled[s : s + 512]].T).max(axis=1))
    picks: list[int] = []
    for _ in range(n):
        if np.isfinite(best).any():
            pos = int(np.argmin(np.where(np.isfinite(best), best, np.inf)))
        else:
            pos = int(np.argmin(levels[0][1][cand]))
        picks.append(pos)
        best = np.maximum(best, Xc @ Xc[pos])
        best[pos] = np.inf
    return np.array(picks, dtype=np.int64)


def _ranked_groups(ids: np.ndarray, score: np.ndarray, central: np.ndarray) -> np.ndarray:
    """Priority per row for :func:`explore_by_priority`: the rank of its group's score (lower first), plus
    the row's centrality in [0, 0.5) so the most central member of a group comes first."""
    groups = np.unique(ids[ids >= 0])
    rank = np.full(int(ids.max()) + 1, np.inf)
    rank[groups[np.argsort(score[groups], kind="stable")]] = np.arange(len(groups))
    c = (central - central.min()) / (np.ptp(central) or 1.0)
    prio = np.where(ids >= 0, rank[np.maximum(ids, 0)] + 0.5 * c, np.inf)
    return prio.astype(np.float64)


def kmeans_by(ctx: dict, k: int, order: str) -> tuple[np.ndarray, np.ndarray]:
    """One k-means level (``cluster_features`` with k clusters) with its groups ordered by size or tightness."""
    ids, dist = ctx["kmeans"](k)
    size = np.bincount(ids, minlength=k).astype(float)
    if order == "size":
        score = size
    else:  # tightness: the mean distance of its members to the centre (singletons last)
        score = np.bincount(ids, weights=dist, minlength=k) / np.maximum(size, 1)
        score[size < 2] = np.inf
    return ids, _ranked_groups(ids, score, dist)


def hdbscan_groups(ctx: dict, *, dims: int = 64, min_cluster_size: int = 5, min_samples: int = 5) -> np.ndarray:
    """HDBSCAN clusters of the features reduced by PCA (group id per row, -1 = noise)."""
    from sklearn.cluster import HDBSCAN

    key = ("hdbscan", dims, min_cluster_size, min_samples)
    if key not in ctx["memo"]:
        Z = ctx["pca"](dims)
        ctx["memo"][key] = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit(Z).labels_
    return ctx["memo"][key]


def groups_by(ids: np.ndarray, Z: np.ndarray, order: str, rng_seed: int = 0) -> np.ndarray:
    """Priority per row for groups ``ids`` (-1 = none): groups ordered by ``order`` ('size' ascending, 'random'),
    within a group the row closest to the group's mean first."""
    k = int(ids.max()) + 1
    ok = ids >= 0
    size = np.bincount(ids[ok], minlength=k).astype(float)
    centre = np.zeros((k, Z.shape[1]))
    np.add.at(centre, ids[ok], Z[ok])
    centre /= np.maximum(size, 1)[:, None]
    central = np.full(len(ids), np.inf)
    central[ok] = ((Z[ok] - centre[ids[ok]]) ** 2).sum(axis=1)
    if order == "size":
        score = size
    else:
        score = np.random.default_rng(rng_seed).random(k)
    prio = _ranked_groups(np.where(ok, ids, -1), score, np.where(ok, central, 0.0))
    return np.where(ok, prio, np.inf)


def scored(ctx: dict, score: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One level: the k-means groups (k clusters) ordered by their best row's score (lower first)."""
    ids, _ = ctx["kmeans"](k)
    return [(ids, score.astype(np.float64))]


def knn_counts(ctx: dict, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """NNDB-style density (He & Carbonell): the radius r = median distance to the k-th neighbour; per row the
    number of rows within r, and its rare-category score max over its k neighbours of (n_i - n_j)."""
    idx, sim = ctx["knn"](100)
    d = 1.0 - sim  # cosine distance, ascending
    r = float(np.median(d[:, k - 1]))
    n_i = (d <= r).sum(axis=1).astype(float)
    score = (n_i[:, None] - n_i[idx[:, :k]]).max(axis=1)
    return n_i, score


def hdbscan_leaf(ctx: dict, *, dims: int = 64, min_cluster_size: int = 5, min_samples: int = 5) -> np.ndarray:
    """HDBSCAN's leaf clusters (the finest clusters of its tree) of the PCA-reduced features."""
    from sklearn.cluster import HDBSCAN

    key = ("hdbscan-leaf", dims, min_cluster_size, min_samples)
    if key not in ctx["memo"]:
        ctx["memo"][key] = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True,
                                   cluster_selection_method="leaf").fit(ctx["pca"](dims)).labels_
    return ctx["memo"][key]


def traversal(ctx: dict, steps: int = 1500) -> np.ndarray:
    """Farthest-point (k-centre) traversal of the collection, precomputed: rank per row (inf past ``steps``).
    It starts at the row nearest the mean; each next row is the one least similar to all rows before it."""
    if ("fp", steps) in ctx["memo"]:
        return ctx["memo"][("fp", steps)]
    X = ctx["X"]
    n = len(X)
    mean = X.mean(axis=0)
    first = int(np.argmax(X @ mean))
    best = X @ X[first]
    rank = np.full(n, np.inf)
    rank[first] = 0
    best[first] = np.inf
    for r in range(1, min(steps, n)):
        i = int(np.argmin(best))
        rank[i] = r
        np.maximum(best, X @ X[i], out=best)
        best[i] = np.inf
    ctx["memo"][("fp", steps)] = rank
    return rank


def singletons(prio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A level where every row is its own group, picked in order of ``prio``."""
    ids = np.arange(len(prio), dtype=np.int64)
    return ids, prio


def hdb_level(ctx: dict, leaf: bool = False, order: str = "size") -> tuple[np.ndarray, np.ndarray]:
    ids = hdbscan_leaf(ctx) if leaf else hdbscan_groups(ctx)
    return ids, groups_by(ids, ctx["pca"](64), order)


def rare_group_levels(X: np.ndarray, *, seed: int = 0, sample: int = 20000, dims: int = 128,
                      min_cluster_size: int = 8, min_samples: int = 3, fine: int = 20, max_fine: int = 1024
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The recommended precomputation, written as it would go into ``raresift.learn.coldstart``: two levels
    ``[(group id per row, priority per row)]`` for :func:`explore_by_priority` (lower priority first).

    1. Small groups first: PCA to ``dims`` dimensions and HDBSCAN (``min_cluster_size``, ``min_samples``,
       excess-of-mass selection) on a random sample of at most ``sample`` rows; every other row joins the
       group of its nearest sampled row (noise stays -1). The groups are ranked by size, smallest first
       (ties in random order, seeded); a row's priority is its group's rank plus 0.5 x its distance to
       the group's mean (scaled to [0, 1)), so the photo nearest the mean is picked from each group.
    2. Then the k-means clusters of :func:`cluster_features` (n / ``fine`` clusters, at most ``max_fine``)
       in random order (seeded), the photo nearest the centre of each.
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    n = len(X)
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    pca = PCA(min(dims, X.shape[1], len(fit_rows)), random_state=seed).fit(np.asarray(X[fit_rows], dtype=np.float32))
    Z = pca.transform(np.asarray(X, dtype=np.float32)).astype(np.float32)
    lab = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit(Z[fit_rows]).labels_
    ids = np.full(n, -1, dtype=np.int64)
    ids[fit_rows] = lab
    rest = np.setdiff1d(np.arange(n), fit_rows)
    if len(rest):  # the nearest sampled row's group
        import faiss

        index = faiss.IndexFlatL2(Z.shape[1])
        index.add(np.ascontiguousarray(Z[fit_rows]))
        _, nearest = index.search(np.ascontiguousarray(Z[rest]), 1)
        ids[rest] = lab[nearest[:, 0]]
    levels = []
    if (ids >= 0).any():
        k = int(ids.max()) + 1
        ok = ids >= 0
        size = np.bincount(ids[fit_rows][ids[fit_rows] >= 0], minlength=k).astype(float)
        centre = np.zeros((k, Z.shape[1]))
        np.add.at(centre, ids[ok], Z[ok])
        centre /= np.maximum(np.bincount(ids[ok], minlength=k), 1)[:, None]
        central = np.zeros(n)
        central[ok] = ((Z[ok] - centre[ids[ok]]) ** 2).sum(axis=1)
        score = size + 0.5 * rng.random(k)  # smallest first, ties at random
        levels.append((ids, np.where(ok, _ranked_groups(ids, score, central), np.inf)))
    km_ids, dist = cluster_features(X, n_clusters=max(2, min(max_fine, n // fine)), seed=seed)
    order = rng.random(int(km_ids.max()) + 1)
    levels.append((km_ids.astype(np.int64), _ranked_groups(km_ids, order, dist)))
    return levels


def explorers() -> list[Explorer]:
    def n20(ctx):
        return max(2, len(ctx["X"]) // 20)

    return [
        Explorer("shipped", "raresift's explorer (`explore_levels` fitted on the simulated collection only, "
                 "`explore_picks`): HDBSCAN groups smallest first, then n/20 k-means clusters in stratified order; "
                 "on the whole photo's vectors (of a tiled photo's feature, its whole-photo part)",
                 lambda ctx: ctx["shipped"](), explore_picks),
        Explorer("tiled-feature", "the same on the head's whole feature (whole photo, tiles' mean and max: "
                 "what raresift explored before December 2 2026; on a whole-photo project the same as shipped)",
                 lambda ctx: explore_levels(ctx["X"], seed=0), explore_picks),
        Explorer("shipped-random-order", "the same with the k-means clusters in random order (stratified=False)",
                 lambda ctx: explore_levels(ctx["X"], seed=0, stratified=False), explore_picks),
        Explorer("shipped-project", "the same, fitted on the whole project (all 9,144 photos, the class's other photos "
                 "too): what `simulate` explores", lambda ctx: ctx["project_levels"], explore_picks),
        Explorer("kmeans-collection", "the same, k-means levels fitted on the simulated collection only "
                 "(`cluster_levels(X)`)", lambda ctx: cluster_levels(ctx["X"], seed=0)),
        Explorer("kmeans-n/10", "one level of n/10 k-means clusters (~870, ~10 photos each), random order",
                 lambda ctx: [ctx["kmeans"](max(2, len(ctx["X"]) // 10))]),
        Explorer("kmeans-n/20-small-first", "one level of n/20 k-means clusters, smallest clusters first",
                 lambda ctx: [kmeans_by(ctx, n20(ctx), "size")], explore_by_priority),
        Explorer("kmeans-n/20-tight-first", "one level of n/20 k-means clusters, lowest mean distance to the centre first",
                 lambda ctx: [kmeans_by(ctx, n20(ctx), "tight")], explore_by_priority),
        Explorer("farthest-point", "k-centre coverage: the candidate least similar to every labelled or picked photo",
                 lambda ctx: cluster_levels(ctx["X"], seed=0)[:1], None),
        Explorer("nndb-density-drop", "rare-category score max_j(n_i - n_j) over the 10 nearest neighbours (n = rows "
                 "within the median 10-NN radius), highest first, one per n/20 k-means cluster",
                 lambda ctx: scored(ctx, -knn_counts(ctx)[1], n20(ctx)), explore_by_priority),
        Explorer("low-density-first", "lowest kNN density (mean similarity to the 10 nearest) first, one per n/20 k-means "
                 "cluster", lambda ctx: scored(ctx, ctx["knn"](100)[1][:, :10].mean(axis=1), n20(ctx)),
                 explore_by_priority),
        Explorer("hdbscan-random", "HDBSCAN clusters (PCA 64, min cluster 5) in random order, the most central photo; "
                 "then the collection's k-means levels",
                 lambda ctx: [(hdbscan_groups(ctx), groups_by(hdbscan_groups(ctx), ctx["pca"](64), "random"))]
                 + _as_priority(cluster_levels(ctx["X"], seed=0)), explore_by_priority),
        Explorer("hdbscan-small-first", "HDBSCAN clusters (PCA 64, min cluster 5), smallest first, the most central "
                 "photo; then the collection's k-means levels",
                 lambda ctx: [(hdbscan_groups(ctx), groups_by(hdbscan_groups(ctx), ctx["pca"](64), "size"))]
                 + _as_priority(cluster_levels(ctx["X"], seed=0)), explore_by_priority),
        Explorer("farthest-order", "the farthest-point traversal of the whole collection precomputed (from the "
                 "photo nearest the mean), candidates picked in its order",
                 lambda ctx: [singletons(traversal(ctx))], explore_by_priority),
        Explorer("hdbscan-leaf-small-first", "HDBSCAN leaf clusters (the finest of its tree), smallest first; then "
                 "the farthest-point order", lambda ctx: [hdb_level(ctx, leaf=True), singletons(traversal(ctx))],
                 explore_by_priority),
        Explorer("hdbscan+farthest", "HDBSCAN clusters smallest first, then the farthest-point order",
                 lambda ctx: [hdb_level(ctx), singletons(traversal(ctx))], explore_by_priority),
        Explorer("shipped+concepts", "the shipped levels with a level between them: photos grouped by the whole "
                 "photo's most likely ImageNet class (groups of 3 or more, smallest first, the most confident photo)",
                 lambda ctx: [ctx["shipped"]()[0], concept_level(ctx, 3), *ctx["shipped"]()[1:]], explore_picks),
        Explorer("concepts+shipped", "the ImageNet-class groups first (as shipped+concepts), then the shipped levels",
                 lambda ctx: [concept_level(ctx, 3), *ctx["shipped"]()], explore_picks),
        Explorer("hdbscan+leaf+farthest", "HDBSCAN clusters smallest first, then its leaf clusters smallest first, "
                 "then the farthest-point order",
                 lambda ctx: [hdb_level(ctx), hdb_level(ctx, leaf=True), singletons(traversal(ctx))],
                 explore_by_priority),
    ]


def concept_level(ctx: dict, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One level for ``explore_picks``: the rows grouped by the whole photo's most likely ImageNet class (groups
    of at least ``min_size`` rows, smallest first, ties at random), the most confident row of each first."""
    top, logp = ctx["concepts"]
    count = np.bincount(top, minlength=int(top.max()) + 1)
    ids = np.where(count[top] >= min_size, top, -1).astype(np.int64)
    order = count + 0.5 * np.random.default_rng(0).random(len(count))
    return ids, _ranked_groups(ids, order, -logp.astype(np.float64)).astype(np.float32)


def whole_part(X: np.ndarray, dim: int = 1280) -> np.ndarray:
    """The whole photo's part of tiled features (whole, mean, max; Lite2's 1280-d each), unit length; whole-photo
    features as they are."""
    if X.shape[1] != 3 * dim:
        return X
    part = np.ascontiguousarray(X[:, :dim], dtype=np.float32)
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def _as_priority(levels: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-means levels (id, distance) for :func:`explore_by_priority`: clusters in random order, most central first."""
    out = []
    for ids, dist in levels:
        score = np.random.default_rng(0).random(int(ids.max()) + 1)
        out.append((ids, _ranked_groups(ids, score, dist)))
    return out


def context(X: np.ndarray, project_levels: list, concepts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """What explorers may precompute from: the collection's features (never the answer key), memoised."""
    memo: dict = {}

    def kmeans(k: int):
        if ("km", k) not in memo:
            memo[("km", k)] = cluster_features(X, n_clusters=k, seed=0)
        return memo[("km", k)]

    def knn_(k: int):
        if ("knn", k) not in memo:
            memo[("knn", k)] = knn(X, k)
        return memo[("knn", k)]

    def pca(d: int):
        if ("pca", d) not in memo:
            from sklearn.decomposition import PCA

            memo[("pca", d)] = PCA(d, random_state=0).fit_transform(X).astype(np.float32)
        return memo[("pca", d)]

    def shipped():
        # raresift's explorer fitted on the collection's whole-photo vectors: several variants build on it
        if "shipped" not in memo:
            memo["shipped"] = explore_levels(whole_part(X), seed=0)
        return memo["shipped"]

    return {"X": X, "project_levels": project_levels, "memo": memo, "kmeans": kmeans, "knn": knn_, "pca": pca,
            "concepts": concepts, "shipped": shipped}


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def exploring_with(pick: Callable):
    """Replace the session's explorer for the length of a replay."""
    old = session_module.explore_picks
    session_module.explore_picks = pick
    try:
        yield
    finally:
        session_module.explore_picks = old


def replay_explorer(data: SimulationData, pick: Callable, *, repeats: int, seed: int, budget: int) -> dict:
    """``repeats`` sessions without a hint (session r replays with ``default_rng(seed + r)``, as ``simulate``):
    positives found per reporting point, per session, and the labels until the first positive."""
    runs = []
    with exploring_with(pick):
        for r in range(repeats):
            runs.append(replay(data, protocol="default", rng=np.random.default_rng(seed + r), k=None, budget=budget))
    firsts = [first_hit(run, data.y, budget) for run in runs]
    return {"found": [{str(p["labels"]): p["found"] for p in run["points"]} for run in runs], "first": firsts,
            "after": [found_after_first(run, data.y, first, budget) for run, first in zip(runs, firsts)]}


def found_after_first(run: dict, y: np.ndarray, first: int, budget: int, within: int = 100) -> int | None:
    """Positives found within ``within`` labels after the first one (at label ``first``, :func:`first_hit`; None
    when none was found): how well the head follows up a positive, whatever it took to find it."""
    if first > budget:
        return None
    found = np.cumsum(y[np.concatenate([np.asarray(r["rows"], dtype=np.int64) for r in run["rounds"]])])
    return int(found[min(first - 1 + within, len(found) - 1)])


def first_hit(run: dict, y: np.ndarray, budget: int) -> int:
    """Labels spent until the first positive (budget + 1 when none was found)."""
    n = 0
    for rnd in run["rounds"]:
        ys = y[np.asarray(rnd["rows"], dtype=np.int64)]
        if ys.any():
            return n + int(np.flatnonzero(ys)[0]) + 1
        n += len(ys)
    return budget + 1


def class_data(project: Path, key: Path) -> tuple[np.ndarray, np.ndarray, list, tuple[np.ndarray, np.ndarray]]:
    """X and y of the simulated collection as ``simulate`` builds them (embedded rows in the key), the
    project's own k-means levels restricted to those rows (what ``simulate`` explores), and each row's
    whole-photo most likely ImageNet class and its log-probability (the compact layout's records)."""
    with Project.open(project) as p:
        mask = p.embedded_mask()
        y_all, _ = load_truth(p.image_ids(), truth=key)
        rows = np.flatnonzero(mask[: len(y_all)] & (y_all >= 0))
        X = gather(p.vectors(), rows)
        levels = [(ids[rows], dist[rows]) for ids, dist in project_clusters(p.store)]
        logits = p.imagenet_logits()
        if logits is not None and logits.dtype.names:
            rec = np.asarray(logits[rows])
            concepts = (rec["c"][:, 0, 0].astype(np.int64), rec["lp"][:, 0, 0].astype(np.float32))
        elif logits is not None:
            z = np.asarray(logits[rows, 0, :], dtype=np.float32)  # the whole photo's view
            top = z.argmax(axis=1)
            concepts = (top.astype(np.int64), (z[np.arange(len(z)), top] - log_sum_exp(z)).astype(np.float32))
        else:
            concepts = None
    return X, y_all[rows].astype(np.int64), levels, concepts


def mean_table(rows: list[tuple[str, list[dict]]], pool: float, first: dict[str, list[int]] | None = None) -> str:
    """Markdown: per row, mean positives found after each reporting point (over classes and repeats)."""
    head = "| | " + " | ".join(f"after {p}" for p in POINTS) + (" | labels to 1st positive (median; mean) | sessions with none by 300 |" if first else " | sessions |")
    lines = [head, "|---" * (len(POINTS) + (3 if first else 2)) + "|"]
    for name, sessions in rows:
        cells = []
        for p in POINTS:
            v = [s[str(p)] for s in sessions if str(p) in s]
            cells.append(f"{np.mean(v):.2f}" if v else "-")
        if first:
            f = np.array(first[name])
            miss = int((f > 300).sum())
            cells += [f"{np.median(f):.0f}; {np.mean(np.minimum(f, 301)):.0f}", f"{miss} of {len(f)}"]
        else:
            cells.append(str(len(sessions)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"| (pool positives) | {pool:.2f} | | | |" + (" | |" if first else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the project, answer keys and results")
    ap.add_argument("--images", type=Path, default=PREFERRED if PREFERRED.is_dir() else DEFAULT_IMAGES)
    ap.add_argument("--classes", type=int, default=20, help="classes to draw (half with an ImageNet concept)")
    ap.add_argument("--min-photos", type=int, default=40)
    ap.add_argument("--positives", type=int, default=20, help="photos of the class in the answer key")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=None, help="comma-separated explorer names (default: all)")
    ap.add_argument("--skip-starts", action="store_true", help="only the explorers (part 2)")
    ap.add_argument("--tiles", type=int, default=0,
                    help="the project's tiles: 0 = whole photo only (WORK/caltech), N = raresift's default "
                         "N x N tiles, kept compact (WORK/caltech-tilesN)")
    ap.add_argument("--fresh", action="store_true", help="recompute everything, ignoring stored results")
    args = ap.parse_args(argv)
    t0 = time.time()
    threadpool_limits(1)  # a fair share of a shared machine
    project = args.work / ("caltech" if not args.tiles else f"caltech-tiles{args.tiles}")
    ensure_project(project, args.images, args.tiles)
    cache = Cache(args.work / "results", args.fresh)
    with Project.open(project) as p:
        mask = p.embedded_mask()
        ids = p.image_ids()
        n_photos = int(mask.sum())
    with_c, without = choose_classes([ids[i] for i in np.flatnonzero(mask)], args.classes, args.min_photos, args.seed)
    classes = with_c + without
    keys = {c: make_key(c, ids, args.images, args.work / "keys", args.seed, args.positives) for c in classes}
    settings = {"budget": args.budget, "repeats": args.repeats, "seed": args.seed, "positives": args.positives,
                "photos": n_photos}
    if args.tiles:  # (whole-photo results stored before this option keep their keys)
        settings["tiles"] = args.tiles
        settings["part_weights"] = dict(PART_WEIGHTS)
    print(f"# Cold starts on Caltech-101: {args.positives} photos of a class among the other classes' photos\n")
    how = "--tiles 0` (whole photo only)" if not args.tiles else f"--tiles {args.tiles}` (raresift's default layout)"
    print(f"Project: {n_photos} photos embedded with `raresift embed {how}. Per class the "
          f"answer key holds every photo of the other classes (0) and {args.positives} of the class (1); one more "
          f"photo of the class is the outside example. Sessions: `simulate(protocol='default', budget={args.budget}, "
          f"repeats={args.repeats}, seed={args.seed}, k=None)`.\n")
    print(f"Classes with an ImageNet concept ({len(with_c)}): {', '.join(with_c)}  ")
    print(f"Classes without ({len(without)}): {', '.join(without)}\n")

    pool = {}
    data = {}
    for c in classes:
        X, y, levels, concepts = class_data(project, keys[c][0])
        data[c] = (X, y, levels, concepts)
        pool[c] = [pool_positives(y, args.seed + r) for r in range(args.repeats)]
    photos = {c: len(data[c][1]) for c in classes}
    mean_pool = float(np.mean([v for c in classes for v in pool[c]]))
    print(f"Collection per class: {min(photos.values())}-{max(photos.values())} photos, {args.positives} positives "
          f"(1 in {np.mean([photos[c] for c in classes]) / args.positives:.0f}); pool positives per session "
          f"(60% pool): mean {mean_pool:.2f}, range {min(min(v) for v in pool.values())}-"
          f"{max(max(v) for v in pool.values())}.\n")

    # ------------------------------------------------------------------ part 1: start kinds
    if not args.skip_starts:
        per_kind: dict[str, list[dict]] = {k: [] for k in KINDS}
        per_class: dict[str, dict[str, dict[int, float]]] = {}
        for c in classes:
            key, example = keys[c]
            per_class[c] = {}
            for kind in KINDS:
                if kind == "text" and c not in with_c:
                    continue
                opts = {"query": c.replace("_", " ")} if kind == "text" else {"examples": [str(example)]} \
                    if kind == "example" else {}

                def run(opts=opts, key=key):
                    res = simulate(project=project, truth=key, protocol="default", budget=args.budget,
                                   repeats=args.repeats, seed=args.seed, k=None, **opts)
                    return {"curve": res["curve"], "photos": res["photos"], "positives": res["positives"],
                            "concepts": res["concepts"]}

                res = cache.get(f"start-{c}-{kind}", [settings, c, kind, opts, str(key)], run)
                f = found_at(res["curve"])
                per_class[c][kind] = f
                per_kind[kind].append({str(p): v for p, v in f.items()})
        print("## Start kinds: mean positives found (of the pool positives) after N labels\n")
        print("Means over classes and repeats (each class's mean over its repeats, then over classes).\n")
        rows = [(f"{k} ({len(per_kind[k])} classes)", per_kind[k]) for k in KINDS]
        rows.insert(1, ("text's classes, example", [{str(p): v for p, v in per_class[c]["example"].items()}
                                                      for c in with_c]))
        rows.insert(2, ("text's classes, none", [{str(p): v for p, v in per_class[c]["none"].items()} for c in with_c]))
        print(mean_table(rows, mean_pool).replace(" | sessions |", " | classes |"))
        print("\nPer class (found after 50 / 100 / 200 / 300 labels; pool positives per repeat):\n")
        print("| class | concept | pool positives | text | example | none |")
        print("|---|---|---|---|---|---|")
        for c in classes:
            cells = []
            for kind in KINDS:
                f = per_class[c].get(kind)
                cells.append(" / ".join(f"{f[p]:.1f}" for p in POINTS if p in f) if f else "-")
            print(f"| {c} | {'yes' if c in with_c else 'no'} | {', '.join(map(str, pool[c]))} | " + " | ".join(cells) + " |")
        print()

    # ------------------------------------------------------------------ part 2: explorers
    chosen = explorers()
    if args.variants:
        names = [v.strip() for v in args.variants.split(",")]
        chosen = [e for e in chosen if e.name in names]
    results: dict[str, list[dict]] = {e.name: [] for e in chosen}
    firsts: dict[str, list[int]] = {e.name: [] for e in chosen}
    afters: dict[str, list[int]] = {e.name: [] for e in chosen}
    by_class: dict[str, dict[str, list[dict]]] = {e.name: {} for e in chosen}
    for c in classes:
        X, y, levels, concepts = data[c]
        ctx = context(X, levels, concepts)
        for e in chosen:
            src = inspect.getsource(e.build) + (inspect.getsource(e.pick) if e.pick is not None else "")
            code = hashlib.sha1((src + e.about).encode()).hexdigest()

            def run(e=e):
                lv = e.build(ctx)
                pick = e.pick if e.pick is not None else functools.partial(explore_farthest, X=X)
                tt = time.time()
                out = replay_explorer(SimulationData(X, y, prior=None, clusters=lv), pick, repeats=args.repeats,
                                      seed=args.seed, budget=args.budget)
                out["seconds"] = time.time() - tt
                return out

            res = cache.get(f"explore-{c}-{e.name}", [settings, c, e.name, code, str(keys[c][0])], run)
            results[e.name] += res["found"]
            firsts[e.name] += res["first"]
            afters[e.name] += [a for a in res.get("after", []) if a is not None]
            by_class[e.name][c] = res["found"]
        print(f"<!-- {c} done, {time.time() - t0:.0f} s -->", file=sys.stderr)
    print("## Explorers without any hint: mean positives found after N labels\n")
    print("Means over sessions (classes x repeats); the same test split per class and repeat for every variant.\n")
    print(mean_table([(e.name, results[e.name]) for e in chosen], mean_pool, firsts))
    print("\nFound within 100 labels after the first positive (sessions that found one): "
          + ", ".join(f"{e.name} {np.mean(afters[e.name]):.2f}" for e in chosen if afters[e.name]) + ".")
    print("\n| variant | what it does |\n|---|---|")
    for e in chosen:
        print(f"| {e.name} | {e.about} |")
    print("\nPer class, found after 100 / 300 labels (mean over repeats):\n")
    print("| class | " + " | ".join(e.name for e in chosen) + " |")
    print("|---" * (len(chosen) + 1) + "|")
    for c in classes:
        cells = []
        for e in chosen:
            f = by_class[e.name][c]
            cells.append(f"{np.mean([s.get('100', np.nan) for s in f]):.1f} / {np.mean([s.get('300', np.nan) for s in f]):.1f}")
        print(f"| {c} | " + " | ".join(cells) + " |")
    print(f"\n_{time.time() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
