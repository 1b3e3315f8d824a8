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
import numpy as np

from ..errors import EmbeddingError, InputError, NotReadyError
from ..ray_jobs import check_engine
from ..settings import default
from ..store.store import Store
from .batches import decode_item, model_chunk, run_model
from .decode import DEFAULT_MAX_PIXELS, RESIZE_MODES, Views
from .models import canonical_model_name, default_threads, load_model, model_weights

log = logging.getLogger(__name__)

DEFAULT_MODEL = default("model")
DEFAULT_TILES = default("tiles")  # measured: see README, "Tiles and resizing"
DEFAULT_RESIZE = default("resize")
DEFAULT_BATCH_SIZE = default("embed_batch")
MAX_TILES = 4


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
    wanted = {"embed.model": model, "embed.tiles": str(tiles), "embed.resize": resize}
    if store.embedding_info() is None or not store.paths.vectors.exists():
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
    if reembed:
        store.reset_embeddings()

    embedder = load_model(model, backend=backend, threads=threads)
    views = Views(size=embedder.size, tiles=tiles, resize=resize)
    n_rows = store.n_rows()
    if n_rows == 0:
        raise NotReadyError(f"{store.root} has no images; add some with `raresift add`")
    vec, logit_arr = store.open_vectors_for_writing(n_rows, views.count, embedder.dim, np.float16,
                                                    logits=embedder.has_logits)
    store.set_meta(
        **wanted,
        **{
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
        store_batch(store, vec, logit_arr, views, embedder.dim, ids, feats, logits, bad)
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
) -> None:
    """Write one batch's vectors (rows ``id - 1``), flush them, then mark the images in one transaction.

    ``feats`` is ``(len(ids) * views.count, dim)`` in the order of ``ids``; ``bad`` holds (id, reason).
    """
    if ids:
        if feats is None or feats.shape[1] != dim:
            got = None if feats is None else feats.shape[1]
            raise EmbeddingError(f"model returned {got} features, expected {dim}")
        rows = np.array([i - 1 for i in ids])
        vec[rows] = feats.reshape(len(ids), views.count, -1).astype(np.float16)
        if logit_arr is not None and logits is not None:
            logit_arr[rows] = logits.reshape(len(ids), views.count, -1).astype(np.float16)
        vec.flush()
        if logit_arr is not None:
            logit_arr.flush()
    store.mark_embedded(ids, bad)
