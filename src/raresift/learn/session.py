"""The learner: one object that turns labels into the next photos to label.

A :class:`Session` holds what a labelling session knows: the features of every photo (rows), the
labels so far (-1 = none), which rows are in the pool (may be trained on and picked), the
cold-start prior (text query or example photos, standardised), the groups used to
explore without any hint, and the head of the previous round (the next fit starts from it).
:meth:`Session.query` fits the head and picks the next photos; :meth:`Session.update` takes the
answers. It is pure: no database, no files. ``raresift next`` builds one from the project
(:mod:`raresift.learn.loop`), :func:`raresift.simulate.replay` from an answer key in memory, and
the web page, the notebook and the benchmarks go through those two, so every surface runs the
same learner.

Randomness: every draw of a round (weak negatives, ties, random shares) comes from the one
``numpy.random.Generator`` passed to :meth:`Session.query`; a round is replayed from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError, NotReadyError
from ..settings import default
from .coldstart import explore_picks
from .features import BLOCK_ROWS, RowSubset
from .strategies import get_strategy

if TYPE_CHECKING:
    from .head import RareHead

__all__ = ["HEAD_DEFAULTS", "PRIOR_WEIGHT", "Scorer", "Session", "fit_scorer", "knn_by_default", "sigmoid",
           "standardise"]

# Settings of the head the workflow uses (tuned on the flower and Caltech-101 benchmarks).
HEAD_DEFAULTS: dict = {"C": default("head_c"), "unlabeled_weight": default("unlabeled_weight"),
                       "max_unlabeled": default("max_unlabeled")}
# How much the cold-start prior (standardised) still counts once the head is trained, at 0 labels;
# it fades as labels come in (weight * 50 / (50 + labels)).
PRIOR_WEIGHT = default("prior_weight")
KNN_RANDOM = default("knn_random")  # random unlabelled rows a knn pool adds to the neighbours


def knn_by_default(photos: int, views: int = 1) -> bool:
    """Whether ``--pool auto`` scores knn pools: a full scan reads every view vector, so a photo counts as its
    number of views (whole photo + tiles), and the switch is at ``pool_auto_min`` view vectors (2,000,000:
    photos without tiles, 200,000 with 3 x 3 tiles)."""
    return int(photos) * max(1, int(views)) >= default("pool_auto_min")


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Log-odds to probabilities."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def standardise(prior: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """(prior - mean) / sd over the finite values (of ``rows`` if given); nan stays nan."""
    ref = prior if rows is None else prior[rows]
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        return np.zeros_like(prior, dtype=np.float32)
    sd = float(ref.std()) or 1.0
    return ((prior - float(ref.mean())) / sd).astype(np.float32)


@dataclass
class Scorer:
    """A fitted head fused with the cold-start prior, or no head yet (labels of one class only)."""

    head: RareHead | None
    prior_weight: float = 0.0
    kind: str = "random"  # 'model', 'prior' (text / examples), or 'random'
    info: dict = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.head is not None


def fit_scorer(
    X: Any,
    labelled: np.ndarray,
    y: np.ndarray,
    *,
    unlabeled: np.ndarray | None = None,
    has_prior: bool = False,
    prior_weight: float = PRIOR_WEIGHT,
    rng: np.random.Generator | None = None,
    head_params: dict | None = None,
    previous: RareHead | None = None,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> Scorer:
    """Fit a scorer on rows ``labelled`` of ``X`` (row-indexable features) with labels ``y``.

    ``extra`` = (features, labels) of labelled photos that are not rows of ``X``: example photos
    from outside the collection (positives) and ``--not-like`` ones (negatives).
    ``unlabeled`` are candidate rows for weak negatives (a random sample is used). Without both
    classes among the labels the scorer falls back to the prior (``has_prior``) or random order.
    With ``previous`` (the head of the round before) the head starts from its coefficients.
    """
    rng = rng or np.random.default_rng(0)
    y = np.asarray(y, dtype=np.int64)
    X_lab = None
    if extra is not None and len(extra[1]):
        Xe = np.asarray(extra[0], dtype=np.float32)
        own = np.asarray(X[np.asarray(labelled, dtype=np.int64)], dtype=np.float32) if len(labelled) else \
            np.zeros((0, Xe.shape[1]), dtype=np.float32)
        X_lab = np.concatenate([own, Xe])
        y = np.concatenate([y, np.asarray(extra[1], dtype=np.int64)])
    has_unlabeled = unlabeled is not None and len(unlabeled) > 0
    if y.sum() == 0 or (y.min() == 1 and not has_unlabeled):
        # No positive yet: nothing to learn the class from (labelled positives alone are fine:
        # unlabelled photos then stand in as weak negatives).
        return Scorer(None, kind="prior" if has_prior else "random")
    from .head import RareHead  # scikit-learn: imported on first fit (see raresift.learn)

    params = {**HEAD_DEFAULTS, **(head_params or {})}
    if previous is not None:
        head = previous.set_params(random_state=rng, warm_start=True, **params)
    else:
        head = RareHead(random_state=rng, **params)
    U = None
    if has_unlabeled and head.unlabeled_weight > 0:
        take = np.sort(rng.choice(unlabeled, size=min(len(unlabeled), head.max_unlabeled), replace=False))
        U = X[take]
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    try:
        # One BLAS thread: the products are small (a few thousand rows), and threads waiting on each
        # other cost more than they save (25x slower fits seen on 2 busy cores).
        with threadpool_limits(limits=1, user_api="blas"):
            head.fit(X[np.asarray(labelled)] if X_lab is None else X_lab, y, X_unlabeled=U)
    except NotReadyError:  # only positives and no weak negatives to contrast them with
        return Scorer(None, kind="prior" if has_prior else "random")
    w = prior_weight * 50.0 / (50.0 + len(y)) if has_prior else 0.0
    return Scorer(head, prior_weight=w, kind="model", info={"labels": len(y), "positives": int(y.sum())})


@dataclass
class Picks:
    """What :meth:`Session.query` chose: rows in pick order, the strategy of each, its probability."""

    rows: np.ndarray
    sources: list[str]
    proba: np.ndarray  # nan where the model knows nothing yet
    logits: np.ndarray  # of every row (-inf outside the candidates' split or not embedded)


class Session:
    """One learner for every surface (see the module docstring).

    Parameters
    ----------
    features:
        Row-indexable features (``features[rows]``) with ``linear(coef, intercept)`` scoring every row:
        :class:`raresift.learn.features.MatrixFeatures` or :class:`~raresift.learn.features.VectorFeatures`.
    labels:
        Per row: 1, 0, or -1 (no label yet).
    pool:
        Per row: True where the photo may be trained on and picked (the pool split, embedded).
    prior:
        Per row: the cold-start score (text query or examples), or None; standardised here over the pool.
    prior_kind:
        ``"text"`` or ``"examples"`` (names the cold-start picks).
    clusters:
        the levels to explore with (:func:`~raresift.learn.coldstart.explore_levels`: ``[(group id, priority)]``
        per row, small HDBSCAN groups first, then k-means clusters).
    head:
        The previous round's head: the next fit starts from its coefficients.
    extra:
        (features, labels) of labelled photos that are no rows: example photos from outside the
        collection (1) and photos it should not look like (0); they train every fit.
    head_params, prior_weight:
        Settings of the head and of the prior's weight (defaults: :mod:`raresift.settings`).
    """

    def __init__(self, features: Any, labels: np.ndarray, pool: np.ndarray, *, prior: np.ndarray | None = None,
                 prior_kind: str | None = None, clusters: list | None = None, head: RareHead | None = None,
                 head_params: dict | None = None, prior_weight: float = PRIOR_WEIGHT,
                 extra: tuple[np.ndarray, np.ndarray] | None = None):
        self.features = features
        self.labels = np.array(labels, dtype=np.int8)
        self.pool = np.asarray(pool, dtype=bool)
        self.prior = None if prior is None else standardise(np.asarray(prior, dtype=np.float32),
                                                            np.flatnonzero(self.pool))
        self.prior_kind = prior_kind
        self.clusters = clusters
        self.head = head
        self.head_params = head_params
        self.prior_weight = prior_weight
        self.extra = extra
        self.scorer: Scorer | None = None
        self.last_pool: int | None = None  # rows the last query scored (knn pool), None = every row

    # ------------------------------------------------------------------ learning
    def fit(self, rng: np.random.Generator) -> Scorer:
        """Fit the head on the labelled pool rows (weak negatives drawn from the unlabelled pool)."""
        lab = np.flatnonzero(self.pool & (self.labels >= 0))
        unl = np.flatnonzero(self.pool & (self.labels == -1))  # not the "unsure" ones (-2): never trained on
        scorer = fit_scorer(self.features, lab, self.labels[lab], unlabeled=unl, has_prior=self.prior is not None,
                            prior_weight=self.prior_weight, rng=rng, head_params=self.head_params,
                            previous=self.head, extra=self.extra)
        self.scorer = scorer
        if scorer.fitted:
            self.head = scorer.head
        return scorer

    def logits(self, rng: np.random.Generator | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """Scores (log-odds scale) of every row from the last fit: the head plus the fading prior; the prior
        alone before there is a head; random low scores when nothing is known. With ``rows``, the head
        scores only those rows (a knn pool); the others get ``-inf``."""
        scorer = self.scorer if self.scorer is not None else Scorer(None)
        if scorer.fitted:
            if rows is None:
                z = self.features.linear(scorer.head.coef_, scorer.head.intercept_)
            else:
                z = np.full(len(self.labels), -np.inf, dtype=np.float32)
                rows = np.asarray(rows, dtype=np.int64)
                for start in range(0, len(rows), BLOCK_ROWS):  # a block's features at a time: bounded memory
                    part = rows[start : start + BLOCK_ROWS]
                    z[part] = scorer.head.decision_function(self.features[part])
            if self.prior is not None and scorer.prior_weight:
                z = z + np.float32(scorer.prior_weight) * np.nan_to_num(self.prior[: len(z)], nan=0.0)
            return z
        if self.prior is not None:
            return np.nan_to_num(self.prior.copy(), nan=-np.inf)
        rng = rng or np.random.default_rng(0)
        return rng.random(len(self.labels)).astype(np.float32) - 10.0  # no information: random order, low odds

    def query(self, n: int, strategy: str = "default", *, rng: np.random.Generator,
              candidates: np.ndarray | None = None, neighbours: Any = None,
              similar_to: tuple[np.ndarray, np.ndarray] | None = None) -> Picks:
        """Fit on the labels so far and pick ``n`` unlabelled pool photos with ``strategy``.

        With a head, the strategy picks by its probabilities; before one, the prior's top photos
        (``coldstart-text`` / ``coldstart-examples``); with neither, every strategy but ``random``
        explores (``coldstart-explore``): the most central photo of each group nobody labelled,
        small groups first, then k-means clusters. ``candidates`` (a boolean mask) narrows the rows
        that may be picked (e.g. the embedded ones).

        ``neighbours`` (a function: labelled rows -> rows near them) makes the round score a knn pool
        (SEALS, Coleman et al. 2022) once a head exists: the unlabelled pool rows among the neighbours of
        the labelled ones plus :data:`KNN_RANDOM` random unlabelled rows; the rest are not scored, so the
        round's cost follows the labels, not the collection.

        Strategy ``similar`` ("more like these") needs ``similar_to`` = (features of the example photos,
        features of the counter-examples, possibly none): the candidates most similar (cosine, highest
        over the examples) to the examples, less their similarity to the counter-examples; the picks'
        ``proba`` is then their similarity to the examples.
        """
        fn = get_strategy(strategy)
        if strategy == "similar":
            return self._query_similar(n, rng, candidates, similar_to)
        scorer = self.fit(rng)
        scored = None
        if neighbours is not None and scorer.fitted:
            unl = self.pool & (self.labels == -1)
            if candidates is not None:
                unl &= candidates
            near = np.asarray(neighbours(np.flatnonzero(self.pool & (self.labels >= 0))), dtype=np.int64)
            free = np.flatnonzero(unl)
            sample = rng.choice(free, size=min(KNN_RANDOM, len(free)), replace=False) if len(free) else free
            scored = np.union1d(near[unl[near]] if len(near) else near, sample)
        self.last_pool = None if scored is None else int(len(scored))
        z = self.logits(rng, rows=scored)
        ok = self.pool & (self.labels == -1) & np.isfinite(z)  # unsure answers (-2) are not asked again
        if candidates is not None:
            ok &= candidates
        cand = np.flatnonzero(ok)
        if scorer.fitted:
            picks, sources = fn(sigmoid(z[cand]), n, rng=rng, features=RowSubset(self.features, cand))
        elif self.prior is not None:
            picks, _ = get_strategy("top")(z[cand], n, rng=rng)
            sources = [f"coldstart-{self.prior_kind or 'prior'}"] * len(picks)
        elif self.clusters is not None and strategy != "random":
            lab_rows = np.flatnonzero(self.pool & (self.labels >= 0))
            picks = explore_picks(self.clusters, cand, lab_rows, n, rng)
            sources = ["coldstart-explore"] * len(picks)
        else:
            picks, sources = get_strategy("random")(z[cand], n, rng=rng)
        rows = cand[np.asarray(picks, dtype=np.int64)]
        known = scorer.fitted or self.prior is not None
        proba = sigmoid(z[rows]) if known else np.full(len(rows), np.nan)
        return Picks(rows, list(sources), proba, z)

    def _query_similar(self, n: int, rng: np.random.Generator, candidates: np.ndarray | None,
                       similar_to: tuple[np.ndarray, np.ndarray] | None) -> Picks:
        if similar_to is None or not len(similar_to[0]):
            raise InputError("strategy similar needs example photos (--examples, or photos marked on the page)")
        self.fit(rng)  # the head still learns from every label, for the rounds after this one
        like, unlike = (np.asarray(a, dtype=np.float32) for a in similar_to)
        ok = self.pool & (self.labels == -1)
        if candidates is not None:
            ok &= candidates
        cand = np.flatnonzero(ok)
        sim = np.empty(len(cand), dtype=np.float32)
        margin = np.empty(len(cand), dtype=np.float32)
        for start in range(0, len(cand), BLOCK_ROWS):
            f = np.asarray(self.features[cand[start : start + BLOCK_ROWS]], dtype=np.float32)
            s = (f @ like.T).max(axis=1)
            sim[start : start + len(f)] = s
            margin[start : start + len(f)] = s - ((f @ unlike.T).max(axis=1) if len(unlike) else 0.0)
        picks, sources = get_strategy("similar")(margin, n, rng=rng)
        rows = cand[np.asarray(picks, dtype=np.int64)]
        z = np.full(len(self.labels), -np.inf, dtype=np.float32)
        z[cand] = margin
        self.last_pool = None
        return Picks(rows, list(sources), sim[np.asarray(picks, dtype=np.int64)].astype(np.float64), z)

    def update(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Record answers: ``values[i]`` (1 / 0) is the label of row ``rows[i]``."""
        self.labels[np.asarray(rows, dtype=np.int64)] = np.asarray(values, dtype=np.int8)

    def describe(self) -> dict[str, Any]:
        """The settings of the last fit, recorded with a round."""
        scorer = self.scorer if self.scorer is not None else Scorer(None)
        return {
            "model": scorer.kind,
            "labels": scorer.info.get("labels", 0),
            "positives": scorer.info.get("positives", 0),
            "head": {**HEAD_DEFAULTS, **(self.head_params or {}), "pooling": getattr(self.features, "pooling", None)},
            "prior_weight": scorer.prior_weight,
            "pool": "full" if self.last_pool is None else {"kind": "knn", "rows": self.last_pool},
        }


def round_seed(session_seed: int, repeat: int, round_index: int) -> int:
    """The seed of round ``round_index`` of simulated session ``repeat`` (what `next --seed` takes to replay it)."""
    return int(np.random.SeedSequence([int(session_seed), int(repeat), int(round_index)]).generate_state(1)[0] >> 1)
