"""Features the head sees, built block by block from the project's view vectors.

The vector file holds ``(rows, views, dim)``: view 0 is the whole photo, views 1.. are tiles.
A photo's feature is the L2-normalised whole-photo vector, and, when tiles exist, the
L2-normalised max and mean over its tiles, concatenated, all after a signed square root of each
value (power normalisation: +1.5 points of precision@50 on the flower photos). Each part is
scaled by its weight in :data:`PART_WEIGHTS` and the whole feature has unit length. Small objects
(an insect on a flower) light up one tile; the max over tiles keeps that signal, which the
squeezed whole photo loses. The three parts weigh the same. (Until December 2026 the whole photo
weighed half as much as each tile part, for +2 to 3 points of precision@50 at 25-50 labels on the
flower photos with the older settings; with today's, equal weights are level there (0.854 / 0.902 /
0.906 against 0.848 / 0.908 / 0.908 at 50 / 100 / 200 labels) and better where the rare thing
fills the frame: on 88 Caltech-101 classes +1.1 to +3.1 points at 25-200 labels, 58 classes up,
11 down, 19 level; ``benchmarks/part_weights.py``, ``benchmarks/RESULTS.md``.) Photos without tiles are not
affected.

Everything here works on blocks of rows, so scoring a million photos never copies the whole
memory map (see :func:`iter_blocks`).

**Compact layout** (:data:`LAYOUTS`): a tiled project can keep, instead of its ``views`` vectors per
photo, the three parts its feature is made of (:func:`compact_views`): the whole-photo vector, the
mean of its tiles' signed square roots (stored squared, sign kept, so the signed square root of the
stored value gives it back) and the max over its tiles, plus one byte per value saying which tile
the max came from (:func:`tile_argmax`, for the evidence). :func:`featurize` with
``layout="compact"`` reads such blocks: the same features (up to the float16 rounding of the mean
part) from 3 x dim values a photo instead of ``views`` x dim.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..store.vectors import LOGIT_TOP, layout_of, read_rows, top_logits_dtype

__all__ = [
    "BLOCK_ROWS",
    "DEFAULT_POOLING",
    "LAYOUTS",
    "PART_WEIGHTS",
    "POOLINGS",
    "MatrixFeatures",
    "RowSubset",
    "VectorFeatures",
    "check_layout",
    "compact_logits",
    "compact_views",
    "feature_dim",
    "featurize",
    "gather",
    "iter_blocks",
    "linear_scores",
    "log_sum_exp",
    "pooled_features",
    "signed_sqrt",
    "sqrt_features",
    "sqrt_norms",
    "tile_argmax",
]

# Rows per block when streaming over the memory map: ~20 MB of float16 at 1280-d, 1 view.
BLOCK_ROWS = 8192

POOLINGS = ("whole", "whole+max", "whole+mean+max")
DEFAULT_POOLING = "whole+mean+max"
# Relative weight of each part of a tiled photo's feature (the feature is rescaled to unit length).
PART_WEIGHTS = {"whole": 1.0, "mean": 1.0, "max": 1.0}
# How a project keeps its vectors: every view (whole photo + tiles), or the parts of the feature.
LAYOUTS = ("views", "compact")
COMPACT_PARTS = 3  # whole, mean, max


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else an ``InputError`` that lists them."""
    if layout not in LAYOUTS:
        from ..errors import InputError

        raise InputError(f"unknown vector layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    return layout


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    norm[norm == 0] = 1.0
    x /= norm[:, None]
    return x


def feature_dim(views: int, dim: int, pooling: str = DEFAULT_POOLING) -> int:
    """Length of the feature of a photo with ``views`` views of ``dim`` values."""
    if views <= 1 or pooling == "whole":
        return dim
    return dim * (2 if pooling == "whole+max" else 3)


def signed_sqrt(x: np.ndarray) -> np.ndarray:
    """Signed square root, in place: damps the few large activations that dominate pooled CNN features."""
    if x.size and x.min() < 0:
        neg = np.signbit(x)  # in place throughout: no float temporary, no boolean-indexed writes (2x faster)
        np.abs(x, out=x)
        np.sqrt(x, out=x)
        np.negative(x, out=x, where=neg)
    else:
        np.sqrt(x, out=x)
    return x


def featurize(block: np.ndarray, pooling: str = DEFAULT_POOLING, *, layout: str = "views") -> np.ndarray:
    """Features (float32, unit length) of a block of view vectors of shape (rows, views, dim), or with
    ``layout="compact"`` of a block of :func:`compact_views` parts (rows, 3, dim)."""
    if block.ndim == 2:
        block = block[:, None, :]
    if block.shape[1] <= 1 or pooling == "whole":
        return _unit(signed_sqrt(np.array(block[:, 0, :], dtype=np.float32)))
    names = ("whole", "mean", "max") if pooling == "whole+mean+max" else ("whole", "max")
    weights = np.array([PART_WEIGHTS[name] for name in names], dtype=np.float64)
    weights /= np.sqrt((weights**2).sum())  # unit length overall
    if layout == "compact":
        if block.shape[1] != COMPACT_PARTS:
            raise ValueError(f"compact vectors hold {COMPACT_PARTS} parts a photo, got {block.shape[1]}")
        # The parts side by side already: one copy, each part scaled in place, read as (rows, parts x dim).
        keep = [{"whole": 0, "mean": 1, "max": 2}[name] for name in names]
        out = signed_sqrt(np.array(block if len(keep) == COMPACT_PARTS else block[:, keep, :], dtype=np.float32))
        norms = np.sqrt(np.einsum("rpd,rpd->rp", out, out))
        norms[norms == 0] = 1.0
        out *= (weights.astype(np.float32)[None, :] / norms)[:, :, None]
        return out.reshape(len(out), -1)
    block = signed_sqrt(np.array(block, dtype=np.float32))
    tiles = block[:, 1:, :]
    parts = {"whole": lambda: block[:, 0, :].copy(), "mean": lambda: tiles.mean(axis=1),
             "max": lambda: tiles.max(axis=1)}
    return np.concatenate([_unit(parts[name]()) * np.float32(w) for name, w in zip(names, weights)], axis=1)


def iter_blocks(vectors: np.ndarray, *, rows: np.ndarray | None = None, block: int = BLOCK_ROWS
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(row_indices, vector_block)`` over all rows (or the sorted ``rows``), ``block`` at a time."""
    if rows is None:
        n = vectors.shape[0]
        for start in range(0, n, block):
            stop = min(n, start + block)
            yield np.arange(start, stop), vectors[start:stop]
        return
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), block):
        idx = rows[start : start + block]
        yield idx, read_rows(vectors, idx)


def gather(vectors: np.ndarray, rows: np.ndarray, pooling: str = DEFAULT_POOLING, *, layout: str | None = None
           ) -> np.ndarray:
    """Features of the given rows (any order), as one float32 matrix. ``layout``: what ``vectors`` holds (default:
    the layout the map was opened in, :func:`raresift.store.vectors.layout_of`)."""
    rows = np.asarray(rows, dtype=np.int64)
    layout = layout or layout_of(vectors)
    if len(rows) == 0:
        views = vectors.shape[1] if vectors.ndim == 3 else 1
        return np.zeros((0, feature_dim(views, vectors.shape[-1], pooling)), dtype=np.float32)
    if len(rows) == 1 or np.all(rows[1:] >= rows[:-1]):  # sorted already (pools are): no reordering copies
        parts = [featurize(b, pooling, layout=layout) for _, b in iter_blocks(vectors, rows=rows)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    order = np.argsort(rows, kind="stable")
    out = np.concatenate([featurize(b, pooling, layout=layout) for _, b in iter_blocks(vectors, rows=rows[order])])
    result = np.empty_like(out)
    result[order] = out
    return result


class RowSubset:
    """The rows ``rows`` of row-indexable features, as rows 0.. (lazy: nothing is copied up front).

    An integer gives one 1-D feature (what the strategies look at); a slice or an array gives a matrix."""

    def __init__(self, features, rows: np.ndarray):
        self.features, self.rows = features, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return np.asarray(self.features[self.rows[int(i)]]).reshape(-1)
        return self.features[self.rows[i]]


class MatrixFeatures:
    """Features held in memory: a ``(rows, d)`` float32 matrix (a simulation's photos)."""

    def __init__(self, X: np.ndarray):
        self.X = np.asarray(X, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, rows) -> np.ndarray:
        return self.X[rows]

    def linear(self, coef: np.ndarray, intercept: float) -> np.ndarray:
        """``features . coef + intercept`` of every row (float32)."""
        return self.X @ np.asarray(coef, dtype=np.float32) + np.float32(intercept)

    def subset(self, rows: np.ndarray) -> MatrixFeatures:
        return MatrixFeatures(self.X[rows])


class VectorFeatures:
    """Features of a project's vector memory map ``(rows, views, dim)``, computed block by block on demand.

    With one view per photo, :meth:`linear` scores from a cached float32 file of signed-square-root
    whole-photo vectors and their norms (``sqrt_features`` and ``sqrt_norms`` of the ``cache``, a
    :class:`raresift.store.cache.Cache` beside the vectors): one BLAS product per 65,536-row block,
    the same values as featurising each block. Without a cache (or where it cannot be written, a
    read-only project), every block is featurised. With ``remote`` (a
    :class:`raresift.ray_jobs.RayScoring`), :meth:`linear` runs as a Ray Data job over shards of the
    vector file instead (``next --engine ray``), featurising each block with the same code. ``layout``
    says what the vector file holds (:data:`LAYOUTS`: every view, or the compact parts; default: the layout
    the map was opened in, :func:`raresift.store.vectors.layout_of`).
    """

    def __init__(self, vectors: np.ndarray, pooling: str = DEFAULT_POOLING, *, cache=None, remote=None,
                 pooled: np.ndarray | None = None, layout: str | None = None):
        self.vectors = vectors
        self.pooling = pooling
        self.layout = layout or layout_of(vectors)
        self.cache = cache
        self.remote = remote
        # Tiled photos at scale: every photo's feature, featurised once (float16, :func:`pooled_features`).
        self.pooled = pooled

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            if self.pooled is not None:
                return np.asarray(self.pooled[rows], dtype=np.float32)
            return featurize(self.vectors[rows], self.pooling, layout=self.layout)
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if self.pooled is not None:
            if len(rows) < 2 or np.all(rows[1:] >= rows[:-1]):  # already sorted (pools are): one read, one cast
                return read_rows(self.pooled, rows).astype(np.float32)
            order = np.argsort(rows, kind="stable")  # sorted reads of the memory map
            out = np.empty((len(rows), self.pooled.shape[1]), dtype=np.float32)
            out[order] = read_rows(self.pooled, rows[order])
            return out
        return gather(self.vectors, rows, self.pooling, layout=self.layout)

    def linear(self, coef: np.ndarray, intercept: float) -> np.ndarray:
        coef = np.asarray(coef, dtype=np.float32)
        if self.remote is not None:
            if self.pooled is not None:  # score what the head was trained on: the cached features
                return self.remote.linear(coef, intercept, pooling=None, rows=len(self),
                                          source=getattr(self.pooled, "filename", None))
            return self.remote.linear(coef, intercept, pooling=self.pooling, rows=len(self), layout=self.layout)
        if self.pooled is not None:
            return _block_products(self.pooled, coef) + np.float32(intercept)
        if self.cache is not None and self.vectors.ndim == 3 and self.vectors.shape[1] == 1:
            try:
                feats, norms = sqrt_features(self.vectors, self.cache), sqrt_norms(self.vectors, self.cache)
            except OSError:
                pass
            else:
                return linear_scores(feats, coef, intercept, norms)
        out = np.empty(len(self), dtype=np.float32)
        for rows, block in iter_blocks(self.vectors):
            out[rows] = featurize(block, self.pooling, layout=self.layout) @ coef + np.float32(intercept)
        return out


SCORE_BLOCK = 65536  # rows per matrix-vector product: big enough for BLAS to stream memory


def _whole(vectors: np.ndarray) -> np.ndarray:
    arr = np.asarray(vectors)  # a plain ndarray on the same buffer: no memmap subclass overhead per block
    return arr[:, 0, :] if arr.ndim == 3 else arr


def sqrt_norms(vectors: np.ndarray, cache) -> np.ndarray:
    """L2 norm of the signed square root of every whole-photo vector (``|sqrt(x)|^2 = sum |x|``), cached."""

    def build() -> np.ndarray:
        whole = _whole(vectors)
        norms = np.empty(whole.shape[0], dtype=np.float32)
        for start in range(0, len(norms), SCORE_BLOCK):
            block = np.asarray(whole[start : start + SCORE_BLOCK], dtype=np.float32)
            np.sqrt(np.abs(block).sum(axis=1, dtype=np.float32), out=norms[start : start + len(block)])
        return norms

    return cache.array("sqrtnorm", (vectors.shape,), build, mmap=True)


def sqrt_features(vectors: np.ndarray, cache) -> np.ndarray:
    """Signed square root of every whole-photo vector as a float32 ``(rows, dim)`` memory map, written
    once per vector generation (the square roots of 10^9 values cost more than the product itself)."""
    whole = _whole(vectors)

    def write(tmp) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=whole.shape)
        for start in range(0, whole.shape[0], SCORE_BLOCK):
            view = out[start : start + SCORE_BLOCK]
            np.copyto(view, whole[start : start + SCORE_BLOCK])
            signed_sqrt(view)
        out.flush()
        del out

    return cache.writer("sqrtfeat", (vectors.shape,), write)


def _block_products(feats: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``feats . coef`` (float32) for every row, one matrix-vector product per :data:`SCORE_BLOCK` rows of the
    memory map (float16 rows are cast block by block)."""
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    out = np.empty(feats.shape[0], dtype=np.float32)
    for start in range(0, len(out), SCORE_BLOCK):
        block = np.asarray(feats[start : start + SCORE_BLOCK], dtype=np.float32)
        np.matmul(block, coef, out=out[start : start + len(block)])
    return out


def linear_scores(feats: np.ndarray, coef: np.ndarray, intercept: float, norms: np.ndarray) -> np.ndarray:
    """``(feats / norms) . coef + intercept`` for every row, one matrix-vector product per block; rows of
    norm 0 score ``intercept``."""
    out = _block_products(feats, coef)
    out /= np.where(np.asarray(norms) > 0, norms, 1.0).astype(np.float32, copy=False)
    out += np.float32(intercept)
    return out


def tile_argmax(block: np.ndarray) -> np.ndarray:
    """``(rows, dim)`` uint8: for each value of a tiled photo's max part, the tile (0 = view 1) it comes
    from; ``(rows, 0)`` for photos without tiles. With :func:`featurize`'s output this is all
    :func:`raresift.learn.evidence.contributions_from_pooled` needs to place a score on the tiles: a
    photo's feature plus these ``dim`` bytes stand in for its ``views x dim`` vectors (1,280 + 7,680
    bytes against 25,600 with 3 x 3 tiles at 1280-d)."""
    block = np.asarray(block)
    if block.ndim == 2 or block.shape[1] <= 1:
        return np.zeros((len(block), 0), dtype=np.uint8)
    if block.shape[1] - 1 > 256:
        raise ValueError(f"at most 256 tiles fit a uint8 index, got {block.shape[1] - 1}")
    return np.argmax(block[:, 1:, :], axis=1).astype(np.uint8)  # the signed square root keeps the order


def compact_views(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A block of view vectors ``(rows, views, dim)`` of tiled photos in the compact layout:
    ``(parts, tiles)`` with ``parts`` float16 ``(rows, 3, dim)`` (whole photo, the mean of the tiles'
    signed square roots stored as its signed square, the max over the tiles) and ``tiles`` uint8
    ``(rows, dim)`` (:func:`tile_argmax`). ``featurize(parts, layout="compact")`` equals
    ``featurize(block)`` up to float16 rounding."""
    block = np.asarray(block, dtype=np.float16)  # as the views layout keeps them: the same ties, the same argmax
    if block.ndim != 3 or block.shape[1] < 2:
        raise ValueError(f"the compact layout is for tiled photos (rows, views > 1, dim), got {block.shape}")
    tiles = np.asarray(block[:, 1:, :], dtype=np.float32)
    parts = np.empty((block.shape[0], COMPACT_PARTS, block.shape[2]), dtype=np.float16)
    parts[:, 0] = block[:, 0]
    mean = signed_sqrt(tiles.copy()).mean(axis=1)
    parts[:, 1] = np.sign(mean) * mean * mean
    parts[:, 2] = tiles.max(axis=1)
    return parts, tile_argmax(block)


def log_sum_exp(z: np.ndarray) -> np.ndarray:
    """``log(sum(exp(z)))`` over the last axis, without overflow: the normaliser of softmax log-probabilities."""
    m = z.max(axis=-1, keepdims=True)
    return m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))


