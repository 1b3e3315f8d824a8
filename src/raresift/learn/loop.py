"""A labelling round on a project: the :class:`~raresift.learn.session.Session` loaded from the store.

:func:`next_batch` (``raresift next``, the page's "next round", the notebook's ``t``) builds the
session from the project's labels, splits, cold-start prior, clusters and the previous round's head,
asks it for the next photos, records the round and its queue, and saves the head it fitted.
:func:`current_model` gives the ranking that ``evaluate`` and ``export`` score: the head saved by
the last round when the training labels are still the same (so ``evaluate`` scores the very
ranking ``next --evaluate`` queued), else a new fit with a fixed seed.

Only labels of the *pool* split train the model; labels of the test split are kept for
:func:`raresift.evaluate.evaluate`. Rounds of one project run one at a time (a lock across processes
and threads): the page, a `next` in a shell and a notebook wait for each other instead of failing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..embed.models import has_text_tower, text_embedding
from ..errors import InputError, NotReadyError
from ..ray_jobs import check_engine, require_ray
from ..settings import check_pool, default
from ..store.cache import exclusive
from ..store.labels import DEFAULT_CONCEPT
from ..store.store import EXAMPLE_PREFIX, Store
from ..store.vectors import layout_of
from .coldstart import concepts_for, example_scores, explore_levels, text_scores
from .evidence import evidence
from .features import (
    DEFAULT_POOLING,
    PART_WEIGHTS,
    RowSubset,
    VectorFeatures,
    featurize,
    gather,
    pooled_features,
    sqrt_features,
    sqrt_norms,
)
from .session import HEAD_DEFAULTS, Session, knn_by_default, sigmoid, standardise
from .strategies import get_strategy

if TYPE_CHECKING:
    from .head import RareHead

__all__ = ["PURPOSES", "Model", "clusters", "current_model", "load_session", "next_batch", "pending", "saved_head",
           "prepare_scoring", "scores"]

log = logging.getLogger(__name__)

PURPOSES = ("label", "evaluate")
_META_QUERY = "learn.query"
_META_EXAMPLES = "learn.examples"  # JSON list: photo ids (paths) of the project, or file:HASH keys
_META_NOT_LIKE = "learn.not_like"  # JSON list of file:HASH keys: photos the class does not look like
_HEAD_FILE = "head.npz"


@dataclass
class Model:
    """The project's model at one moment: the session it was fitted in and its scores of every row."""

    session: Session
    logits: np.ndarray  # every row; -inf where not embedded
    labels: np.ndarray
    test: np.ndarray  # rows of the test split (booleans)
    mask: np.ndarray  # embedded rows

    @property
    def splits(self) -> np.ndarray:
        """Split names per row ('pool' / 'test'), a ``<U4`` array built on demand from :attr:`test`."""
        return np.where(self.test, "test", "pool")

    @property
    def head(self) -> RareHead | None:
        """The fitted head, or None before the labels hold both classes."""
        scorer = self.session.scorer
        return scorer.head if scorer is not None and scorer.fitted else None

    def probabilities(self) -> np.ndarray:
        """The probability of the rare class for every row (nan where not embedded; 0.5 when nothing is known)."""
        out = sigmoid(self.logits).astype(np.float64) if self.known else np.full(len(self.logits), 0.5)
        out[~np.isfinite(self.logits)] = np.nan
        return out

    @property
    def known(self) -> bool:
        """Whether the scores mean anything (a head, or at least a prior)."""
        return self.session.scorer is not None and (self.session.scorer.fitted or self.session.prior is not None)


def prepare_scoring(store: Store, *, index_kind: str = "auto") -> None:
    """Write the caches that make a round fast at scale once the vectors are complete, so the first `next`
    does not pay for them: signed-square-root features and their norms beside the vectors (one view per
    photo, the case that fast path serves); where rounds score knn pools (``pool_auto_min`` view vectors,
    :func:`raresift.learn.session.knn_by_default`), the FAISS index instead. A project folder that cannot
    be written to is left as it is (rounds then score block by block)."""
    info = store.embedding_info()
    if info is None:
        return
    if _knn_sized(store):
        # Rounds score knn pools (`--pool auto`): build their FAISS index now, not in the first round
        # (measured: ~85 s at 10^6 photos on 2 cores). No scoring caches for one view a photo: a knn
        # round featurises its few rows on the fly, and float32 square roots would take twice the
        # vector file on disk. Tiled photos kept as views: their features once, float16 (0.3x the vector file),
        # which a round casts instead of featurising 10 views a photo. Kept compact, a round featurises its
        # pool's 3 parts a photo from the vector file itself: one file for the rounds to keep in memory.
        from ..index import project_index

        try:
            project_index(store, kind=index_kind)
            if info["views"] > 1 and info["layout"] == "views":
                pooled_features(store.vectors(), store.vector_cache)
        except OSError as exc:
            log.warning("the vector index or features were not written (%s); the first knn round will build them",
                        exc)
        return
    if info["views"] != 1:
        return
    try:
        vectors = store.vectors()
        sqrt_norms(vectors, store.vector_cache)
        sqrt_features(vectors, store.vector_cache)
    except OSError as exc:
        log.warning("scoring caches not written (%s); rounds will score block by block", exc)


