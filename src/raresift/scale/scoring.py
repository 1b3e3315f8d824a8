"""Fast paths for a labelling round over millions of rows: masks from SQL aggregates, linear scores by BLAS.

A round at 10^6 photos spends its time in three places when written plainly: building per-image
Python objects from SQLite (the embedded mask, the split of every image), copying and normalising
every block of vectors before the dot product, and small blocks that keep BLAS from streaming.
These helpers avoid all three and return exactly what the plain code returns:

* :func:`embedded_mask` / :func:`split_names`: one SQL aggregate, then numpy; per-image rows are
  fetched only for the minority (images not embedded, test images).
* :func:`linear_scores`: ``unit(f(x)) . w + b`` for every row of the whole-photo view, with
  ``f`` the identity or the signed square root ("power normalisation", ``power=True``), as one
  matrix-vector product per 65,536-row block straight on the memory map (no copy for float32
  files and ``f`` = identity; else one reused float32 buffer), divided by cached row norms.
* :func:`row_norms`: ``|f(x)|`` of every whole-photo vector, computed once and cached beside the
  vectors (``embeddings/norms-<stamp>.npy``), rebuilt when the vector file changes. For the signed
  square root, ``|f(x)|^2 = sum(|x|)``: no square roots needed.
* :func:`whole_features`: ``f(x)`` of every whole-photo vector as a float32 file beside the vectors,
  written once, so that a round with ``f`` = signed square root is again one plain product per block
  (the square roots of 10^9 values cost more than the product itself). Costs the size of a float32
  copy of the whole-photo view on disk (5 GB at 10^6 x 1280).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..learn.features import signed_sqrt

if TYPE_CHECKING:
    from ..project import Project

__all__ = ["SCORE_BLOCK", "embedded_mask", "linear_scores", "row_norms", "split_names", "whole_features"]

SCORE_BLOCK = 65536  # rows per matrix-vector product: big enough for BLAS to stream memory


def embedded_mask(project: Project) -> np.ndarray:
    """Same as :meth:`Project.embedded_mask`, without a Python object per embedded image.

    The ``images_status`` index answers which images are *not* embedded (usually none or few), and
    how many; ``MAX(id)`` is one look-up in the primary key and a bare ``COUNT(*)`` counts b-tree
    pages, not rows (asked together, or the embedded ones counted, each walks 10^6 entries: 0.1 s).
    """
    db = project.db
    n = db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    rows = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    waiting = db.execute("SELECT COUNT(*) FROM images WHERE status IN ('new', 'error')").fetchone()[0]
    if (rows - waiting) * 2 >= rows and rows == n:  # ids are 1..n without gaps (nothing deletes images)
        mask = np.ones(n, dtype=bool)
        mask[_ids(project, "status IN ('new', 'error')", n) - 1] = False
        return mask
    mask = np.zeros(n, dtype=bool)
    mask[_ids(project, "status = 'embedded'", n) - 1] = True
    return mask


def split_names(project: Project) -> np.ndarray:
    """Same values as :meth:`Project.splits` (``'pool'`` / ``'test'`` per row), as a ``<U4`` array."""
    n = project.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    out = np.full(n, "pool", dtype="<U4")
    out[_ids(project, "split = 'test'", n) - 1] = "test"
    return out


_ID_CHUNK = 4_000_000  # ids per group_concat: ~32 MB of text, far below SQLite's 1 GB string limit


def _ids(project: Project, where: str, n: int) -> np.ndarray:
    """Ids of the images matching ``where``, read as comma-joined text parsed by numpy (no Python object per row)."""
    parts = []
    for lo in range(1, n + 1, _ID_CHUNK):
        text = project.db.execute(
            f"SELECT group_concat(id) FROM images WHERE {where} AND id BETWEEN ? AND ?", (lo, lo + _ID_CHUNK - 1)
        ).fetchone()[0]
        if text:
            parts.append(np.fromstring(text, dtype=np.int64, sep=","))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def row_norms(project: Project, vectors: np.ndarray | None = None, *, power: bool = False) -> np.ndarray:
    """L2 norm of every row's whole-photo vector, or of its signed square root (float32), cached on disk."""
    vectors = project.vectors() if vectors is None else vectors
    path, kind, cache = _cache_file(project, "norms", power)
    if cache.is_file():
        norms = np.load(cache, mmap_mode="r")
        if norms.shape == (vectors.shape[0],):
            return norms
    norms = np.empty(vectors.shape[0], dtype=np.float32)
    whole = _whole(vectors)
    buf = None
    for start in range(0, len(norms), SCORE_BLOCK):
        block, buf = _as_float32(whole[start : start + SCORE_BLOCK], buf)
        if power:
            np.sqrt(np.abs(block).sum(axis=1, dtype=np.float32), out=norms[start : start + len(block)])
        else:
            np.sqrt(np.einsum("ij,ij->i", block, block), out=norms[start : start + len(block)])
    _drop_stale(path.parent, f"norms-{kind}-", keep=cache)
    tmp = _tmp_name(cache)
    try:
        np.save(tmp, norms)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return norms


