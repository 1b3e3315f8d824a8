"""Ray Data jobs over a project's vectors: the full-scan scoring of a round and the FAISS index build.

The project keeps its vectors in one ``.npy`` file (row = image id - 1). A job cuts it into row
ranges, the *shards*, and runs one Ray Data task per shard: the worker opens the file itself,
memory-mapped (the project folder must be at the same path on every node, a shared file system,
as the photos are for ``embed --engine ray``), so only the head (a few kilobytes) or the trained,
empty index goes out (an index build also sends the rows to add, once, through the object store),
and only scores or the shard's part of the index come back.

* :func:`score_on_ray`: ``features . coef + intercept`` of every row, each shard featurised with
  the same code as the local engine (:func:`raresift.learn.features.featurize`), so a round picks the
  same photos (``raresift next --engine ray``; ``--pool full`` rounds and ``--evaluate`` rounds).
* :func:`index_on_ray`: the driver trains the inverted file's cells (and codes) on a sample, each
  worker adds its shard's rows to a copy, and the driver merges the parts in shard order, which
  gives the same index as adding every row on one machine (``raresift index --engine ray``).

Without an address a local Ray is started for the job and shut down after it; a Ray this process has
already started (``ray.init(...)``) is used as it is (:func:`ray_cluster`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, MissingExtraError

__all__ = ["ENGINES", "SHARD_ROWS", "RayScoring", "check_engine", "index_on_ray", "quiet_ray_data", "ray_cluster", "require_ray", "score_on_ray",
           "shard_bounds"]

log = logging.getLogger(__name__)

SHARD_ROWS = 262_144  # rows per task: 0.25 GB of 512-d float16, big enough to amortise a task's start
ENGINES = ("local", "ray")  # where `embed`, `next` and `index` run their heavy part


def check_engine(engine: str) -> None:
    """One line for an engine that is not one of :data:`ENGINES`."""
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def shard_bounds(n: int, shard_rows: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop)]`` row ranges covering ``0..n`` in order, ``shard_rows`` (default :data:`SHARD_ROWS`)
    each; the last may be shorter."""
    shard_rows = int(shard_rows or SHARD_ROWS)
    if shard_rows < 1:
        raise InputError(f"shard_rows must be at least 1, got {shard_rows}")
    return [(start, min(n, start + shard_rows)) for start in range(0, n, shard_rows)]


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """The ``ray`` module, connected: to the cluster at ``address``, to the Ray this process already
    started, or to a local Ray started here (and shut down on exit)."""
    require_ray()
    import ray

    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise InputError(f"cannot start or reach {where}: {str(exc).splitlines()[0]}") from exc
        started_here = True
    try:
        with quiet_ray_data():
            yield ray
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def quiet_ray_data():
    """Ray Data logs its plans and timings at INFO/WARNING and draws progress bars; the library stays
    silent (the CLI draws its own bar). With ``raresift -v`` (INFO logging) Ray's logging is left alone."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    logger = logging.getLogger("ray.data")
    if logging.getLogger("raresift").isEnabledFor(logging.INFO):
        yield
        return
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


def _shards_dataset(ray, bounds: list[tuple[int, int]]):
    items = [{"start": a, "stop": b} for a, b in bounds]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))), len(items)


# ---------------------------------------------------------------- scoring
def _score_shards(batch: dict[str, np.ndarray], *, path: str, coef: np.ndarray, intercept: float,
                  pooling: str, layout: str = "views") -> dict[str, np.ndarray]:
    """Ray Data task: the linear scores of the rows of each shard in ``batch``."""
    from .learn.features import BLOCK_ROWS, featurize

    vectors = np.load(path, mmap_mode="r")
    rows, scores = [], []
    for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
        for a in range(start, stop, BLOCK_ROWS):
            b = min(stop, a + BLOCK_ROWS)
            block = vectors[a:b]
            rows.append(np.arange(a, b, dtype=np.int64))
            if pooling is None:  # rows that are features already (the tiled-feature cache)
                feats = np.asarray(block, dtype=np.float32)
            else:
                feats = featurize(block if block.ndim == 3 else block[:, None, :], pooling, layout=layout)
            scores.append(feats @ coef + np.float32(intercept))
    if not rows:
        return {"row": np.zeros(0, dtype=np.int64), "score": np.zeros(0, dtype=np.float32)}
    return {"row": np.concatenate(rows), "score": np.concatenate(scores).astype(np.float32)}


def score_on_ray(path: str | Path, coef: np.ndarray, intercept: float, *, pooling: str | None, rows: int,
                 address: str | None = None, shard_rows: int | None = None, layout: str = "views") -> np.ndarray:
    """``featurize(vectors[r]) . coef + intercept`` for every row ``r < rows`` of the ``.npy`` file
    ``path`` (with ``pooling=None`` the file's rows are features already; ``layout`` as in
    :func:`~raresift.learn.features.featurize`), one Ray Data task per shard of ``shard_rows`` rows;
    float32, in row order."""
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    path = Path(path).resolve()  # workers start elsewhere: a relative path would name another file
    out = np.full(rows, np.nan, dtype=np.float32)
    if rows == 0:
        return out
    with ray_cluster(address) as ray:
        ds, shards = _shards_dataset(ray, shard_bounds(rows, shard_rows))
        log.info("Ray: scoring %d rows in %d shards", rows, shards)
        scored = ds.map_batches(_score_shards, batch_size=1, batch_format="numpy",
                                fn_kwargs={"path": str(path), "coef": coef, "intercept": float(intercept),
                                           "pooling": pooling, "layout": layout})
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            out[np.asarray(batch["row"], dtype=np.int64)] = batch["score"]
    if np.isnan(out).any():
        raise RuntimeError(f"Ray scoring returned {int(np.isnan(out).sum())} of {rows} rows unscored")
    return out


class RayScoring:
    """What :class:`raresift.learn.features.VectorFeatures` calls for a full scan on Ray (``next --engine ray``)."""

    def __init__(self, path: str | Path, *, address: str | None = None, shard_rows: int | None = None):
        self.path, self.address, self.shard_rows = Path(path), address, shard_rows

    def linear(self, coef: np.ndarray, intercept: float, *, pooling: str | None, rows: int,
               source: str | Path | None = None, layout: str = "views") -> np.ndarray:
        """Scores of every row of the vector file (or of ``source``, a file of features: ``pooling=None``)."""
        return score_on_ray(source or self.path, coef, intercept, pooling=pooling, rows=rows, address=self.address,
                            shard_rows=self.shard_rows, layout=layout)


def require_ray() -> None:
    """Fail now, with one line naming the extra, when Ray is not installed (before a round starts)."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingExtraError("--engine ray", "ray") from None


