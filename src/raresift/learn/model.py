"""Pure functions that turn labels into scores: fit the head, fuse it with the cold-start prior.

These take numpy arrays and indices only (no project, no database), so a simulation can replay
many labelling sessions in memory; :mod:`raresift.learn.loop` wraps them for a project.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import NotReadyError
from .head import RareHead

__all__ = ["HEAD_DEFAULTS", "PRIOR_WEIGHT", "Scorer", "fit_scorer", "sigmoid"]

# Settings of the head the workflow uses (tuned on the flower and Caltech-101 benchmarks).
HEAD_DEFAULTS: dict = {"C": 10.0, "unlabeled_weight": 0.05, "max_unlabeled": 2000}
# How much the cold-start prior (standardised) still counts once the head is trained, at 0 labels;
# it fades as labels come in (weight * 50 / (50 + labels)).
PRIOR_WEIGHT = 0.5


def sigmoid(z: np.ndarray) -> np.ndarray:
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
    """A trained model, or the cold start when the labels do not hold both classes yet.

    ``score(X_block, prior_block)`` gives log-odds-like scores (higher = more likely rare class).
    """

    head: RareHead | None
    prior_weight: float = 0.0
    kind: str = "random"  # 'model', 'prior' (text / examples), or 'random'
    info: dict = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.head is not None

    def score(self, X: np.ndarray, prior: np.ndarray | None = None, *, rng: np.random.Generator | None = None
              ) -> np.ndarray:
        if self.head is not None:
            z = self.head.decision_function(X)
            if prior is not None and self.prior_weight:
                z = z + self.prior_weight * np.nan_to_num(prior, nan=0.0)
            return z
        if prior is not None:
            return np.nan_to_num(np.asarray(prior, dtype=np.float32), nan=-np.inf)
        rng = rng or np.random.default_rng(0)
        return rng.random(len(X)).astype(np.float32) - 10.0  # no information: random order, low odds


def fit_scorer(
    X: np.ndarray,
    labelled: np.ndarray,
    y: np.ndarray,
    *,
    unlabeled: np.ndarray | None = None,
    has_prior: bool = False,
    prior_weight: float = PRIOR_WEIGHT,
    rng: np.random.Generator | None = None,
    head_params: dict | None = None,
    previous: Scorer | None = None,
) -> Scorer:
    """Fit a scorer on rows ``labelled`` of ``X`` (a matrix or memory map of features) with labels ``y``.

    ``unlabeled`` are candidate rows for weak negatives (a random sample is used). Without both
    classes among the labels the scorer falls back to the prior (``has_prior``) or random order.
    With ``previous`` (the scorer of the round before) the head starts from its coefficients.
    """
    rng = rng or np.random.default_rng(0)
    y = np.asarray(y, dtype=np.int64)
    has_unlabeled = unlabeled is not None and len(unlabeled) > 0
    if y.sum() == 0 or (y.min() == 1 and not has_unlabeled):
        # No positive yet: nothing to learn the class from (labelled positives alone are fine:
        # unlabelled photos then stand in as weak negatives).
        return Scorer(None, kind="prior" if has_prior else "random")
    params = {**HEAD_DEFAULTS, **(head_params or {})}
    if previous is not None and previous.head is not None:
        head = previous.head.set_params(random_state=rng, warm_start=True, **params)
    else:
        head = RareHead(random_state=rng, **params)
    U = None
    if unlabeled is not None and len(unlabeled) and head.unlabeled_weight > 0:
        take = np.sort(rng.choice(unlabeled, size=min(len(unlabeled), head.max_unlabeled), replace=False))
        U = X[take]
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    try:
        # One BLAS thread: the products are small (a few thousand rows), and threads waiting on each
        # other cost more than they save (25x slower fits seen on 2 busy cores).
        with threadpool_limits(limits=1, user_api="blas"):
            head.fit(X[np.asarray(labelled)], y, X_unlabeled=U)
    except NotReadyError:  # only positives and no weak negatives to contrast them with
        return Scorer(None, kind="prior" if has_prior else "random")
    w = prior_weight * 50.0 / (50.0 + len(y)) if has_prior else 0.0
    return Scorer(head, prior_weight=w, kind="model", info={"labels": len(y), "positives": int(y.sum())})