def whole_features(project: Project, vectors: np.ndarray | None = None, *, power: bool = False) -> np.ndarray:
    """``f(whole-photo vector)`` of every row as a float32 ``(rows, dim)`` memory map (``f`` as in
    :func:`linear_scores`). Without ``power`` and for a float32 file that is a view of the vectors;
    otherwise a file ``embeddings/features-<kind>-<stamp>.npy``, written once per vector file."""
    vectors = project.vectors() if vectors is None else vectors
    whole = _whole(vectors)
    if not power and whole.dtype == np.float32:
        return whole
    path, kind, cache = _cache_file(project, "features", power)
    if cache.is_file():
        feats = np.load(cache, mmap_mode="r")
        if feats.shape == whole.shape:
            return feats
    _drop_stale(path.parent, f"features-{kind}-", keep=cache)
    tmp = _tmp_name(cache)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=whole.shape)
        for start in range(0, whole.shape[0], SCORE_BLOCK):
            view = out[start : start + SCORE_BLOCK]
            np.copyto(view, whole[start : start + SCORE_BLOCK])
            if power:
                signed_sqrt(view)
        out.flush()
        del out
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(cache, mmap_mode="r")


def _cache_file(project: Project, what: str, power: bool) -> tuple[Path, str, Path]:
    """(vector file, kind, cache file): the cache is named after the vector file's size and mtime,
    so a changed vector file never meets an old cache."""
    path = project.path / "embeddings" / "vectors.npy"
    st = path.stat()
    kind = "power" if power else "plain"
    return path, kind, path.with_name(f"{what}-{kind}-{st.st_size}-{st.st_mtime_ns}.npy")


def _tmp_name(cache: Path) -> Path:
    """A file name of this thread only: two processes (the web server and a command), or two requests
    of the web server, may build the same cache at once; each writes its own file and the last
    rename wins (same content)."""
    return cache.with_name(f"{cache.stem}.tmp{os.getpid()}-{threading.get_ident()}.npy")


def _drop_stale(folder: Path, prefix: str, *, keep: Path) -> None:
    """Delete the caches of earlier vector files, and half-written ones of processes or threads that
    are gone (those still running are theirs to finish)."""
    for old in folder.glob(f"{prefix}*.npy"):
        if old == keep:
            continue
        match = re.fullmatch(r".*\.tmp(\d+)-(\d+)\.npy", old.name)
        if match and _writing(int(match.group(1)), int(match.group(2))):
            continue
        old.unlink(missing_ok=True)


def _writing(pid: int, thread: int) -> bool:
    """Whether the thread ``thread`` of process ``pid`` may still be writing its file."""
    if pid == os.getpid():
        return thread != threading.get_ident() and thread in {t.ident for t in threading.enumerate()}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def linear_scores(vectors: np.ndarray, coef: np.ndarray, intercept: float, norms: np.ndarray, *,
                  power: bool = False) -> np.ndarray:
    """``unit(f(whole-photo vector)) . coef + intercept`` for every row (float32), ``f`` = signed square
    root with ``power`` else identity; ``norms`` from :func:`row_norms` with the same ``power``.
    Rows of norm 0 score ``intercept``."""
    whole = _whole(vectors)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    out = np.empty(whole.shape[0], dtype=np.float32)
    buf = None
    for start in range(0, len(out), SCORE_BLOCK):
        block, buf = _as_float32(whole[start : start + SCORE_BLOCK], buf, copy=power)
        if power:
            signed_sqrt(block)
        np.matmul(block, coef, out=out[start : start + len(block)])
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32, copy=False)
    out /= safe
    out += np.float32(intercept)
    return out


def _whole(vectors: np.ndarray) -> np.ndarray:
    """The whole-photo view as a plain 2-D ndarray view of the memory map (no copy)."""
    arr = np.asarray(vectors)  # a plain ndarray on the same buffer: no memmap subclass overhead per block
    return arr[:, 0, :] if arr.ndim == 3 else arr


def _as_float32(block: np.ndarray, buf: np.ndarray | None, *, copy: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """``block`` as float32: itself when it already is and no copy is asked for, else in ``buf`` (reused)."""
    if block.dtype == np.float32 and not copy:
        return block, buf
    if buf is None or buf.shape[0] < len(block):
        buf = np.empty(block.shape, dtype=np.float32)
    view = buf[: len(block)]
    np.copyto(view, block)
    return view, buf