def _knn_sized(store: Store) -> bool:
    """Whether the collection is large enough for `--pool auto` to score knn pools."""
    info = store.embedding_info()
    return knn_by_default(store.count_status("embedded"), info["views"] if info else 1)


# ---------------------------------------------------------------------- the session from the store
def _prior(store: Store, pool_rows: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The cold-start prior of the project (text query or examples), cached per vector generation."""
    query = store.meta(store.concept_key(_META_QUERY))
    examples = json.loads(store.meta(store.concept_key(_META_EXAMPLES)) or "[]")
    if not query and not examples:
        return None, None

    def build() -> np.ndarray:
        mask = store.embedded_mask()
        parts = []
        if query:
            parts.append(standardise(query_scores(store, mask, query), pool_rows))
        if examples:
            parts.append(standardise(example_scores(store.vectors(), mask, example_features(store, examples)),
                                     pool_rows))
        return parts[0] if len(parts) == 1 else np.nanmax(np.stack(parts), axis=0)

    name = "prior" if store.concept == DEFAULT_CONCEPT else f"prior-{store.concept}"  # one slot per concept
    prior = store.cache.array(name, (query, examples, DEFAULT_POOLING, PART_WEIGHTS), build)
    return prior, ("text" if query else "examples")


def query_scores(store: Store, mask: np.ndarray, query: str) -> np.ndarray:
    """Cold-start scores of every row for a text query: with a model that has a text tower (open_clip),
    the cosine of the query's text embedding and each photo's image embedding (highest over its views);
    otherwise through the model's ImageNet concepts (:func:`raresift.learn.coldstart.text_scores`)."""
    info = store.embedding_info()
    if info is not None and has_text_tower(info["model"]):
        from ..embed.torch_models import image_text_cosine

        scores = image_text_cosine(store.vectors(), text_embedding(info["model"], query))
        scores[~mask[: len(scores)]] = np.nan
        return scores
    return text_scores(store.logits(), mask, query)


def example_features(store: Store, examples: list[str]) -> np.ndarray:
    """Features of example photos: photos of the project (ids) and photos from outside (``file:HASH``)."""
    ids = [store.image_id(e) for e in examples if not e.startswith(EXAMPLE_PREFIX)]
    parts = [_gather_ids(store, ids)] if ids else []
    outside = [store.example_vectors(e) for e in examples if e.startswith(EXAMPLE_PREFIX)]
    if outside:
        parts.append(featurize(np.stack(outside)))
    return np.concatenate(parts)


def _extra(store: Store) -> tuple[np.ndarray, np.ndarray] | None:
    """Labelled photos from outside the collection: the example files (1) and the not-like files (0)."""
    pos = [e for e in json.loads(store.meta(store.concept_key(_META_EXAMPLES)) or "[]") if e.startswith(EXAMPLE_PREFIX)]
    neg = json.loads(store.meta(store.concept_key(_META_NOT_LIKE)) or "[]")
    if not pos and not neg:
        return None
    feats = featurize(np.stack([store.example_vectors(e) for e in pos + neg]))
    return feats, np.r_[np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)]


