"""Where in a photo a score comes from: the head's logit split over the photo's tiles.

A tiled photo's feature (:func:`~raresift.learn.features.featurize`) is the whole-photo part, the
mean over its tiles and the max over its tiles (signed square root, each part L2-normalised and
weighted). The head is linear, so its logit splits exactly into a sum:

* the whole-photo part and the intercept (belong to no tile);
* the mean part: each tile's share is ``coef_mean . tile / (T x norm)``;
* the max part: each value of the max comes from one tile (its argmax), which gets that term.

The per-tile contributions (log-odds units) plus the whole-photo part and the intercept add up to
the head's logit. The **region** is the box of the tile with the largest contribution, in pixels of
the original file (after its EXIF orientation). Tiles overlap: an N x N grid of tiles, each 2/(N+1)
of the photo's width and height, stepped by 1/(N+1) (:func:`raresift.embed.decode.cut_views`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..embed.decode import DecodeError, image_size
from ..store.store import Store
from ..store.vectors import layout_of, read_rows
from .features import (
    DEFAULT_POOLING,
    PART_WEIGHTS,
    feature_dim,
    featurize,
    signed_sqrt,
    tile_argmax,
)
from .head import RareHead

__all__ = ["contributions", "contributions_from_pooled", "evidence", "photo_sizes", "tile_boxes"]


def tile_boxes(width: float, height: float, tiles: int) -> np.ndarray:
    """``(tiles * tiles, 4)`` boxes ``x, y, width, height`` of the tiles, row by row, in the photo's pixels."""
    if tiles <= 0:
        return np.zeros((0, 4))
    sx, sy = width / (tiles + 1), height / (tiles + 1)
    i, j = np.divmod(np.arange(tiles * tiles), tiles)
    return np.stack([j * sx, i * sy, np.full(len(i), 2 * sx), np.full(len(i), 2 * sy)], axis=1)


def contributions(head: RareHead, block: np.ndarray, pooling: str = DEFAULT_POOLING) -> tuple[np.ndarray, np.ndarray]:
    """Split the head's logit of each photo of ``block`` (rows, views, dim) over its tiles.

    Returns ``(rest, per_tile)``: the whole-photo part plus the intercept ``(rows,)``, and the
    contribution of every tile ``(rows, tiles)``; ``rest + per_tile.sum(1)`` is the head's logit.
    Without tiles (one view, or ``pooling == "whole"``) ``per_tile`` has no columns."""
    block = np.asarray(block, dtype=np.float32)
    if block.ndim == 2:
        block = block[:, None, :]
    rows, views, dim = block.shape
    coef = np.asarray(head.coef_, dtype=np.float64)
    s = signed_sqrt(block.astype(np.float64))
    if views <= 1 or pooling == "whole":
        whole = s[:, 0, :]
        norm = np.linalg.norm(whole, axis=1)
        norm[norm == 0] = 1.0
        return (whole @ coef) / norm + head.intercept_, np.zeros((rows, 0))
    names = ("whole", "mean", "max") if pooling == "whole+mean+max" else ("whole", "max")
    w = np.array([PART_WEIGHTS[name] for name in names], dtype=np.float64)
    w /= np.sqrt((w**2).sum())
    part = dict(zip(names, w))
    c = {name: coef[k * dim : (k + 1) * dim] for k, name in enumerate(names)}
    tiles = s[:, 1:, :]
    t = tiles.shape[1]

    def unit_norm(x: np.ndarray) -> np.ndarray:
        n = np.linalg.norm(x, axis=1)
        n[n == 0] = 1.0
        return n

    rest = (s[:, 0, :] @ c["whole"]) * part["whole"] / unit_norm(s[:, 0, :]) + head.intercept_
    per_tile = np.zeros((rows, t))
    if "mean" in part:
        mean = tiles.mean(axis=1)
        per_tile += (tiles @ c["mean"]) * (part["mean"] / (t * unit_norm(mean)))[:, None]
    top = tiles.max(axis=1)
    which = tiles.argmax(axis=1)  # (rows, dim): the tile each max value comes from
    terms = top * c["max"][None, :] * (part["max"] / unit_norm(top))[:, None]
    for r in range(rows):
        per_tile[r] += np.bincount(which[r], weights=terms[r], minlength=t)
    return rest, per_tile


