"""A FAISS index over a project's whole-photo vectors: candidate pools, "more like this", near-duplicates.

Vectors are L2-normalised before they go in, so every score here is a cosine similarity
(inner product of unit vectors). The index holds image *rows* (image id - 1) as its ids, so
results index straight into :meth:`Project.vectors` and the label arrays.

Kinds of index, chosen by ``kind="auto"`` from the number of vectors:

``flat``
    Exact search, a float32 copy of the vectors (4 bytes x dim per photo). Up to 50,000 photos.
``ivf-sq8``
    Inverted file (``sqrt(n)`` k-means cells) with 8-bit scalar-quantised vectors: 1 byte x dim per
    photo, a search visits ``nprobe`` cells. Above 50,000 photos, while the codes take at most
    ``index_sq8_max_gb`` (:mod:`raresift.settings`, 2 GB: 4 million 512-d or 1.6 million 1280-d photos).
``ivf-pq``
    Inverted file with product quantisation (64 bytes per photo: 0.64 GB at 10^7) above that, and above
    50,000 photos for tiled photos kept compact (see :func:`auto_kind`): 4-bit
    codes scanned with SIMD (FAISS fast-scan), six times faster than 8-bit codes of the same size. Its
    similarities are approximate, so :meth:`VectorIndex.neighbours` and :func:`more_like_this` fetch
    ``pq_refine`` times the neighbours asked for and rank them by the exact vectors (read from the
    memory map: a few rows per query).

Inverted files are opened with FAISS ``IO_FLAG_MMAP``: an ivf-sq8 file is memory-mapped (opening costs
nothing, a search reads only the cells it visits); the fast-scan lists of ivf-pq are read whole
(0.5 s and 0.7 GB at 10^7).

The candidate pool follows Coleman et al., "Similarity Search for Efficient Active Learning and
Search of Rare Concepts" (SEALS, AAAI 2022): each round scores only the unlabelled photos among
the k nearest neighbours of the labelled ones, so round time depends on the number of labels, not
on the size of the collection. Neighbour lists of a labelled photo never change while the index
stays the same, so they are cached: a round searches only the photos labelled since the last one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, NotReadyError
from .ray_jobs import check_engine
from .settings import default
from .store.store import Store
from .store.vectors import ADD_BLOCK, layout_of
from .store.vectors import unit_rows as _unit
from .store.vectors import whole_rows as _gather

__all__ = [
    "KINDS",
    "VectorIndex",
    "build_index",
    "candidate_pool",
    "duplicate_groups",
    "more_like_this",
    "near_duplicates",
    "project_index",
    "similar",
    "auto_kind",
]

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf-sq8", "ivf-pq")
FLAT_MAX = 50_000  # above this, "auto" builds an inverted file (exact search gets slow and big)
_BLOCK = ADD_BLOCK  # rows read from the memory map at a time while adding


@dataclass
class VectorIndex:
    """A built index: ``search`` returns cosine similarities and image rows (-1 = no result)."""

    index: Any  # faiss.Index; None until first needed when opened lazily from ``path``
    kind: str
    dim: int
    size: int
    nprobe: int | None = None
    stamp: dict = field(default_factory=dict)
    path: Path | None = None
    _knn_cache: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    def _faiss(self):
        if self.index is None:
            import faiss

            # ivf-sq8 lists are memory-mapped (opening is free, a search pages in only the cells it
            # visits); FAISS reads fast-scan lists (ivf-pq) whole.
            flags = faiss.IO_FLAG_MMAP if self.kind != "flat" else 0
            self.index = faiss.read_index(str(self.path), flags)
        return self.index

    @property
    def approximate(self) -> bool:
        """True when the index's similarities are rough (product quantisation): callers re-rank exactly."""
        return self.kind == "ivf-pq"

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows of each query: ``(similarities (m, k) float32, rows (m, k) int64)``."""
        q = _unit(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise InputError(f"queries have {q.shape[1]} dimensions, the index {self.dim}")
        k = int(min(max(k, 1), max(self.size, 1)))
        if self.nprobe is not None:
            import faiss

            faiss.extract_index_ivf(self._faiss()).nprobe = int(nprobe or self.nprobe)
        sims, rows = self._faiss().search(q, k)
        return sims, rows

    def neighbours(self, vectors: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
        """``(len(rows), k)`` nearest rows of the given rows (themselves included), cached per row.

        An index opened by :func:`project_index` keeps the cache on disk beside it, so a new
        command searches only the photos labelled since the last one (and, when there are none,
        does not even read the FAISS file).
        """
        rows = np.asarray(rows, dtype=np.int64)
        todo = [r for r in dict.fromkeys(rows.tolist()) if (r, k) not in self._knn_cache]
        if todo:
            queries = _gather(vectors, np.array(todo, dtype=np.int64))
            if self.approximate:
                _, found = _rerank(vectors, queries, self.search(queries, k * default("pq_refine"))[1], k)
            else:
                _, found = self.search(queries, k)
            for r, nb in zip(todo, found):
                self._knn_cache[(r, k)] = nb
            self._save_neighbours()
        if len(rows) == 0:
            return np.empty((0, k), dtype=np.int64)
        return np.stack([self._knn_cache[(r, k)] for r in rows.tolist()])

    def _knn_stamp(self) -> dict:
        """What the cached neighbours belong to: the vectors (the index's stamp) and the kind of index."""
        return {**self.stamp, "kind": self.kind, "nprobe": self.nprobe}

    def _knn_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.stem + "-knn.npz")

    def _save_neighbours(self) -> None:
        target = self._knn_path()
        if target is None:
            return
        arrays: dict[str, np.ndarray] = {"stamp": np.array(json.dumps(self._knn_stamp(), sort_keys=True))}
        for k in sorted({k for _, k in self._knn_cache}):
            rows = sorted(r for r, kk in self._knn_cache if kk == k)
            arrays[f"rows_{k}"] = np.array(rows, dtype=np.int64)
            arrays[f"nbrs_{k}"] = np.stack([self._knn_cache[(r, k)] for r in rows])
        tmp = target.with_name(target.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, target)

    def _load_neighbours(self) -> None:
        source = self._knn_path()
        if source is None or not source.is_file():
            return
        try:
            with np.load(source) as data:
                if str(data["stamp"]) != json.dumps(self._knn_stamp(), sort_keys=True):
                    return  # neighbours of another index
                for key in data.files:
                    if key.startswith("rows_"):
                        k = int(key[5:])
                        for r, nb in zip(data[key].tolist(), data[f"nbrs_{k}"]):
                            self._knn_cache[(r, k)] = nb
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache is only slower
            log.warning("ignoring neighbour cache %s (%s)", source, exc)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (and its stamp beside it, ``.json``) atomically."""
        import faiss

        path = Path(path)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(self._faiss(), str(tmp))
        os.replace(tmp, path)
        meta = {"kind": self.kind, "dim": self.dim, "size": self.size, "nprobe": self.nprobe, **self.stamp}
        stamp_path = path.with_suffix(".json")
        stamp_path.with_suffix(".json.tmp").write_text(json.dumps(meta))
        os.replace(stamp_path.with_suffix(".json.tmp"), stamp_path)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, *, lazy: bool = False) -> VectorIndex:
        """Read an index written by :meth:`save` (with ``lazy``, the FAISS file only when a search needs it)."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        if not path.is_file():
            raise FileNotFoundError(path)
        stamp = {k: v for k, v in meta.items() if k not in ("kind", "dim", "size", "nprobe")}
        out = cls(None, meta["kind"], meta["dim"], meta["size"], meta.get("nprobe"), stamp, path)
        if not lazy:
            out._faiss()
        return out