def compact_logits(block: np.ndarray, top: int = LOGIT_TOP) -> np.ndarray:
    """``(rows, views, classes)`` logits as the compact layout keeps them: ``(rows,)`` records of
    :func:`raresift.store.vectors.top_logits_dtype`, each view's ``top`` most likely classes (class index,
    float16 log-probability) and each class's best log-probability over the views (3,280 bytes a photo
    with 10 views and 1,000 classes instead of 20,000). A text query's score (the weighted probability of
    its concepts, highest over the views: :func:`raresift.learn.coldstart.text_scores_from_logits`) is
    exact for a query of one concept, and for several where a view's top classes hold them."""
    z = np.asarray(block, dtype=np.float32)
    if z.ndim == 2:
        z = z[:, None, :]
    rows, views, classes = z.shape
    top = min(top, classes)
    logp = z - log_sum_exp(z)[..., None]
    idx = np.argpartition(-logp, top - 1, axis=2)[..., :top]
    out = np.empty(rows, dtype=top_logits_dtype(views, classes, top))
    out["c"] = idx
    out["lp"] = np.take_along_axis(logp, idx, axis=2)
    out["best"] = logp.max(axis=1)
    return out


def pooled_features(vectors: np.ndarray, cache, pooling: str = DEFAULT_POOLING, *, build: bool = True
                    ) -> np.ndarray | None:
    """Every photo's feature (:func:`featurize`) as a float16 ``(rows, feature_dim)`` memory map, written
    once per vector generation: for tiled photos kept as views at scale, a round then reads 3 x dim values
    a photo (7.7 KB at 1280-d) instead of featurising 10 views (25.6 KB) from the vector file. (Kept
    compact, the vector file holds as few bytes and a round featurises them: one file to keep in memory.)
    With ``build=False``, the file if it is there, else None."""
    views = vectors.shape[1] if vectors.ndim == 3 else 1
    shape = (vectors.shape[0], feature_dim(views, vectors.shape[-1], pooling))
    parts = (vectors.shape, pooling, tuple(sorted(PART_WEIGHTS.items())))
    if not build:
        return cache.existing("pooled", parts)

    def write(tmp) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for rows, block in iter_blocks(vectors):
            out[rows[0] : rows[-1] + 1] = featurize(block, pooling, layout=layout_of(vectors)).astype(np.float16)
        out.flush()
        del out

    return cache.writer("pooled", parts, write)