# ---------------------------------------------------------------- index
def _index_shards(batch: dict[str, np.ndarray], *, path: str, trained: np.ndarray, rows_ref: Any
                  ) -> dict[str, np.ndarray]:
    """Ray Data task: a copy of the trained empty index with the rows of each shard in ``batch`` added."""
    import faiss
    import ray

    from .store.vectors import ADD_BLOCK, unit_rows, whole_rows

    vectors = np.load(path, mmap_mode="r")
    rows = ray.get(rows_ref) if isinstance(rows_ref, ray.ObjectRef) else np.asarray(rows_ref)
    parts, added, shard = [], [], []
    for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist()):
        index = faiss.deserialize_index(trained)
        mine = rows[np.searchsorted(rows, start) : np.searchsorted(rows, stop)]
        count = 0
        for a in range(0, len(mine), ADD_BLOCK):
            chunk = mine[a : a + ADD_BLOCK]
            block = whole_rows(vectors, chunk)
            keep = np.any(block != 0, axis=1)  # rows never embedded hold zeros: left out, as locally
            if keep.any():
                index.add_with_ids(unit_rows(block[keep]), chunk[keep])
                count += int(keep.sum())
        parts.append(faiss.serialize_index(index).tobytes())
        added.append(count)
        shard.append(start)
    return {"start": np.array(shard, dtype=np.int64), "added": np.array(added, dtype=np.int64),
            "part": np.array(parts, dtype=object)}


def index_on_ray(path: str | Path, rows: np.ndarray, trained: Any, *, address: str | None = None,
                 shard_rows: int | None = None, progress: Callable[[int], None] | None = None) -> tuple[Any, int]:
    """Add ``rows`` (sorted) of the ``.npy`` file ``path`` to the trained, empty inverted-file index
    ``trained`` on Ray: each shard's rows go into a copy on a worker; the parts are merged here in shard
    order. Returns ``(index, vectors added)``."""
    import faiss

    rows = np.asarray(rows, dtype=np.int64)
    path = Path(path).resolve()
    if trained.ntotal:
        raise InputError("index_on_ray needs an empty trained index")
    blob = faiss.serialize_index(trained)
    n = int(rows[-1]) + 1 if len(rows) else 0
    shard_rows = int(shard_rows or SHARD_ROWS)
    index, total = trained, 0
    waiting: dict[int, tuple[bytes, int]] = {}  # parts that came back before an earlier shard's
    # Shards without a row to add get no task (rows may skip whole ranges).
    bounds = [(a, b) for a, b in shard_bounds(n, shard_rows) if np.searchsorted(rows, b) > np.searchsorted(rows, a)]
    order = [a for a, _ in bounds]
    if not bounds:
        return index, 0
    with ray_cluster(address) as ray:
        ds, shards = _shards_dataset(ray, bounds)
        log.info("Ray: adding %d vectors to the index in %d shards", len(rows), shards)
        built = ds.map_batches(_index_shards, batch_size=1, batch_format="numpy",
                               fn_kwargs={"path": str(path), "trained": blob, "rows_ref": ray.put(rows)})
        for batch in built.iter_batches(batch_size=None, batch_format="numpy"):
            for start, added, part in zip(batch["start"].tolist(), batch["added"].tolist(), batch["part"]):
                waiting[int(start)] = (part, int(added))
                if progress is not None:
                    progress(int(np.searchsorted(rows, min(n, start + shard_rows)) - np.searchsorted(rows, start)))
            # Merge in shard order as soon as possible (the inverted lists then come out as a local
            # build's), so the driver holds few parts at a time.
            while order and order[0] in waiting:
                part, added = waiting.pop(order.pop(0))
                if added:
                    index.merge_from(faiss.deserialize_index(np.frombuffer(part, dtype=np.uint8)), 0)
                    total += added
    if order:
        raise RuntimeError(f"Ray index build returned {shards - len(order)} of {shards} shards")
    return index, total
