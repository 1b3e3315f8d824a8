"""Fast paths for a labelling round over millions of rows: masks from SQL aggregates, linear scores by BLAS.

A round at 10^6 photos spends its time in three places when written plainly: building per-image
Python objects from SQLite (the embedded mask, the split of every image), copying and normalising
every block of vectors before the dot product, and small blocks that keep BLAS from streaming.
These helpers avoid all three and return exactly what the plain code returns:

* :func:`embedded_mask` / :func:`split_names`: one SQL aggregate, then numpy; per-image rows are
  fetched only for the minority (images not embedded, test images).
* :func:`linear_scores`: ``(x / |x|) . w + b`` for every row of the whole-photo view, as one
  matrix-vector product per 65,536-row block straight on the memory map (no float32 copy for
  float32 files, one reused buffer for float16 files), divided by cached row norms.
* :func:`row_norms`: the whole-photo vector norms, computed once and cached beside the vectors
  (``embeddings/norms-<stamp>.npy``), rebuilt when the vector file changes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..project import Project

__all__ = ["SCORE_BLOCK", "embedded_mask", "linear_scores", "row_norms", "split_names"]

SCORE_BLOCK = 65536  # rows per matrix-vector product: big enough for BLAS to stream memory


def embedded_mask(project: Project) -> np.ndarray:
    """Same as :meth:`Project.embedded_mask`, without a Python object per image when most are embedded."""
    n, embedded = project.db.execute(
        "SELECT COALESCE(MAX(id), 0), COALESCE(SUM(status = 'embedded'), 0) FROM images"
    ).fetchone()
    if embedded * 2 >= n:
        mask = np.ones(n, dtype=bool)
        off = np.fromiter(
            (r[0] - 1 for r in project.db.execute("SELECT id FROM images WHERE status != 'embedded'")), dtype=np.int64
        )
        mask[off] = False
        if embedded + len(off) < n:  # gaps in the id sequence (never happens today): no row there
            present = np.zeros(n, dtype=bool)
            present[np.fromiter((r[0] - 1 for r in project.db.execute("SELECT id FROM images")), dtype=np.int64)] = True
            mask &= present
        return mask
    mask = np.zeros(n, dtype=bool)
    on = np.fromiter((r[0] - 1 for r in project.db.execute("SELECT id FROM images WHERE status = 'embedded'")),
                     dtype=np.int64)
    mask[on] = True
    return mask


def split_names(project: Project) -> np.ndarray:
    """Same values as :meth:`Project.splits` (``'pool'`` / ``'test'`` per row), as a ``<U4`` array."""
    n = project.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    test = np.fromiter((r[0] - 1 for r in project.db.execute("SELECT id FROM images WHERE split = 'test'")),
                       dtype=np.int64)
    out = np.full(n, "pool", dtype="<U4")
    out[test] = "test"
    return out


def row_norms(project: Project, vectors: np.ndarray | None = None) -> np.ndarray:
    """L2 norm of every row's whole-photo vector (float32), cached beside the vector file."""
    vectors = project.vectors() if vectors is None else vectors
    path = project.path / "embeddings" / "vectors.npy"
    st = path.stat()
    cache = path.with_name(f"norms-{st.st_size}-{st.st_mtime_ns}.npy")
    if cache.is_file():
        norms = np.load(cache, mmap_mode="r")
        if norms.shape == (vectors.shape[0],):
            return norms
    norms = np.empty(vectors.shape[0], dtype=np.float32)
    whole = _whole(vectors)
    buf = None
    for start in range(0, len(norms), SCORE_BLOCK):
        block, buf = _as_float32(whole[start : start + SCORE_BLOCK], buf)
        np.sqrt(np.einsum("ij,ij->i", block, block), out=norms[start : start + len(block)])
    for old in path.parent.glob("norms-*.npy"):
        old.unlink(missing_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npy")
    np.save(tmp, norms)
    os.replace(tmp, cache)
    return norms


def linear_scores(vectors: np.ndarray, coef: np.ndarray, intercept: float, norms: np.ndarray) -> np.ndarray:
    """``unit(whole-photo vector) . coef + intercept`` for every row (float32); rows of norm 0 score ``intercept``."""
    whole = _whole(vectors)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    out = np.empty(whole.shape[0], dtype=np.float32)
    buf = None
    for start in range(0, len(out), SCORE_BLOCK):
        block, buf = _as_float32(whole[start : start + SCORE_BLOCK], buf)
        np.matmul(block, coef, out=out[start : start + len(block)])
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32, copy=False)
    out /= safe
    out += np.float32(intercept)
    return out


def _whole(vectors: np.ndarray) -> np.ndarray:
    """The whole-photo view as a plain 2-D ndarray view of the memory map (no copy)."""
    arr = np.asarray(vectors)  # a plain ndarray on the same buffer: no memmap subclass overhead per block
    return arr[:, 0, :] if arr.ndim == 3 else arr


def _as_float32(block: np.ndarray, buf: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if block.dtype == np.float32:
        return block, buf
    if buf is None or buf.shape[0] < len(block):
        buf = np.empty(block.shape, dtype=np.float32)
    view = buf[: len(block)]
    np.copyto(view, block)
    return view, buf
