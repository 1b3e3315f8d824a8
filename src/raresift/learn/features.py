"""Features the head sees, built block by block from the project's view vectors.

The vector file holds ``(rows, views, dim)``: view 0 is the whole photo, views 1.. are tiles.
A photo's feature is the L2-normalised whole-photo vector, and, when tiles exist, the
L2-normalised max and mean over its tiles, concatenated, all after a signed square root of each
value (power normalisation: +1.5 points of precision@50 on the flower photos). Each part is
scaled by its weight in :data:`PART_WEIGHTS` and the whole feature has unit length. Small objects
(an insect on a flower) light up one tile; the max over tiles keeps that signal, which the
squeezed whole photo loses. The whole photo weighs half as much as each tile part: the tiles see
the same scene at three times the resolution (their mean is a sharper view of the whole scene),
so at equal weights the low-resolution view, mostly background, took a third of every similarity
and of the head's regularisation budget. Measured on the flower photos: +2 to 3 points of
precision@50 at 25-50 labels, level at 100-200; on a whole-scene rare class (daisies among
dandelions) level (``benchmarks/RESULTS.md``). Photos without tiles are not affected.

Everything here works on blocks of rows, so scoring a million photos never copies the whole
memory map (see :func:`iter_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "BLOCK_ROWS", "DEFAULT_POOLING", "PART_WEIGHTS", "POOLINGS", "feature_dim", "featurize", "gather", "iter_blocks",
    "signed_sqrt",
]

# Rows per block when streaming over the memory map: ~20 MB of float16 at 1280-d, 1 view.
BLOCK_ROWS = 8192

POOLINGS = ("whole", "whole+max", "whole+mean+max")
DEFAULT_POOLING = "whole+mean+max"
# Relative weight of each part of a tiled photo's feature (the feature is rescaled to unit length).
PART_WEIGHTS = {"whole": 0.5, "mean": 1.0, "max": 1.0}


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
        neg = x < 0
        np.sqrt(np.abs(x), out=x)
        x[neg] *= -1
    else:
        np.sqrt(x, out=x)
    return x


def featurize(block: np.ndarray, pooling: str = DEFAULT_POOLING) -> np.ndarray:
    """Features (float32, unit length) of a block of view vectors of shape (rows, views, dim)."""
    if block.ndim == 2:
        block = block[:, None, :]
    if block.shape[1] <= 1 or pooling == "whole":
        return _unit(signed_sqrt(np.array(block[:, 0, :], dtype=np.float32)))
    block = signed_sqrt(np.array(block, dtype=np.float32))
    tiles = block[:, 1:, :]
    names = ("whole", "mean", "max") if pooling == "whole+mean+max" else ("whole", "max")
    parts = {"whole": lambda: block[:, 0, :].copy(), "mean": lambda: tiles.mean(axis=1),
             "max": lambda: tiles.max(axis=1)}
    weights = np.array([PART_WEIGHTS[name] for name in names], dtype=np.float64)
    weights /= np.sqrt((weights**2).sum())  # unit length overall
    out = np.concatenate([_unit(parts[name]()) * np.float32(w) for name, w in zip(names, weights)], axis=1)
    return out


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
        yield idx, vectors[idx]


def gather(vectors: np.ndarray, rows: np.ndarray, pooling: str = DEFAULT_POOLING) -> np.ndarray:
    """Features of the given rows (any order), as one float32 matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        views = vectors.shape[1] if vectors.ndim == 3 else 1
        return np.zeros((0, feature_dim(views, vectors.shape[-1], pooling)), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    out = np.concatenate([featurize(b, pooling) for _, b in iter_blocks(vectors, rows=rows[order])])
    result = np.empty_like(out)
    result[order] = out
    return result
