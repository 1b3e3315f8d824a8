"""Query strategies: which unlabelled photos to label next.

Each strategy is a small pure function ``(proba, n, *, rng, features=None) -> (indices, sources)``:
``proba`` is the current model's probability of the rare class for each candidate photo, ``indices``
are positions into ``proba`` in pick order and ``sources`` says which strategy picked each one (the
mixed default combines several). Ties are broken at random on purpose, so equal scores do not
always favour the first rows. Look strategies up by name in :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError

__all__ = [
    "DEFAULT_SHARES",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "diverse",
    "entropy",
    "get_strategy",
    "mixed",
    "random_pick",
    "similar",
    "top",
    "uncertainty",
    "uncertainty_sampling",
]

Picks = tuple[np.ndarray, list[str]]
Strategy = Callable[..., Picks]

DEFAULT_STRATEGY = "mixed"
# The default batch: mostly likely positives (finds them fastest, and its false positives are the
# hard negatives the ranking needs), some of the most uncertain (sharpens the boundary), and a
# random share, so kinds of positives the model has not seen yet can still turn up.
DEFAULT_SHARES: tuple[tuple[str, float], ...] = (("top", 0.7), ("uncertainty", 0.2), ("random", 0.1))
# Two photos whose features have a cosine similarity above this are near-duplicates.
NEAR_DUPLICATE = 0.95


def entropy(proba: np.ndarray) -> np.ndarray:
    """Binary entropy (nats) of probabilities."""
    p = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def _top_k(values: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the n largest values, largest first, ties in random order."""
    n = min(n, len(values))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    jitter = rng.random(len(values))
    if n < len(values):
        # Take a few more than n, so ties at the cut are decided by the jitter too.
        kth = np.partition(values, len(values) - n)[len(values) - n]
        cand = np.flatnonzero(values >= kth)
    else:
        cand = np.arange(len(values))
    order = np.lexsort((jitter[cand], values[cand]))[::-1]
    return cand[order[:n]].astype(np.int64)


def random_pick(proba: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None) -> Picks:
    """Photos drawn uniformly at random (the baseline; unbiased)."""
    n = min(n, len(proba))
    idx = rng.choice(len(proba), size=n, replace=False).astype(np.int64)
    return idx, ["random"] * n


def uncertainty(proba: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None) -> Picks:
    """The photos the model is least sure about (highest entropy): the reference write-up's strategy."""
    idx = _top_k(entropy(proba), n, rng)
    return idx, ["uncertainty"] * len(idx)


def uncertainty_sampling(proba: np.ndarray, n: int, *, rng: np.random.Generator,
                         features: np.ndarray | None = None) -> Picks:
    """Photos drawn at random with probability proportional to their entropy (less biased than `uncertainty`)."""
    n = min(n, len(proba))
    w = entropy(proba) + 1e-12
    idx = rng.choice(len(proba), size=n, replace=False, p=w / w.sum()).astype(np.int64)
    return idx, ["uncertainty-sampling"] * n


def top(proba: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None) -> Picks:
    """The most likely positives (active search): finds positives fastest."""
    idx = _top_k(np.asarray(proba, dtype=np.float64), n, rng)
    return idx, ["top"] * len(idx)


def _skip_near_duplicates(order: np.ndarray, n: int, features: np.ndarray | None, taken: list[int]) -> list[int]:
    """Walk ``order`` and keep up to n positions whose features are no near-duplicate of a kept one."""
    kept: list[int] = []
    if features is None:
        for i in order:
            if int(i) not in taken:
                kept.append(int(i))
                if len(kept) == n:
                    break
        return kept
    chosen = [features[i] for i in taken]
    for i in order:
        i = int(i)
        if i in taken:
            continue
        f = features[i]
        if chosen and float(np.max(np.stack(chosen) @ f)) > NEAR_DUPLICATE * float(f @ f):
            continue
        kept.append(i)
        chosen.append(f)
        if len(kept) == n:
            break
    return kept


def diverse(proba: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None) -> Picks:
    """The most likely positives, skipping near-duplicates of photos already in the batch."""
    order = _top_k(np.asarray(proba, dtype=np.float64), min(len(proba), max(20 * n, 200)), rng)
    kept = _skip_near_duplicates(order, n, features, [])
    if len(kept) < n:  # everything left was a near-duplicate: fill up in score order
        kept += _skip_near_duplicates(order, n - len(kept), None, kept)
    return np.array(kept, dtype=np.int64), ["diverse"] * len(kept)


def mixed(proba: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None,
          shares: tuple[tuple[str, float], ...] = DEFAULT_SHARES) -> Picks:
    """The default: shares of other strategies (``DEFAULT_SHARES``), no photo twice, no near-duplicates."""
    n = min(n, len(proba))
    counts = [int(np.floor(n * s)) for _, s in shares]
    for k in range(n - sum(counts)):  # hand out the rounding rest, biggest share first
        counts[k % len(counts)] += 1
    idx: list[int] = []
    sources: list[str] = []
    for (name, _), count in zip(shares, counts):
        if count == 0:
            continue
        fn = STRATEGIES[name]
        # Ask for more than needed: some may already be taken by an earlier share.
        order, _ = fn(proba, min(len(proba), count + len(idx) + 4 * count), rng=rng, features=None)
        kept = _skip_near_duplicates(order, count, features if name != "random" else None, idx)
        idx += kept
        sources += [name] * len(kept)
    if len(idx) < n:  # not enough distinct photos for some share: fill up with the best-scored rest
        order, _ = top(proba, len(proba), rng=rng)
        rest = _skip_near_duplicates(order, n - len(idx), None, idx)
        idx += rest
        sources += ["top"] * len(rest)
    return np.array(idx, dtype=np.int64), sources


def similar(scores: np.ndarray, n: int, *, rng: np.random.Generator, features: np.ndarray | None = None) -> Picks:
    """"More like these": ``scores`` here are not the model's probabilities but each candidate's
    similarity to the example photos (less its similarity to the counter-examples), computed by the
    session (:meth:`raresift.learn.session.Session.query`); the most similar come first."""
    idx = _top_k(np.asarray(scores, dtype=np.float64), n, rng)
    return idx, ["similar"] * len(idx)


STRATEGIES: dict[str, Strategy] = {
    "random": random_pick,
    "uncertainty": uncertainty,
    "uncertainty-sampling": uncertainty_sampling,
    "top": top,
    "diverse": diverse,
    "mixed": mixed,
    "default": mixed,
    "similar": similar,
}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``; an unknown name raises listing the valid ones."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None