def build_index(
    vectors: np.ndarray,
    rows: np.ndarray | None = None,
    *,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    threads: int | None = None,
    random_state: int = 0,
    progress: Callable[[int], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> VectorIndex:
    """Build an index over ``vectors`` (``(n, dim)`` or a project's ``(n, views, dim)``; view 0 is used).

    ``rows`` selects the rows to index (default: all); the index returns these row numbers.
    ``nlist`` / ``nprobe`` tune the inverted-file kinds (defaults: ``sqrt(n)`` cells, visit
    ``max(8, nlist // 64)``). ``progress(n_added)`` is called after each block.
    ``engine="ray"`` adds the vectors of an inverted file on Ray (:func:`raresift.ray_jobs.index_on_ray`:
    ``vectors`` must then be a memory-mapped ``.npy`` file that every node reads at the same path); the
    cells are trained here either way, and the result is the same index.
    """
    import faiss

    if kind not in KINDS:
        raise InputError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
    check_engine(engine)
    if threads:
        faiss.omp_set_num_threads(int(threads))
    dim = int(vectors.shape[-1])
    rows = np.arange(vectors.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(rows)
    if kind == "auto":
        kind = auto_kind(n, dim)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        used_nprobe = None
    else:
        nlist = int(nlist or min(65536, max(16, round(np.sqrt(max(n, 1))))))
        if n < nlist:
            raise InputError(f"an {kind} index needs at least nlist={nlist} vectors, got {n}; use kind='flat'")
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf-sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = _ivf_pq(faiss, quantizer, dim, nlist)
            index.pq.cp.min_points_per_centroid = 1  # small collections: no warning per sub-quantizer
        index.cp.seed = int(random_state)
        # k-means needs ~30-256 points per cell; more only costs time.
        rng = np.random.default_rng(random_state)
        n_train = min(n, max(nlist * 40, 10000))
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        index.train(_unit(_gather(vectors, rows[sample])))
        used_nprobe = int(nprobe or max(8, nlist // 64))
        index.nprobe = used_nprobe
    if engine == "ray" and kind != "flat":
        source = getattr(vectors, "filename", None)
        if source is None:
            raise InputError("engine='ray' builds from a memory-mapped .npy file (a project's vectors), not an array")
        from .ray_jobs import index_on_ray

        index, added = index_on_ray(source, np.sort(rows), index, address=ray_address, progress=progress)
        return VectorIndex(_fast_scan(faiss, index), kind, dim, added, used_nprobe)
    added = 0
    for start in range(0, n, _BLOCK):
        chunk = rows[start : start + _BLOCK]
        block = _gather(vectors, chunk)
        keep = np.any(block != 0, axis=1)  # rows never embedded hold zeros: leave them out
        if not keep.all():
            block, chunk = block[keep], chunk[keep]
        if len(chunk):
            index.add_with_ids(_unit(block), chunk)
            added += len(chunk)
        if progress is not None:
            progress(len(rows[start : start + _BLOCK]))
    return VectorIndex(_fast_scan(faiss, index), kind, dim, added, used_nprobe)


def project_index(
    store: Store,
    *,
    kind: str = "auto",
    rebuild: bool = False,
    save: bool = True,
    **options: Any,
) -> VectorIndex:
    """The index of a project's embedded photos, built on first use and kept in ``embeddings/index.faiss``.

    A saved index is reused while the vectors file and the set of embedded photos are unchanged
    (and, unless ``kind`` is ``auto``, it is of the asked kind); otherwise it is rebuilt.
    Other options go to :func:`build_index`.
    """
    vectors = store.vectors()
    stamp = {"vectors_generation": store.vectors_generation(), "rows": int(vectors.shape[0])}
    path = store.paths.index
    if not rebuild and path.is_file() and path.with_suffix(".json").is_file():
        try:
            cached = VectorIndex.load(path, lazy=True)  # the FAISS file is read when a search needs it
        except Exception as exc:  # noqa: BLE001  a damaged file is rebuilt, never trusted
            log.warning("cannot read %s (%s); rebuilding", path, exc)
        else:
            if cached.stamp == stamp and kind in ("auto", cached.kind):
                cached._load_neighbours()
                return cached
    rows = np.flatnonzero(store.embedded_mask())
    if len(rows) == 0:
        raise NotReadyError(f"{store.root} has no embedded photos to index; run `raresift embed` first")
    t0 = time.perf_counter()
    if kind == "auto":
        kind = auto_kind(len(rows), int(vectors.shape[-1]), compact=layout_of(vectors) == "compact")
    built = build_index(vectors, rows, kind=kind, **options)
    built.stamp = stamp
    log.info("built a %s index of %d vectors in %.1f s", built.kind, built.size, time.perf_counter() - t0)
    if save:
        built.save(path)
        knn = built._knn_path()
        if knn is not None:
            knn.unlink(missing_ok=True)  # neighbours found by the index this one replaces
    return built


def candidate_pool(
    index: VectorIndex,
    vectors: np.ndarray,
    labelled_rows: Sequence[int] | np.ndarray,
    *,
    k: int = 100,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """SEALS candidate pool: the sorted rows among the ``k`` nearest neighbours of any labelled row.

    ``exclude`` is a boolean mask over rows (e.g. labelled or held-out photos) removed from the pool.
    """
    labelled_rows = np.asarray(labelled_rows, dtype=np.int64)
    if len(labelled_rows) == 0:
        return np.empty(0, dtype=np.int64)
    nb = index.neighbours(vectors, labelled_rows, k + 1)  # +1: a photo is its own nearest neighbour
    pool = np.unique(nb[nb >= 0])
    if exclude is not None:
        pool = pool[~np.asarray(exclude, dtype=bool)[pool]]
    else:
        pool = np.setdiff1d(pool, labelled_rows, assume_unique=False)
    return pool


def more_like_this(
    index: VectorIndex,
    vectors: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    *,
    n: int = 20,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` photos most similar to the given example rows (their mean direction), best first.

    Returns ``(rows, similarities)``; the examples themselves and rows set in ``exclude`` are left out.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise InputError("more_like_this needs at least one example photo")
    query = _unit(_gather(vectors, rows)).mean(axis=0, keepdims=True)
    skip = set(rows.tolist())
    want = n + len(skip)
    while True:
        if index.approximate:
            sims, found = _rerank(vectors, query, index.search(query, want * default("pq_refine"))[1], want)
        else:
            sims, found = index.search(query, want)
        keep = [
            (r, s)
            for r, s in zip(found[0].tolist(), sims[0].tolist())
            if r >= 0 and r not in skip and (exclude is None or not exclude[r])
        ]
        if len(keep) >= n or want >= index.size:
            break
        want = min(index.size, want * 4)
    keep = keep[:n]
    return (np.array([r for r, _ in keep], dtype=np.int64), np.array([s for _, s in keep], dtype=np.float32))


def near_duplicates(
    index: VectorIndex,
    vectors: np.ndarray,
    *,
    threshold: float = 0.95,
    k: int = 8,
    rows: np.ndarray | None = None,
    nprobe: int | None = 1,
    block: int = 4096,
) -> list[list[int]]:
    """Groups of rows whose vectors have cosine similarity >= ``threshold`` (linked transitively).

    Each photo is compared with its ``k`` nearest neighbours, so groups larger than ``k`` are
    found through their links. Inverted-file indexes search ``nprobe`` cells (default 1: near
    copies fall into the same cell). Groups are sorted, largest first.
    """
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"threshold must be in (0, 1], got {threshold}")
    rows = np.arange(vectors.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        root = a
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(a, a) != root:  # path compression
            parent[a], a = root, parent[a]
        return root

    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        q = _gather(vectors, chunk)
        keep = np.any(q != 0, axis=1)
        if not keep.any():
            continue
        sims, found = index.search(q[keep], k + 1, nprobe=nprobe)
        if index.approximate:  # product-quantised similarities are rough: the threshold needs exact ones
            sims = _exact_pair_sims(vectors, q[keep], found)
        src = np.repeat(chunk[keep], found.shape[1])
        hit = (sims.ravel() >= threshold) & (found.ravel() >= 0) & (found.ravel() != src)
        for a, b in zip(src[hit].tolist(), found.ravel()[hit].tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for r in list(parent):
        groups.setdefault(find(r), []).append(r)
    for root in list(groups):
        if root not in parent:
            groups[root].append(root)
    out = [sorted(set(g)) for g in groups.values()]
    return sorted((g for g in out if len(g) > 1), key=lambda g: (-len(g), g[0]))


# ---------------------------------------------------------------- helpers
def auto_kind(n: int, dim: int, *, compact: bool = False) -> str:
    """The kind ``kind="auto"`` builds for ``n`` vectors of ``dim`` values (see the module docstring); for a
    project whose tiled photos are kept compact, ``ivf-pq`` above ``flat``: its re-ranking reads the file a
    round featurises its pool from, so one file stays in memory (10^6 tiled photos, warm: 2.85 s a round,
    ivf-sq8 5.36 s)."""
    if n <= FLAT_MAX:
        return "flat"
    if compact:
        return "ivf-pq"
    return "ivf-sq8" if n * dim <= default("index_sq8_max_gb") * 1e9 else "ivf-pq"


def _exact_pair_sims(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Exact cosine of each query with each of its ``found`` rows (-1 = none: -1.0)."""
    q = _unit(queries)
    uniq = np.unique(found[found >= 0])
    cand = _gather(vectors, uniq) if len(uniq) else np.zeros((0, q.shape[1]), dtype=np.float32)
    # Each row's length once, not a unit-length copy of every candidate (40,000-80,000 rows a round at scale).
    norms = np.sqrt(np.einsum("ij,ij->i", cand, cand))
    np.maximum(norms, 1e-12, out=norms)
    sims = np.full(found.shape, -1.0, dtype=np.float32)
    for i, hits in enumerate(found):
        ok = hits >= 0
        at = np.searchsorted(uniq, hits[ok])
        sims[i, ok] = (cand[at] @ q[i]) / norms[at]
    return sims


def _rerank(vectors: np.ndarray, queries: np.ndarray, found: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``found`` rows (-1 = none) by exact cosine: ``(sims, rows)``, -1 padded."""
    exact = _exact_pair_sims(vectors, queries, found)
    sims = np.full((len(found), k), -1.0, dtype=np.float32)
    rows = np.full((len(found), k), -1, dtype=np.int64)
    for i, (hits, s) in enumerate(zip(found, exact)):
        ok = hits >= 0
        hits, s = hits[ok], s[ok]
        best = np.argsort(-s, kind="stable")[:k]
        sims[i, : len(best)], rows[i, : len(best)] = s[best], hits[best]
    return sims, rows


def _ivf_pq(faiss, quantizer, dim: int, nlist: int):
    """An empty ``ivf-pq`` index: ``m`` bytes a vector (64 for 512-d or 1280-d, :func:`_pq_subquantizers`),
    as ``2m`` sub-quantisers of 4 bits where ``dim`` splits into that many parts (searched as FAISS
    fast-scan codes once filled, :func:`_fast_scan`), else ``m`` sub-quantisers of 8 bits.

    At 10^6 x 512-d, 100 queries for 404 neighbours: 0.016 s with 4-bit fast-scan codes against
    0.097 s with 8-bit codes of the same size; on Caltech-101 (1,280-d Lite2 vectors) recall@101 after
    re-ranking 0.938 against 0.940 (`benchmarks/pq_kinds.py`)."""
    m = _pq_subquantizers(dim)
    if dim % (2 * m) == 0:
        return faiss.IndexIVFPQ(quantizer, dim, nlist, 2 * m, 4, faiss.METRIC_INNER_PRODUCT)
    return faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)


def _fast_scan(faiss, index):
    """A filled index with 4-bit product codes as a fast-scan index (the same codes, laid out in blocks
    for SIMD); any other index as it is. The codes are filled as a plain IndexIVFPQ and converted at
    the end because FAISS 1.15's fast-scan ``merge_from`` (the Ray build merges parts) corrupts memory
    once a cell's list holds a whole number of blocks."""
    if isinstance(index, faiss.IndexIVFPQ) and index.pq.nbits == 4:
        # The wrapper keeps a reference to `index` (the proxy that owns it and its quantiser, which the
        # fast-scan index shares): not a downcast copy of the proxy, which owns nothing.
        fast = faiss.IndexIVFPQFastScan(index)
        fast.nprobe = index.nprobe
        return fast
    return index


def _pq_subquantizers(dim: int) -> int:
    for m in (64, 48, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and m <= dim:
            return m
    return 1


def similar(store: Store, examples: list[str | int], *, n: int = 20, unlabelled: bool = False) -> list[dict[str, Any]]:
    """The ``n`` photos most like the example photos (ids or paths of the project), best first:
    path, image_id, similarity. Labelled photos are listed too unless ``unlabelled``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"--n must be at least 1, got {n!r}")
    index = project_index(store)
    vectors = store.vectors()
    rows = [(e if isinstance(e, int) else store.image_id(str(e))) - 1 for e in examples]
    exclude = (store.label_array() >= 0) if unlabelled else None
    found, sims = more_like_this(index, vectors, rows, n=n, exclude=exclude)
    paths = store.paths_of(found + 1)
    return [{"path": paths[int(r) + 1], "image_id": int(r) + 1, "similarity": round(float(s), 6)}
            for r, s in zip(found, sims)]


def duplicate_groups(store: Store, *, threshold: float = 0.95, k: int = 8) -> list[list[str]]:
    """Groups of near-duplicate photos of the project (their ids), largest first."""
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"--threshold must be in (0, 1], got {threshold}")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    index = project_index(store)
    groups = near_duplicates(index, store.vectors(), threshold=threshold, k=k)
    paths = store.paths_of(r + 1 for g in groups for r in g)
    return [[paths[r + 1] for r in g] for g in groups]
