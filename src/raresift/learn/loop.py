"""One labelling round on a project: retrain on all labels, score, pick the next photos, record it.

The pure parts (features, head, strategies, cold start) live beside this module; here they are
wired to a :class:`~raresift.project.Project`: labels come from its database, the round and its
queue are recorded there, and scoring streams over the vector memory map block by block.

Only labels of the *pool* split train the model; labels of the test split are kept for
:func:`raresift.evaluate.evaluate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, NotReadyError
from .coldstart import (
    cluster_levels,
    concepts_for,
    example_scores,
    explore_picks,
    text_scores,
)
from .features import DEFAULT_POOLING, PART_WEIGHTS, featurize, gather, iter_blocks
from .model import HEAD_DEFAULTS, Scorer, fit_scorer, sigmoid, standardise
from .strategies import get_strategy

if TYPE_CHECKING:
    from ..project import Project

__all__ = ["DEFAULT_BATCH", "PURPOSES", "Model", "next_batch", "pending", "scores", "train"]

DEFAULT_BATCH = 25
PURPOSES = ("label", "evaluate")
_META_QUERY = "learn.query"
_META_EXAMPLES = "learn.examples"
_CACHE_DIR = "learn"


class _Features:
    """Row-indexable features of a project, computed on demand from the vector memory map."""

    def __init__(self, vectors: np.ndarray, pooling: str):
        self.vectors = vectors
        self.pooling = pooling

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            return featurize(self.vectors[rows], self.pooling)
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return gather(self.vectors, rows, self.pooling)


class _Rows:
    """Features of candidate i = features of row rows[i] (lazy; strategies index single photos)."""

    def __init__(self, features: Any, rows: np.ndarray):
        self.features = features
        self.rows = rows

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.features[self.rows[int(i)]]).reshape(-1)


class Model:
    """The model of a project at one moment: a trained scorer plus the cold-start prior it fuses."""

    def __init__(self, project: Project, scorer: Scorer, prior: np.ndarray | None, prior_kind: str | None,
                 pooling: str, *, labels: np.ndarray, splits: np.ndarray, mask: np.ndarray):
        self.project = project
        # The project's state when the model was trained (read once: each read scans every image row).
        self.labels, self.splits, self.mask = labels, splits, mask
        self.scorer = scorer
        self.prior = prior
        self.prior_kind = prior_kind
        self.pooling = pooling

    def logits(self, *, rng: np.random.Generator | None = None) -> np.ndarray:
        """Scores (log-odds scale) of every row; -inf where not embedded.

        With one view per photo and a fitted head this is the fast path of
        :mod:`raresift.scale.scoring` (one BLAS product per block on cached features, the same
        values as featurising every block); otherwise every block is featurised and scored.
        """
        if self.scorer.fitted:
            z = self._linear_logits()
            if z is not None:
                return z
        return self._block_logits(rng=rng)

    def _linear_logits(self) -> np.ndarray | None:
        """``unit(sqrt(x)) . w + b`` (+ the prior) for every row from cached signed-square-root features
        and their norms (written once per vector file beside it); None where that does not apply
        (tiles, a head that is not linear) or the cache cannot be written (read-only project)."""
        from ..scale import scoring

        head = self.scorer.head
        vectors = self.project.vectors()
        mask = self.mask
        # featurize() with one view: unit(signed square root of the whole-photo vector), for any pooling.
        if vectors.ndim != 3 or vectors.shape[1] != 1 or not hasattr(head, "coef_") or len(mask) > len(vectors):
            return None
        if np.ndim(head.coef_) != 1 or len(head.coef_) != vectors.shape[2]:
            return None
        try:
            norms = scoring.row_norms(self.project, vectors, power=True)
            feats = scoring.whole_features(self.project, vectors, power=True)
        except OSError:
            return None
        z = scoring.linear_scores(feats[: len(mask)], head.coef_, head.intercept_, norms[: len(mask)])
        if self.prior is not None and self.scorer.prior_weight:
            prior = np.nan_to_num(np.asarray(self.prior[: len(mask)], dtype=np.float32), nan=0.0)
            z += np.float32(self.scorer.prior_weight) * prior
        z[~mask] = -np.inf
        return z

    def _block_logits(self, *, rng: np.random.Generator | None = None) -> np.ndarray:
        mask = self.mask
        vectors = self.project.vectors()[: len(mask)]
        out = np.full(len(mask), -np.inf, dtype=np.float32)
        rng = rng or np.random.default_rng(0)
        for rows, block in iter_blocks(vectors):
            prior = None if self.prior is None else self.prior[rows]
            if self.scorer.fitted:
                out[rows] = self.scorer.score(featurize(block, self.pooling), prior)
            else:  # cold start: no features needed
                out[rows] = self.scorer.score(np.empty((len(rows), 0), np.float32), prior, rng=rng)
        out[~mask] = -np.inf
        return out


def _cache_key(project: Project, *parts: object) -> str:
    """Key of a cache derived from the vectors: the parts, the embedding settings, the feature
    weights and the vector file's stamp (any re-embedding or change of features refreshes it)."""
    try:
        st = (project.path / "embeddings" / "vectors.npy").stat()
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None
    text = json.dumps([list(parts), project.embedding_info(), PART_WEIGHTS, stamp], default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _prior(project: Project, *, pool_rows: np.ndarray, n_embedded: int) -> tuple[np.ndarray | None, str | None]:
    """The standardised cold-start prior of the project (text query or examples), cached on disk."""
    query = project.meta(_META_QUERY)
    examples = json.loads(project.meta(_META_EXAMPLES) or "[]")
    if not query and not examples:
        return None, None
    key = _cache_key(project, query, examples, n_embedded, DEFAULT_POOLING)
    cache = project.path / _CACHE_DIR / f"prior-{key}.npy"
    if cache.is_file():
        return np.load(cache), ("text" if query else "examples")
    parts = []
    if query:
        parts.append(standardise(text_scores(project, query), pool_rows))
    if examples:
        rows = np.array([project.image_id(e) - 1 for e in examples], dtype=np.int64)
        parts.append(standardise(example_scores(project, rows), pool_rows))
    prior = parts[0] if len(parts) == 1 else np.nanmax(np.stack(parts), axis=0)
    cache.parent.mkdir(exist_ok=True)
    for old in cache.parent.glob("prior-*.npy"):
        old.unlink(missing_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, prior)
    tmp.replace(cache)
    return prior, ("text" if query else "examples")


def _clusters(project: Project, pooling: str, n_embedded: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k-means clusterings of the collection (for exploring without query or examples), cached on disk."""
    key = _cache_key(project, n_embedded, pooling)
    cache = project.path / _CACHE_DIR / f"clusters-{key}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return [(f[f"ids{i}"], f[f"dist{i}"]) for i in range(int(f["levels"]))]
    levels = cluster_levels(_Features(project.vectors(), pooling), seed=0)
    cache.parent.mkdir(exist_ok=True)
    for old in cache.parent.glob("clusters-*.npz"):
        old.unlink(missing_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    arrays = {f"ids{i}": ids for i, (ids, _) in enumerate(levels)}
    arrays.update({f"dist{i}": dist for i, (_, dist) in enumerate(levels)})
    np.savez(tmp, levels=len(levels), **arrays)
    tmp.replace(cache)
    return levels


def _import_in_background(name: str) -> threading.Thread | None:
    """Start importing ``name`` in a daemon thread (SciPy's optimiser: 0.3-2 s of start-up); whoever
    imports it meanwhile waits for that import, never imports twice. None if it is imported already."""
    if name in sys.modules:
        return None

    def run() -> None:
        with contextlib.suppress(Exception):  # the caller's own import reports the error
            importlib.import_module(name)

    thread = threading.Thread(target=run, name=f"raresift-import-{name}", daemon=True)
    thread.start()
    return thread


def train(project: Project, *, seed: int | None = 0, head_params: dict | None = None) -> Model:
    """Fit the head on all current labels of the pool split (or fall back to the cold start)."""
    vectors = project.vectors()
    labels = project.label_array()
    if (labels == 1).any():  # a head will be fitted: import its solver while SQLite reads the splits
        _import_in_background("scipy.optimize")
    splits = project.splits()
    mask = project.embedded_mask()
    n = min(len(labels), vectors.shape[0])
    labels, splits, mask = labels[:n], splits[:n], mask[:n]
    pool = (splits == "pool") & mask
    lab = np.flatnonzero(pool & (labels >= 0))
    unl = np.flatnonzero(pool & (labels < 0))
    prior, prior_kind = _prior(project, pool_rows=np.flatnonzero(pool), n_embedded=int(mask.sum()))
    rng = np.random.default_rng(seed)
    scorer = fit_scorer(_Features(vectors, DEFAULT_POOLING), lab, labels[lab], unlabeled=unl,
                        has_prior=prior is not None, rng=rng, head_params=head_params)
    return Model(project, scorer, prior, prior_kind, DEFAULT_POOLING, labels=labels, splits=splits, mask=mask)


def scores(project: Project) -> np.ndarray:
    """The current model's probability of the rare class for every row (nan where not embedded).

    Before the labels hold both classes, these are the cold-start scores (text query / examples),
    or 0.5 everywhere when there is neither.
    """
    model = train(project)
    z = model.logits()
    if not model.scorer.fitted and model.prior is None:
        out = np.full(len(z), 0.5)
    else:
        out = sigmoid(z).astype(np.float64)
    out[~np.isfinite(z)] = np.nan
    return out


def _resolve_examples(project: Project, examples: list[str | int]) -> list[str]:
    mask = project.embedded_mask()
    out = []
    for e in examples:
        image_id = e if isinstance(e, int) else project.image_id(str(e))
        if image_id < 1 or image_id > len(mask) or not mask[image_id - 1]:
            raise InputError(f"example {e!r} is not an embedded photo of this project; give ids as `status` lists them")
        out.append(project.db.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()[0])
    return out


def next_batch(
    project: Project,
    n: int,
    *,
    strategy: str = "default",
    query: str | None = None,
    examples: list[str | int] | None = None,
    evaluate: bool = False,
    seed: int | None = None,
    who: str | None = None,
) -> list[dict[str, Any]]:
    """Retrain on all labels and choose the next ``n`` photos to label; the round is recorded.

    ``query`` (text) and ``examples`` (photo ids) set the cold start; they are remembered by the
    project and keep informing the ranking (with a weight that fades as labels come in). Without
    either, the default strategy starts by exploring: the most central photo of each k-means
    cluster of the collection that has no label yet.
    With ``evaluate`` the photos come from the test split: the unlabelled ones among the top ``n``
    of the test ranking (for precision@K), or, with ``strategy="random"``, ``n`` random test photos
    not drawn before (for the random baseline; the ones that already have a label are recorded
    but not returned). Returns one dict per photo: path, image_id, score, strategy, round, split.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InputError(f"--n must be a whole number of photos >= 1, got {n!r}")
    fn = get_strategy(strategy)
    if query is not None:
        if not concepts_for(query):
            raise InputError(
                f"no ImageNet concept matches {query!r}; the model only knows its 1,000 ImageNet classes; "
                "try other words, --examples, or start at random"
            )
        if project.logits() is None:
            raise NotReadyError("this project has no ImageNet logits (vectors from your own model); use --examples")
        project._set_meta(**{_META_QUERY: query})
    if examples:
        resolved = _resolve_examples(project, list(examples))
        project._set_meta(**{_META_EXAMPLES: json.dumps(resolved)})
        splits = project.splits()
        labels = project.label_array()
        new = [p for p in resolved if splits[project.image_id(p) - 1] == "pool" and labels[project.image_id(p) - 1] < 0]
        if new:  # an example is a positive the person already gave: keep it as a label
            project.label([(p, 1) for p in new], who=who, source="examples")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(seed)
    model = train(project, seed=seed)
    z = model.logits(rng=rng)
    labels, splits = model.labels, model.splits
    split = "test" if evaluate else "pool"
    cand = np.flatnonzero((splits == split) & np.isfinite(z) & (labels < 0))
    features = _Rows(_Features(project.vectors(), model.pooling), cand)
    if evaluate:
        if strategy == "random":
            # Draw from *all* test photos not drawn before, labelled or not: a sample that skipped the
            # labelled top K would underestimate the prevalence. Already labelled ones are recorded
            # in the queue (they count for the baseline) but need no new label.
            drawn = {r[0] - 1 for r in project.db.execute(
                "SELECT q.image_id FROM queue q JOIN rounds r ON r.id = q.round_id "
                "WHERE r.purpose = 'evaluate' AND q.strategy = 'random'")}
            cand = np.array([r for r in np.flatnonzero((splits == "test") & np.isfinite(z)) if r not in drawn],
                            dtype=np.int64)
            picks, sources = get_strategy("random")(z[cand], n, rng=rng)
        else:
            # The top n of the whole test ranking; the ones already labelled need no new label.
            test = np.flatnonzero((splits == "test") & np.isfinite(z))
            order = test[np.lexsort((rng.random(len(test)), z[test]))[::-1][:n]]
            todo = order[labels[order] < 0]
            pos = {int(r): i for i, r in enumerate(cand)}
            picks = np.array([pos[int(r)] for r in todo], dtype=np.int64)
            sources = ["top"] * len(picks)
    elif model.scorer.fitted:
        picks, sources = fn(sigmoid(z[cand]), n, rng=rng, features=features)
    elif model.prior is not None:
        picks, sources = get_strategy("top")(z[cand], n, rng=rng)
        sources = [f"coldstart-{model.prior_kind}"] * len(picks)
    elif strategy in ("default", "mixed"):
        levels = _clusters(project, model.pooling, int(model.mask.sum()))
        lab_rows = np.flatnonzero((labels >= 0) & (splits == "pool"))
        picks = explore_picks(levels, cand, lab_rows, n, rng)
        sources = ["coldstart-explore"] * len(picks)
    else:  # the plain strategies need a model; without one they are all random
        picks, sources = get_strategy("random")(z[cand], n, rng=rng)
    rows = cand[np.asarray(picks, dtype=np.int64)]
    proba = sigmoid(z[rows]) if (model.scorer.fitted or model.prior is not None) else np.full(len(rows), np.nan)
    params = {
        "query": project.meta(_META_QUERY),
        "examples": json.loads(project.meta(_META_EXAMPLES) or "[]"),
        "model": model.scorer.kind,
        "labels": model.scorer.info.get("labels", 0),
        "positives": model.scorer.info.get("positives", 0),
        "head": {**HEAD_DEFAULTS, "pooling": model.pooling},
        "prior_weight": model.scorer.prior_weight,
        "who": who,
    }
    purpose = "evaluate" if evaluate else "label"
    with project._tx() as db:
        cur = db.execute(
            "INSERT INTO rounds (started_at, strategy, n, seed, purpose, params) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), strategy, int(n), int(seed), purpose, json.dumps(params)),
        )
        round_id = cur.lastrowid
        db.executemany(
            "INSERT INTO queue (round_id, image_id, position, strategy, score) VALUES (?, ?, ?, ?, ?)",
            [(round_id, int(r) + 1, i, s, None if not np.isfinite(p) else float(p))
             for i, (r, s, p) in enumerate(zip(rows, sources, proba))],
        )
    if evaluate and strategy == "random":
        keep = labels[rows] < 0
        rows, sources, proba = rows[keep], [x for x, k in zip(sources, keep) if k], proba[keep]
    paths = _paths(project, rows + 1)
    return [
        {"path": paths[int(r) + 1], "image_id": int(r) + 1, "score": None if not np.isfinite(p) else round(float(p), 6),
         "strategy": s, "round": round_id, "split": split}
        for r, s, p in zip(rows, sources, proba)
    ]


def _paths(project: Project, image_ids: np.ndarray) -> dict[int, str]:
    ids = [int(i) for i in image_ids]
    out: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})"
        out.update({r[0]: r[1] for r in project.db.execute(q, chunk)})
    return out


def pending(project: Project, *, purpose: str | None = None) -> list[dict[str, Any]]:
    """Photos queued by earlier rounds that have no label yet, oldest round first, in queue order."""
    if purpose is not None and purpose not in PURPOSES:
        raise InputError(f"unknown purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    sql = (
        "SELECT q.image_id, i.path, q.score, q.strategy, q.round_id, i.split, r.purpose FROM queue q "
        "JOIN rounds r ON r.id = q.round_id JOIN images i ON i.id = q.image_id "
        "WHERE q.image_id NOT IN (SELECT image_id FROM current_labels)"
        + (" AND r.purpose = ?" if purpose else "")
        + " ORDER BY q.round_id, q.position"
    )
    seen: set[int] = set()
    out = []
    for row in project.db.execute(sql, (purpose,) if purpose else ()):
        if row[0] in seen:
            continue
        seen.add(row[0])
        out.append({"path": row[1], "image_id": row[0], "score": row[2], "strategy": row[3], "round": row[4],
                    "split": row[5], "purpose": row[6]})
    return out
