"""How good is the ranking, and when to stop: precision@K on the test split, with intervals.

The test split is held out from training. A person labels

* the top K test photos of the current ranking (``raresift next --evaluate``): precision@K;
* some random test photos (``raresift next --evaluate --strategy random``): the prevalence of
  the rare class, i.e. what random sampling would give, and an unbiased view of recall.

From those, :func:`evaluate` reports precision@K with a 95% Wilson interval, the random
baseline, the lift, the estimated number of positives in the whole collection and the share
of them the current top N holds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError, NotReadyError
from .learn.loop import scores
from .settings import default
from .store.store import UNSURE_ROW, Store

__all__ = ["evaluate", "wilson"]

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (None when n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def evaluate(store: Store, *, k: int = default("k"), top: int | None = None) -> dict[str, Any]:
    """Precision@K of the current ranking on the test split, the random baseline and recall estimates.

    ``top`` is the size of the subset you would export (default: the collection's share that
    matches the test top K, i.e. K x photos / test photos). Values that need labels nobody gave
    yet are None, and ``hints`` says which command supplies them. The ranking is the one
    ``next --evaluate`` queued for the same training labels (:func:`raresift.learn.loop.current_model`).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError(f"--k must be a whole number >= 1, got {k!r}")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 1):
        raise InputError(f"--top must be a whole number >= 1, got {top!r}")
    s = scores(store)
    n_rows = len(s)
    labels = store.label_array()[:n_rows]
    splits = store.splits()[:n_rows]
    embedded = np.isfinite(s)
    test = np.flatnonzero((splits == "test") & embedded)
    if len(test) == 0:
        raise NotReadyError("the project has no embedded test photos; make it with a test fraction > 0 and embed it")
    n_all = int(embedded.sum())
    # Rank the test split; ties broken by row so the report is stable.
    order = test[np.lexsort((test, -s[test]))]
    kk = min(k, len(order))
    top_k = order[:kk]
    lab = labels[top_k]
    n_lab = int((lab >= 0).sum())
    n_pos = int((lab == 1).sum())
    n_unsure = int((lab == UNSURE_ROW).sum())  # answered "unsure": neither counted nor asked again
    missing = int((lab == -1).sum())
    precision = n_pos / n_lab if n_lab else None
    p_ci = wilson(n_pos, n_lab)

    # Random test photos: those served by `next --evaluate --strategy random` and labelled since.
    random_ids = store.evaluation_random_ids()
    rand_rows = np.array(sorted(i - 1 for i in random_ids if i - 1 < n_rows), dtype=np.int64)
    rand_rows = rand_rows[(labels[rand_rows] >= 0) & embedded[rand_rows] & (splits[rand_rows] == "test")] \
        if len(rand_rows) else rand_rows
    n_rand = len(rand_rows)
    rand_pos = int((labels[rand_rows] == 1).sum()) if n_rand else 0
    prevalence = rand_pos / n_rand if n_rand else None
    prev_ci = wilson(rand_pos, n_rand)

    lift = lift_ci = None
    if precision is not None and prevalence:
        lift = precision / prevalence
        if p_ci and prev_ci and prev_ci[0] > 0:
            lift_ci = (_r(p_ci[0] / prev_ci[1], 2), _r(p_ci[1] / prev_ci[0], 2))

    est = est_ci = None
    if prevalence is not None:
        est = prevalence * n_all
        est_ci = (math.floor(prev_ci[0] * n_all), math.ceil(prev_ci[1] * n_all))

    if top is None:
        top = max(1, round(kk * n_all / len(test)))
    top = min(top, n_all)
    # Recall of the top N: the share of random test positives that rank inside the top N/n_all of the test split.
    recall = recall_ci = None
    covered = 0
    if rand_pos:
        rank = np.empty(n_rows, dtype=np.int64)
        rank[order] = np.arange(len(order))
        cutoff = round(top / n_all * len(test))
        pos_rows = rand_rows[labels[rand_rows] == 1]
        covered = int((rank[pos_rows] < cutoff).sum())
        recall = covered / rand_pos
        recall_ci = wilson(covered, rand_pos)

    hints = []
    if missing:
        hints.append(f"{missing} of the test top {kk} have no label: run `raresift next {store.root} --evaluate --n {kk}` "
                     "and label them")
    if n_rand < 100:
        hints.append(f"{n_rand} random test photos are labelled; label more (`raresift next {store.root} --evaluate "
                     "--strategy random --n 100`) for the baseline, prevalence and recall")
    n_labels = store.label_counts()["labels"]
    return {
        "concept": store.concept,
        "k": kk,
        "test_photos": len(test),
        "collection_photos": n_all,
        "labels": int(n_labels),
        "top_k_labelled": n_lab,
        "top_k_positives": n_pos,
        "top_k_missing": missing,
        "precision_at_k": _r(precision),
        "precision_at_k_ci": list(p_ci) if p_ci else None,
        "precision_at_k_bounds": [_r(n_pos / kk), _r((n_pos + missing + n_unsure) / kk)],
        "top_k_unsure": n_unsure,
        "random_labels": n_rand,
        "random_positives": rand_pos,
        "random_precision": _r(prevalence),
        "random_precision_ci": list(prev_ci) if prev_ci else None,
        "lift": _r(lift, 2),
        "lift_ci": list(lift_ci) if lift_ci else None,
        "estimated_positives": _r(est, 1),
        "estimated_positives_ci": list(est_ci) if est_ci else None,
        "top_n": top,
        "top_n_recall": _r(recall),
        "top_n_recall_ci": list(recall_ci) if recall_ci else None,
        "top_n_estimated_positives": _r(recall * est, 1) if recall is not None and est is not None else None,
        "hints": hints,
    }