def contributions_from_pooled(head: RareHead, features: np.ndarray, which: np.ndarray, tiles: int,
                              pooling: str = DEFAULT_POOLING) -> tuple[np.ndarray, np.ndarray]:
    """:func:`contributions` from what compact storage would keep instead of every view: each photo's
    feature (:func:`~raresift.learn.features.featurize`, ``(rows, parts x dim)``) and the tile each value of
    its max part comes from (:func:`~raresift.learn.features.tile_argmax`, ``(rows, dim)``).

    The max part's terms go to their tiles exactly as in :func:`contributions`; the mean part's share,
    which needs the tiles' own vectors, is spread evenly over the ``tiles`` tiles. ``rest +
    per_tile.sum(1)`` is still the head's logit. On the flower insects the region found this way held
    the insect's centre as often as the exact split (0.89, and 0.84 of the box inside it; 5 repeats,
    ``benchmarks/evidence_flowers.py --from-pooled``)."""
    f = np.asarray(features, dtype=np.float64)
    which = np.asarray(which)
    rows = len(f)
    if tiles <= 0 or which.shape[1] == 0 or pooling == "whole":
        return f @ np.asarray(head.coef_, dtype=np.float64) + head.intercept_, np.zeros((rows, 0))
    names = ("whole", "mean", "max") if pooling == "whole+mean+max" else ("whole", "max")
    dim = which.shape[1]
    if f.shape[1] != len(names) * dim:
        raise ValueError(f"features of {f.shape[1]} values do not match {len(names)} parts of {dim}")
    coef = np.asarray(head.coef_, dtype=np.float64)
    part = {name: (f[:, k * dim : (k + 1) * dim], coef[k * dim : (k + 1) * dim]) for k, name in enumerate(names)}
    rest = part["whole"][0] @ part["whole"][1] + head.intercept_
    even = part["mean"][0] @ part["mean"][1] / tiles if "mean" in part else np.zeros(rows)
    terms = part["max"][0] * part["max"][1][None, :]
    per_tile = np.repeat(even[:, None], tiles, axis=1)
    for r in range(rows):
        per_tile[r] += np.bincount(which[r], weights=terms[r], minlength=tiles)[:tiles]
    return rest, per_tile


def photo_sizes(store: Store, image_ids: list[int]) -> dict[int, tuple[int, int] | None]:
    """Width and height (after EXIF orientation) of photos, read once from their files and kept in the
    store; None for photos without a readable file (imported vectors, a moved or corrupt file)."""
    sizes = store.image_sizes(image_ids)
    missing = {i: None for i, wh in sizes.items() if wh is None}
    for i in missing:
        path = store.file_path(i)
        if path is None:
            continue
        try:
            missing[i] = image_size(path)
        except DecodeError:
            continue
    found = {i: wh for i, wh in missing.items() if wh is not None}
    if found:
        store.set_image_sizes(found)
    sizes.update(found)
    return sizes


def evidence(store: Store, head: RareHead | None, image_ids: list[int], *, from_pooled: bool = False
             ) -> dict[int, dict[str, Any]]:
    """Per photo: ``region`` (the box of its strongest tile: x, y, width, height in original pixels, or
    None) and ``tiles`` (every tile's box and its contribution to the head's logit, ``score``).

    Empty regions and tile lists where there is no head yet, the project has no tiles, or the photo's
    size is unknown. In the compact layout (and with ``from_pooled`` in the views layout) the split comes from
    each photo's feature and :func:`~raresift.learn.features.tile_argmax` only (:func:`contributions_from_pooled`):
    measured the same regions as the exact split from every view."""
    info = store.embedding_info()
    n_tiles = int(info["tiles"]) if info else 0
    empty = {"region": None, "tiles": []}
    if head is None or n_tiles <= 0 or not image_ids:
        return {int(i): dict(empty) for i in image_ids}
    vectors = store.vectors()
    if vectors.ndim != 3 or len(head.coef_) != feature_dim(vectors.shape[1], vectors.shape[2]):
        return {int(i): dict(empty) for i in image_ids}  # a head of other vectors (the project was re-embedded)
    ids = np.asarray(image_ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    block = read_rows(vectors, ids[order] - 1)
    if layout_of(vectors) == "compact":  # the photo's parts and the tile of each max value: all the split needs
        which = store.tile_argmax()
        if which is None:
            return {int(i): dict(empty) for i in image_ids}
        _, per_tile = contributions_from_pooled(head, featurize(block, layout="compact"),
                                                read_rows(which, ids[order] - 1), n_tiles * n_tiles)
    elif from_pooled:
        _, per_tile = contributions_from_pooled(head, featurize(block), tile_argmax(block), block.shape[1] - 1)
    else:
        _, per_tile = contributions(head, block)
    sizes = photo_sizes(store, [int(i) for i in ids])
    out: dict[int, dict[str, Any]] = {}
    for k, pos in enumerate(order):
        i = int(ids[pos])
        wh = sizes.get(i)
        if wh is None or per_tile.shape[1] != n_tiles * n_tiles:
            out[i] = dict(empty)
            continue
        boxes = tile_boxes(wh[0], wh[1], n_tiles)
        scores = per_tile[k]
        best = boxes[int(np.argmax(scores))]
        out[i] = {
            "region": _box(best),
            "tiles": [{**_box(b), "score": round(float(v), 4)} for b, v in zip(boxes, scores)],
        }
    return out


def _box(b: np.ndarray) -> dict[str, int]:
    x, y, w, h = (float(v) for v in b)
    return {"x": int(round(x)), "y": int(round(y)), "width": int(round(w)), "height": int(round(h))}
