"""The embedding pipeline: decode in worker threads while the model runs, save in batches, resume.

Crash safety: a batch's vectors are written to the memory-mapped files and flushed *before* the
database marks its images ``embedded`` in one transaction. A kill at any moment therefore loses
at most the batches in flight, and a re-run embeds exactly the images not yet marked.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbeddingError, InputError, NotReadyError
from ..learn.features import check_layout, compact_logits, compact_views
from ..ray_jobs import check_engine
from ..settings import default
from ..store.store import Store
from ..store.vectors import BlockWriter, fsync_path, read_block, top_logits_dtype
from .batches import decode_item, model_chunk, run_model
from .decode import DEFAULT_MAX_PIXELS, RESIZE_MODES, Views
from .models import (
    canonical_model_name,
    default_threads,
    has_text_tower,
    load_model,
    model_weights,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = default("model")
DEFAULT_TILES = default("tiles")  # measured: see README, "Tiles and resizing"
DEFAULT_RESIZE = default("resize")
DEFAULT_BATCH_SIZE = default("embed_batch")
MAX_TILES = 4


def default_layout(model: str, tiles: int) -> str:
    """The vector layout a new embedding gets: ``compact`` for tiled photos (the setting ``layout``),
    ``views`` without tiles (nothing to pool) and for models with a text tower (an open_clip text
    query scores every view)."""
    if tiles <= 0 or has_text_tower(model):
        return "views"
    return check_layout(default("layout"))


@dataclass(frozen=True)
class EmbedReport:
    """What one `embed` run did."""

    embedded: int
    errors: int
    remaining: int
    seconds: float
    model: str
    backend: str


_ROOT_GONE = ("images folder {root} is not there (moved, renamed, or a drive not mounted?); photos saved so far "
              "are kept and none was marked unreadable: run embed again when the folder is back")


@contextlib.contextmanager
def _embed_lock(store: Store):
    """Hold an exclusive lock on ``PROJECT/embed.lock`` while embedding.

    Two runs at once would embed every photo twice, and one growing or replacing the vector file
    under the other would lose the other's vectors. The lock dies with its process, so a killed
    run never blocks the next one.
    """
    try:
        import fcntl
    except ImportError:  # not on a POSIX system: no lock
        yield
        return
    fd = os.open(store.paths.embed_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another `raresift embed` is running on {store.root}; wait for it to finish (or stop it) "
                "and run this again"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def check_no_embed_running(store: Store) -> None:
    """Raise the one-line InputError of a running `embed` now, before minutes of other work that ends in one
    (``raresift tune`` trains, then embeds)."""
    with _embed_lock(store):
        pass


def _one_run_at_a_time(func):
    @functools.wraps(func)
    def wrapper(store: Store, *args, **kwargs):
        with _embed_lock(store):
            return func(store, *args, **kwargs)

    return wrapper


@_one_run_at_a_time
def embed_project(
    store: Store,
    *,
    model: str = DEFAULT_MODEL,
    tiles: int = DEFAULT_TILES,
    resize: str = DEFAULT_RESIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    threads: int | None = None,
    backend: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reembed: bool = False,
    retry_errors: bool = False,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    layout: str | None = None,
) -> EmbedReport:
    """Embed the project's registered images that are not embedded yet.

    Parameters
    ----------
    model:
        ``efficientnet-lite2`` (default), ``efficientnet-lite0`` (faster), ``open_clip:ARCH[:PRETRAINED|:PATH]``,
        ``timm:NAME[:PATH]`` or a path to an ``.onnx`` image encoder. The hash of its weights file is recorded
        (``embed.weights``): vectors of other weights are never mixed in, even under the same name.
    tiles:
        N > 0 also embeds an N x N grid of overlapping tiles of each photo; 0 = whole photo only.
    resize:
        ``squeeze`` (whole photo to a square, aspect ignored) or ``crop`` (centre square).
    batch_size:
        Photos per model call; also the unit of saved work.
    workers:
        Decoding threads (default: number of cores).
    reembed:
        Discard existing vectors and start over (needed to change model, tiles or resize).
    retry_errors:
        Try again the files recorded as unreadable (e.g. after fixing or replacing them).
    limit:
        Embed at most this many photos in this run (the rest stay pending).
    progress, on_start:
        Callbacks: ``on_start(total_pending)`` once, then ``progress(n_done)`` after each batch.
    engine:
        ``local`` (default: this process) or ``ray`` (Ray Data with a pool of model actors, see
        :mod:`raresift.scale.ray_engine`); both write the same vectors into the same files.
    ray_address:
        With ``engine="ray"``: the address of a running Ray cluster (default: start a local Ray).
    layout:
        How the vectors are kept: ``compact`` (tiled photos: the three parts of each photo's feature and
        a byte per value for the evidence, each view's top ImageNet classes: 0.27x the bytes of every view
        and logit) or ``views`` (every view).
        Default: the project's layout, else :func:`default_layout`. ``raresift compact`` converts a
        project kept as views.
    """
    if store.images_root is None:
        raise InputError(f"{store.root} was made from an embeddings file; its vectors cannot be recomputed here")
    if not store.images_root.is_dir():
        # Otherwise every photo would be recorded as unreadable for good, for a folder that is only away.
        raise InputError(_ROOT_GONE.format(root=store.images_root))
    if not 0 <= tiles <= MAX_TILES:
        raise InputError(f"--tiles must be between 0 and {MAX_TILES}, got {tiles}")
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    check_engine(engine)
    asked_threads, asked_workers = threads, workers  # the Ray engine sizes its actors by the cluster's cores
    threads = threads or default_threads()
    workers = workers or threads

    model = canonical_model_name(model)  # a weights file by its absolute path
    weights = model_weights(model)  # before anything changes: no weights on this machine stops here, in one line
    if layout is not None:
        check_layout(layout)
        if layout == "compact" and tiles <= 0:
            raise InputError("--layout compact is for tiled photos (--tiles N with N > 0)")
        if layout == "compact" and has_text_tower(model):
            raise InputError(f"{model} scores a text query on every view of a photo, which --layout compact does not "
                             "keep; use --layout views")
    wanted = {"embed.model": model, "embed.tiles": str(tiles), "embed.resize": resize}
    if store.embedding_info() is None or not all(p.exists() for p in store.layout_files(store.layout)):
        # Vectors without saved settings (killed before they were saved), or settings without vectors
        # (killed while discarding them, or a deleted file): neither can be trusted, start over.
        store.reset_embeddings()
    info = store.embedding_info()
    if info is not None and not reembed:
        have = {"embed.model": info["model"], "embed.tiles": str(info["tiles"]), "embed.resize": info["resize"]}
        if have != wanted:
            raise InputError(
                f"{store.root} is embedded with model={info['model']} tiles={info['tiles']} resize={info['resize']}; "
                "pass the same settings to continue, or --reembed to start over with new ones"
            )
        had = store.meta("embed.weights")
        if had and weights and had != weights:
            raise InputError(
                f"{store.root} is embedded with model={info['model']} weights={had}, and these weights are {weights}; "
                "pass the same weights to continue, or --reembed to start over with new ones"
            )
        if layout is not None and layout != info["layout"]:
            how = f"`raresift compact {store.root}` converts it" if layout == "compact" else "--reembed starts over"
            raise InputError(f"{store.root} keeps its vectors in the {info['layout']} layout; {how}")
    if reembed:
        store.reset_embeddings()
        info = None
    if info is not None:
        layout = info["layout"]
    elif layout is None:
        layout = default_layout(model, tiles)

    embedder = load_model(model, backend=backend, threads=threads)
    views = Views(size=embedder.size, tiles=tiles, resize=resize)
    n_rows = store.n_rows()
    if n_rows == 0:
        raise NotReadyError(f"{store.root} has no images; add some with `raresift add`")
    vec, logit_arr = store.open_vectors_for_writing(n_rows, views.count, embedder.dim, np.float16,
                                                    logits=embedder.has_logits, layout=layout)
    tiles_arr = store.open_tiles_for_writing(n_rows, embedder.dim) if layout == "compact" else None
    store.set_meta(
        **wanted,
        **{
            "embed.layout": layout,
            "embed.dim": str(embedder.dim),
            "embed.views": str(views.count),
            "embed.logits": "1" if embedder.has_logits else "0",
            "embed.dtype": "float16",
            "embed.weights": getattr(embedder, "weights", None) or weights or "",
            "embed.model_settings": json.dumps(getattr(embedder, "settings", None) or {}, sort_keys=True),
        },
    )

    if retry_errors:
        store.retry_errors()
    todo = store.pending_embed()
    if limit is not None:
        todo = todo[: max(0, limit)]
    if on_start is not None:
        on_start(len(todo))
    root = os.fsencode(store.images_root)
    start_time = time.perf_counter()
    done = failed = 0

    def save(ids: list[int], feats: np.ndarray | None, logits: np.ndarray | None, bad: list[tuple[int, str]]) -> None:
        nonlocal done, failed
        store_batch(store, vec, logit_arr, views, embedder.dim, ids, feats, logits, bad, tiles=tiles_arr)
        done += len(ids)
        failed += len(bad)
        if progress is not None:
            progress(len(ids) + len(bad))

    if engine == "ray":
        from .ray_engine import embed_on_ray

        embed_on_ray(
            todo, root=root, views=views, model=model, backend=backend, threads=asked_threads, workers=asked_workers,
            batch_size=batch_size, max_pixels=max_pixels, address=ray_address, store=save,
        )
        remaining = store.count_status("new")
        return EmbedReport(done, failed, remaining, time.perf_counter() - start_time, model, f"ray+{embedder.backend}")

    def decode(item: tuple[int, bytes]):
        image_id, raw = item
        return (image_id, *decode_item(root, raw, views, max_pixels))

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raresift-decode") as pool:
        pending: deque[list[Future]] = deque()
        ahead = 2  # batches decoded ahead of the model: enough to keep it busy, bounded memory

        def submit(k: int) -> None:
            if k < len(batches):
                pending.append([pool.submit(decode, item) for item in batches[k]])

        for k in range(ahead):
            submit(k)
        for k in range(len(batches)):
            results = [f.result() for f in pending.popleft()]
            submit(k + ahead)
            ok = [(i, a) for i, a, err in results if err is None]
            bad = [(i, err) for i, a, err in results if err is not None]
            feats = logits = None
            if ok:
                stack = np.concatenate([a for _, a in ok])  # (B * views, s, s, 3)
                feats, logits = run_model(embedder, stack, model_chunk(batch_size))
            if bad and not os.path.isdir(root):
                raise InputError(_ROOT_GONE.format(root=store.images_root))
            save([i for i, _ in ok], feats, logits, bad)
    remaining = store.count_status("new")
    return EmbedReport(
        embedded=done,
        errors=failed,
        remaining=remaining,
        seconds=time.perf_counter() - start_time,
        model=model,
        backend=embedder.backend,
    )


@dataclass(frozen=True)
class CompactReport:
    """What one `compact` run did: the bytes of the vector files before and after."""

    photos: int
    bytes_before: int
    bytes_after: int
    seconds: float
    already: bool = False


COMPACT_BLOCK = 4096  # photos converted at a time (10 views x 1280 float32: 200 MB)


@_one_run_at_a_time
def compact_project(store: Store, *, progress: Callable[[int], None] | None = None) -> CompactReport:
    """Convert a tiled project kept as every view to the compact layout (see :func:`embed_project`'s
    ``layout``): ``parts.npy``, ``tilemax.npy`` (and ``logittop.npy``) are written beside the old files
    block by block, synced and renamed into place, the layout is switched in one transaction, then
    ``vectors.npy`` and ``logits.npy`` are removed. The whole-photo vectors do not change, so the
    cached neighbours and the clusters stay valid; the features change only by float16 rounding.
    Killed at any point, the project is in one layout or the other; run it again to finish. Holds the
    embed lock (an `embed` started meanwhile stops with a message). ``progress(n)`` after each block of
    ``n`` photos."""
    t0 = time.perf_counter()
    info = store.embedding_info()
    if info is None:
        raise NotReadyError(f"{store.root} has no embeddings yet; run `raresift embed {store.root}`")
    old = [p for p in store.paths.vector_files("views") if p is not None]
    new = [p for p in store.paths.vector_files("compact") if p is not None]
    if info["layout"] == "compact":
        # Finish a run killed after the switch, where its files are all there (else keep what is left).
        if all(p.exists() for p in store.layout_files("compact")):
            for path in old:
                path.unlink(missing_ok=True)
            _drop_views_caches(store)
        size = sum(p.stat().st_size for p in new if p.exists())
        return CompactReport(store.n_rows(), size, size, time.perf_counter() - t0, already=True)
    if info["views"] <= 1 or info["tiles"] <= 0:
        raise InputError(f"{store.root} has one view a photo (no tiles): it is as compact as it gets")
    if has_text_tower(info["model"]):
        raise InputError(f"{info['model']} scores a text query on every view of a photo, which the compact layout "
                         "does not keep; this project stays as it is")
    vectors, logits = store.vectors(), store.logits()
    n, _, dim = vectors.shape
    before = sum(p.stat().st_size for p in old if p.exists())
    tmp = {p: p.with_name(f".{p.stem}.compacting.npy") for p in new}
    writers: dict[Path, BlockWriter] = {}  # final path -> the writer of its temporary file
    try:
        # Plain reads and writes a block at a time: the resident set stays a block, whatever the file size.
        writers[store.paths.parts] = BlockWriter(tmp[store.paths.parts], (n, 3, dim), np.float16)
        writers[store.paths.tilemax] = BlockWriter(tmp[store.paths.tilemax], (n, dim), np.uint8)
        if logits is not None:
            writers[store.paths.logittop] = BlockWriter(tmp[store.paths.logittop], (n,),
                                                        top_logits_dtype(logits.shape[1], logits.shape[2]))
        for start in range(0, n, COMPACT_BLOCK):
            stop = min(n, start + COMPACT_BLOCK)
            parts, which = compact_views(read_block(vectors, start, stop))
            writers[store.paths.parts].write(parts)
            writers[store.paths.tilemax].write(which)
            if logits is not None:
                step = COMPACT_BLOCK // 4  # 1,024 photos: each float32 temporary of their logits is 41 MB
                for a in range(start, stop, step):
                    b = min(stop, a + step)
                    writers[store.paths.logittop].write(compact_logits(read_block(logits, a, b)))
            if progress is not None:
                progress(stop - start)
        for final, writer in writers.items():
            writer.close()
            os.replace(writer.path, final)
        with contextlib.suppress(OSError):  # not every file system syncs a folder
            fsync_path(store.paths.embed_dir)  # the renames are on disk before the layout says compact
    finally:
        for writer in writers.values():
            writer.fh.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)
    store.set_meta(**{"embed.layout": "compact"})
    for path in old:
        path.unlink(missing_ok=True)
    _drop_views_caches(store)
    after = sum(p.stat().st_size for p in new if p.exists())
    return CompactReport(n, before, after, time.perf_counter() - t0)


def _drop_views_caches(store: Store) -> None:
    """Caches only the views layout used (the tiled-feature cache) or whose values the compact layout changes
    (text priors): removed when a project becomes compact."""
    for path in [*store.vector_cache.folder.glob("pooled-*.npy"), *store.cache.folder.glob("prior*-*.npy")]:
        path.unlink(missing_ok=True)


def store_batch(
    store: Store,
    vec: np.ndarray,
    logit_arr: np.ndarray | None,
    views: Views,
    dim: int,
    ids: list[int],
    feats: np.ndarray | None,
    logits: np.ndarray | None,
    bad: list[tuple[int, str]],
    *,
    tiles: np.ndarray | None = None,
) -> None:
    """Write one batch's vectors (rows ``id - 1``), flush them, then mark the images in one transaction.

    ``feats`` is ``(len(ids) * views.count, dim)`` in the order of ``ids``; ``bad`` holds (id, reason).
    With ``tiles`` (the compact layout's tile-index file) the batch is written compact
    (:func:`~raresift.learn.features.compact_views`, :func:`~raresift.learn.features.compact_logits`).
    """
    if ids:
        if feats is None or feats.shape[1] != dim:
            got = None if feats is None else feats.shape[1]
            raise EmbeddingError(f"model returned {got} features, expected {dim}")
        rows = np.array([i - 1 for i in ids])
        block = feats.reshape(len(ids), views.count, -1)
        if tiles is not None:
            vec[rows], tiles[rows] = compact_views(block)
            tiles.flush()
        else:
            vec[rows] = block.astype(np.float16)
        if logit_arr is not None and logits is not None:
            z = logits.reshape(len(ids), views.count, -1)
            logit_arr[rows] = compact_logits(z) if tiles is not None else z.astype(np.float16)
        vec.flush()
        if logit_arr is not None:
            logit_arr.flush()
    store.mark_embedded(ids, bad)