def clusters(store: Store) -> list[tuple[np.ndarray, np.ndarray]]:
    """The exploring levels of the embedded photos (:func:`~raresift.learn.coldstart.explore_levels`:
    small HDBSCAN groups, then k-means clusters; group id and priority per row), cached.

    Fitted on the embedded rows only with seed 0 (a property of the collection, the same for every
    round, simulation and surface); rows not embedded are in no group (-1). Fitted on the whole-photo
    vectors (signed square root, unit length), not the tiles' parts of the head's feature: what a
    photo shows as a whole groups photos of one kind, where the tiles add the clutter around them
    (60 Caltech-101 classes cut to 1 in 450, tiled projects, no hint: 6.75 of about 11.5 found after
    100 labels against 5.53 with the head's feature, 9.01 against 8.64 after 300; ``benchmarks/RESULTS.md``).
    """

    def build() -> dict[str, np.ndarray]:
        mask = store.embedded_mask()
        rows = np.flatnonzero(mask)
        feats = VectorFeatures(store.vectors(), "whole")
        levels = explore_levels(RowSubset(feats, rows), seed=0)
        out: dict[str, np.ndarray] = {"levels": np.array(len(levels))}
        for i, (ids, prio) in enumerate(levels):
            full_ids = np.full(len(mask), -1, dtype=np.int32)
            full_prio = np.full(len(mask), np.inf, dtype=np.float32)
            full_ids[rows], full_prio[rows] = ids, prio
            out[f"ids{i}"], out[f"prio{i}"] = full_ids, full_prio
        return out

    arrays = store.cache.arrays("clusters", ("explore-4", "whole"), build)
    return [(arrays[f"ids{i}"], arrays[f"prio{i}"]) for i in range(int(arrays["levels"]))]


def _fingerprint(labels: np.ndarray, pool: np.ndarray, store: Store) -> str:
    """What the head is fitted on: the labelled pool rows and their labels, the prior, the vectors."""
    lab = np.flatnonzero(pool & (labels >= 0))
    h = hashlib.sha1()
    h.update(lab.astype(np.int64).tobytes())
    h.update(labels[lab].astype(np.int8).tobytes())
    h.update(json.dumps([*(store.meta(store.concept_key(k)) for k in (_META_QUERY, _META_EXAMPLES, _META_NOT_LIKE)),
                         store.vectors_generation(),
                         HEAD_DEFAULTS, DEFAULT_POOLING, PART_WEIGHTS]).encode())
    return h.hexdigest()[:16]


def _load_head(store: Store) -> tuple[RareHead | None, str | None]:
    """The head saved by the last round, and the fingerprint of its training labels."""
    path = _head_path(store)
    if not path.is_file():
        return None, None
    from .head import RareHead

    try:
        with np.load(path) as f:
            return RareHead.from_coefficients(f["coef"], float(f["intercept"]), **HEAD_DEFAULTS), str(f["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None, None


def _head_path(store: Store) -> Path:
    """Where the concept's last head is kept: ``learn/head.npz`` (the default concept), ``learn/head-NAME.npz``."""
    name = _HEAD_FILE if store.concept == DEFAULT_CONCEPT else f"head-{store.concept}.npz"
    return store.paths.learn_dir / name


def saved_head(store: Store) -> RareHead | None:
    """The head the last round fitted (None before any): what the page shows evidence with."""
    return _load_head(store)[0]


def _save_head(store: Store, head: RareHead, fingerprint: str) -> None:
    path = _head_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".head.{threading.get_ident()}.{id(head)}.tmp.npz")
    with contextlib.suppress(OSError):  # a read-only project still runs rounds
        with open(tmp, "wb") as fh:
            np.savez(fh, coef=head.coef_, intercept=np.float64(head.intercept_), fingerprint=np.array(fingerprint))
        tmp.replace(path)
    tmp.unlink(missing_ok=True)


def load_session(store: Store, *, warm: bool = True, engine: str = "local", ray_address: str | None = None
                 ) -> tuple[Session, dict[str, np.ndarray], str]:
    """The project's session: features, labels, pool, prior, clusters and the previous head.

    ``engine="ray"``: full scans of the vectors run as Ray Data jobs (:mod:`raresift.ray_jobs`; the
    cluster at ``ray_address``, or a local Ray). Returns ``(session, state, fingerprint)`` with ``state`` = labels, the
    test split and the embedded mask (booleans) as read (each read scans the image rows once).
    """
    vectors = store.vectors()
    labels = store.label_array()
    if (labels == 1).any():  # a head will be fitted: import its solver while SQLite reads the splits
        _import_in_background("scipy.optimize")
    test = store.test_mask()
    mask = store.embedded_mask()
    n = min(len(labels), vectors.shape[0])
    labels, test, mask = labels[:n], test[:n], mask[:n]
    pool = ~test & mask
    prior, prior_kind = _prior(store, np.flatnonzero(pool))
    head, _ = _load_head(store) if warm else (None, None)
    level = None
    extra = _extra(store)
    if prior is None and not (labels[pool] == 1).any() and extra is None:
        level = clusters(store)
    knn_sized = _knn_sized(store)
    cache = None if knn_sized else store.vector_cache  # see prepare_scoring
    pooled = None
    if knn_sized and vectors.ndim == 3 and vectors.shape[1] > 1 and layout_of(vectors) == "views":
        # Written by prepare_scoring (after embed / init), so a round only reads it. Missing (its writing
        # failed, or the feature settings changed since, as PART_WEIGHTS did in December 2026), the
        # round writes it once rather than featurise every view of its pool in every round.
        try:
            pooled = pooled_features(vectors, store.vector_cache)
        except OSError as exc:
            log.warning("the feature cache was not written (%s); rounds featurise the views", exc)
    remote = None
    if engine == "ray":
        from ..ray_jobs import RayScoring

        remote = RayScoring(vectors.filename, address=ray_address)
    features = VectorFeatures(vectors, DEFAULT_POOLING, cache=cache, remote=remote, pooled=pooled)
    session = Session(features, labels, pool, prior=None if prior is None else prior[:n], prior_kind=prior_kind,
                      clusters=level, head=head, extra=extra)
    return session, {"labels": labels, "test": test, "mask": mask}, _fingerprint(labels, pool, store)


def _import_in_background(name: str) -> threading.Thread | None:
    """Start importing the third-party module ``name`` in a daemon thread (SciPy's optimiser: 0.3-2 s of
    start-up); whoever imports it meanwhile waits for that import, never imports twice."""
    if name in sys.modules:
        return None
    import importlib

    def run() -> None:
        with contextlib.suppress(Exception):  # the caller's own import reports the error
            importlib.import_module(name)

    thread = threading.Thread(target=run, name=f"raresift-import-{name}", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def round_lock(store: Store):
    """One round of a project at a time, across processes and threads."""
    store.paths.learn_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(store.paths.learn_dir / ".round.lock"):
        yield


def current_model(store: Store) -> Model:
    """The ranking of the current labels: the last round's head when its training labels are unchanged
    (``evaluate`` then scores the very ranking ``next --evaluate`` queued), else a fit with seed 0."""
    with round_lock(store):
        session, state, fingerprint = load_session(store, warm=False)
        head, saved = _load_head(store)
        rng = np.random.default_rng(0)
        if head is not None and saved == fingerprint:
            session.fit(rng)  # the prior weight and kind of the same labels
            if session.scorer.fitted:
                session.scorer.head = head
                session.head = head
        else:
            session.fit(rng)
            if session.scorer.fitted:
                _save_head(store, session.scorer.head, fingerprint)
    z = session.logits(rng)
    z = np.asarray(z, dtype=np.float32).copy()
    z[~state["mask"]] = -np.inf
    return Model(session, z, state["labels"], state["test"], state["mask"])


def scores(store: Store) -> np.ndarray:
    """The current model's probability of the rare class for every row (nan where not embedded).

    Before the labels hold both classes, these are the cold-start scores (text query / examples),
    or 0.5 everywhere when there is neither.
    """
    return current_model(store).probabilities()


# ---------------------------------------------------------------------- a round
def set_query(store: Store, query: str) -> None:
    """Remember a text query for the cold start (it keeps informing later rounds)."""
    info = store.embedding_info()
    if info is not None and has_text_tower(info["model"]):  # any words: the model's text tower embeds them
        if not isinstance(query, str) or not query.strip():
            raise InputError("the text query is empty; describe the rare class in a few words")
        store.set_meta(**{store.concept_key(_META_QUERY): query})
        return
    if not concepts_for(query):
        raise InputError(
            f"no ImageNet concept matches {query!r}; the model only knows its 1,000 ImageNet classes; "
            "try other words, --examples, or start at random"
        )
    if store.logits() is None:
        raise NotReadyError("this project has no ImageNet logits (vectors from your own model); use --examples")
    store.set_meta(**{store.concept_key(_META_QUERY): query})


def set_examples(store: Store, examples: list[str | int], *, who: str | None,
                 not_like: list[str] | None = None) -> None:
    """Remember example photos for the cold start: photos of the project (ids or paths; the unlabelled pool
    ones become positives) and photos from outside (``file:HASH`` keys of
    :func:`raresift.embed.examples.add_example`), which train every round as positives. ``not_like``
    (``file:HASH`` keys) are photos the class does not look like: they train as negatives."""
    mask = store.embedded_mask()
    resolved = []
    for e in examples:
        if isinstance(e, str) and e.startswith(EXAMPLE_PREFIX):
            store.example_vectors(e)  # checks it is there
            resolved.append(e)
            continue
        image_id = e if isinstance(e, int) else store.image_id(str(e))
        if image_id < 1 or image_id > len(mask) or not mask[image_id - 1]:
            raise InputError(f"example {e!r} is not an embedded photo of this project; give ids as `status` lists them")
        resolved.append(store.paths_of([image_id])[image_id])
    for e in not_like or ():
        store.example_vectors(e)
    values = {store.concept_key(_META_EXAMPLES): json.dumps(resolved)}
    if not_like is not None:
        values[store.concept_key(_META_NOT_LIKE)] = json.dumps(list(not_like))
    store.set_meta(**values)
    test, labels = store.test_mask(), store.label_array()
    new = [store.image_id(p) for p in resolved if not p.startswith(EXAMPLE_PREFIX)]
    new = [i for i in new if not test[i - 1] and labels[i - 1] < 0]
    if new:  # an example is a positive the person already gave: keep it as a label
        from ..store.labels import default_who

        store.append_labels([(i, 1) for i in new], who=who or default_who(), source="examples")


def next_batch(
    store: Store,
    n: int,
    *,
    strategy: str = default("strategy"),
    query: str | None = None,
    examples: list[str | int] | None = None,
    not_like: list[str] | None = None,
    evaluate: bool = False,
    seed: int | None = None,
    who: str | None = None,
    pool: str = default("pool"),
    counter_examples: list[int] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> list[dict[str, Any]]:
    """Retrain on all labels and choose the next ``n`` photos to label; the round is recorded.

    ``query`` (text) and ``examples`` (photo ids, or ``file:HASH`` keys of photos from outside the
    collection; ``not_like`` the same for photos the class does not look like) set the cold start; they are remembered by the
    project and keep informing the ranking (with a weight that fades as labels come in). Without
    either, the first photos explore the collection: the most central photo of each small HDBSCAN
    group, smallest first, then of each k-means cluster, skipping groups that have a label.
    ``pool``: which photos a round scores once there is a head: ``full`` (every photo), ``knn`` (the
    neighbours of the labelled photos in the project's FAISS index plus a random sample, see
    :meth:`raresift.learn.session.Session.query`), ``auto`` (knn from ``pool_auto_min`` embedded view
    vectors on, :func:`raresift.learn.session.knn_by_default`: 2,000,000 photos, 200,000 with tiles). ``strategy="similar"`` ("more like these") picks the photos most like
    the ``examples`` given in this call, less like the ``counter_examples`` (image ids); their ``score``
    is then the cosine similarity. ``engine="ray"`` runs the round's full scan of the collection as a Ray
    Data job over shards of the vector file (the cluster at ``ray_address`` or a local Ray; the same
    picks as ``local``). With ``evaluate`` the photos come from the test split: the unlabelled ones
    among the top ``n`` of the test ranking (for precision@K), or, with ``strategy="random"``, ``n``
    random test photos not drawn before (for the random baseline; the ones that already have a label
    are recorded but not returned). Returns one dict per photo: path, image_id, score, strategy,
    round, split, region and tiles (where in the photo the head's score comes from, see
    :func:`raresift.learn.evidence.evidence`; None and [] before a head or without tiles).
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise InputError(f"--n must be a whole number of photos >= 1, got {n!r}")
    get_strategy(strategy)
    if strategy == "similar" and not evaluate and not examples:
        raise InputError("strategy similar needs example photos: --examples ID|FILE ...")
    check_pool(pool)
    check_engine(engine)
    if engine == "ray":
        require_ray()
    if query is not None:
        set_query(store, query)
    if examples or not_like:
        known = json.loads(store.meta(store.concept_key(_META_EXAMPLES)) or "[]")
        set_examples(store, list(examples or known), who=who, not_like=not_like)
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(seed)
    with round_lock(store):
        session, state, fingerprint = load_session(store, engine=engine, ray_address=ray_address)
        labels, test, mask = state["labels"], state["test"], state["mask"]
        if evaluate:
            session.fit(rng)
            z = np.asarray(session.logits(rng), dtype=np.float32).copy()
            z[~mask] = -np.inf
            rows, sources = _evaluation_picks(store, z, labels, test, n, strategy, rng)
            proba = sigmoid(z[rows]) if session.scorer.fitted or session.prior is not None \
                else np.full(len(rows), np.nan)
        else:
            knn = pool == "knn" or (pool == "auto" and _knn_sized(store))
            like = None
            if strategy == "similar":
                unlike = [int(i) for i in counter_examples or ()]
                like = (example_features(store, json.loads(store.meta(store.concept_key(_META_EXAMPLES)) or "[]")),
                        _gather_ids(store, unlike) if unlike
                        else np.zeros((0, 1), dtype=np.float32))
            picks = session.query(n, strategy, rng=rng, candidates=mask, neighbours=_neighbours(store) if knn else None,
                                  similar_to=like)
            rows, sources, proba = picks.rows, picks.sources, picks.proba
        if engine == "ray" and (not session.scorer.fitted or session.last_pool is not None or strategy == "similar"):
            log.warning("--engine ray: this round scored no full scan (%s), so it ran here",
                        "no model yet" if not session.scorer.fitted else
                        "a knn pool" if session.last_pool is not None else "strategy similar")
        if session.scorer.fitted:
            _save_head(store, session.scorer.head, fingerprint)
        params = {
            "query": store.meta(store.concept_key(_META_QUERY)),
            "examples": json.loads(store.meta(store.concept_key(_META_EXAMPLES)) or "[]"),
            "not_like": json.loads(store.meta(store.concept_key(_META_NOT_LIKE)) or "[]"),
            **session.describe(),
            "who": who,
        }
        round_id = store.record_round(
            strategy=strategy, n=n, seed=seed, purpose="evaluate" if evaluate else "label", params=params,
            picks=[(int(r) + 1, s, None if not np.isfinite(p) else float(p)) for r, s, p in zip(rows, sources, proba)],
        )
    if evaluate and strategy == "random":
        keep = labels[rows] == -1  # an "unsure" answer is an answer: not asked again
        rows, sources, proba = rows[keep], [x for x, k in zip(sources, keep) if k], proba[keep]
    paths = store.paths_of(rows + 1)
    split = "test" if evaluate else "pool"
    where = evidence(store, session.scorer.head if session.scorer.fitted else None, [int(r) + 1 for r in rows])
    return [
        {"path": paths[int(r) + 1], "image_id": int(r) + 1,
         "score": None if not np.isfinite(p) else round(float(p), 6), "strategy": s, "round": round_id, "split": split,
         **where[int(r) + 1]}
        for r, s, p in zip(rows, sources, proba)
    ]


def _gather_ids(store: Store, image_ids: list[int]) -> np.ndarray:
    """Features of the project's photos ``image_ids`` (any order)."""
    return gather(store.vectors(), np.array(image_ids, dtype=np.int64) - 1)


def _neighbours(store: Store):
    """labelled rows -> the rows among their ``knn_k`` nearest neighbours (the project's FAISS index, built
    on first use and kept in ``embeddings/``)."""
    from ..index import candidate_pool, project_index

    def near(rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.empty(0, dtype=np.int64)
        return candidate_pool(project_index(store), store.vectors(), rows, k=default("knn_k"))

    return near


def _evaluation_picks(store: Store, z: np.ndarray, labels: np.ndarray, test: np.ndarray, n: int, strategy: str,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    test = np.flatnonzero(test & np.isfinite(z))
    if strategy == "random":
        # Draw from *all* test photos not drawn before, labelled or not: a sample that skipped the
        # labelled top K would underestimate the prevalence. Already labelled ones are recorded
        # in the queue (they count for the baseline) but need no new label.
        drawn = np.array(sorted(i - 1 for i in store.evaluation_random_ids()), dtype=np.int64)
        cand = np.setdiff1d(test, drawn)
        picks, sources = get_strategy("random")(z[cand], n, rng=rng)
        return cand[picks], sources
    # The top n of the whole test ranking; the ones already labelled need no new label.
    order = test[np.lexsort((test, -z[test]))][:n]
    todo = order[labels[order] == -1]
    return todo, ["top"] * len(todo)


def pending(store: Store, *, purpose: str | None = None) -> list[dict[str, Any]]:
    """Photos queued by earlier rounds that have no label yet, oldest round first, in queue order."""
    if purpose is not None and purpose not in PURPOSES:
        raise InputError(f"unknown purpose {purpose!r}; valid: {', '.join(PURPOSES)}")
    return store.pending(purpose)
