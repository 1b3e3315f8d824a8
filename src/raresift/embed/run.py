"""The embedding pipeline: decode in worker threads while the model runs, save in batches, resume.

Crash safety: a batch's vectors are written to the memory-mapped files and flushed *before* the
database marks its images ``embedded`` in one transaction. A kill at any moment therefore loses
at most the batches in flight, and a re-run embeds exactly the images not yet marked.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EmbeddingError, InputError, NotReadyError
from ..store import vectors as _vectors
from .decode import DEFAULT_MAX_PIXELS, RESIZE_MODES, DecodeError, Views, load_views
from .models import DEFAULT_MODEL, default_threads, load_model

if TYPE_CHECKING:
    from ..project import Project

log = logging.getLogger(__name__)

DEFAULT_TILES = 3  # measured: see README, "Tiles and resizing"
DEFAULT_RESIZE = "crop"
DEFAULT_BATCH_SIZE = 32
MAX_TILES = 4
MODEL_CHUNK = 64  # most inputs per model call
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class EmbedReport:
    """What one `embed` run did."""

    embedded: int
    errors: int
    remaining: int
    seconds: float
    model: str
    backend: str


LOCK_FILE = "embed.lock"
_ROOT_GONE = ("images folder {root} is not there (moved, renamed, or a drive not mounted?); photos saved so far "
              "are kept and none was marked unreadable: run embed again when the folder is back")


@contextlib.contextmanager
def _embed_lock(project: Project):
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
    fd = os.open(project.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another `raresift embed` is running on {project.path}; wait for it to finish (or stop it) "
                "and run this again"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _one_run_at_a_time(func):
    @functools.wraps(func)
    def wrapper(project: Project, *args, **kwargs):
        with _embed_lock(project):
            return func(project, *args, **kwargs)

    return wrapper


@_one_run_at_a_time
def embed_project(
    project: Project,
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
        ``efficientnet-lite2`` (default), ``efficientnet-lite0`` (faster) or a path to an ``.onnx`` image encoder.
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
    if project.images_root is None:
        raise InputError(f"{project.path} was made from an embeddings file; its vectors cannot be recomputed here")
    if not project.images_root.is_dir():
        # Otherwise every photo would be recorded as unreadable for good, for a folder that is only away.
        raise InputError(_ROOT_GONE.format(root=project.images_root))
    if not 0 <= tiles <= MAX_TILES:
        raise InputError(f"--tiles must be between 0 and {MAX_TILES}, got {tiles}")
    if resize not in RESIZE_MODES:
        raise InputError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if engine not in ENGINES:
        raise InputError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    asked_threads, asked_workers = threads, workers  # the Ray engine sizes its actors by the cluster's cores
    threads = threads or default_threads()
    workers = workers or threads

    wanted = {"embed.model": model, "embed.tiles": str(tiles), "embed.resize": resize}
    if project.embedding_info() is None or not (project.path / "embeddings" / "vectors.npy").exists():
        # Vectors without saved settings (killed before they were saved), or settings without vectors
        # (killed while discarding them, or a deleted file): neither can be trusted, start over.
        project._reset_embeddings()
    info = project.embedding_info()
    if info is not None and not reembed:
        have = {"embed.model": info["model"], "embed.tiles": str(info["tiles"]), "embed.resize": info["resize"]}
        if have != wanted:
            raise InputError(
                f"{project.path} is embedded with model={info['model']} tiles={info['tiles']} resize={info['resize']}; "
                "pass the same settings to continue, or --reembed to start over with new ones"
            )
    if reembed:
        project._reset_embeddings()

    embedder = load_model(model, backend=backend, threads=threads)
    views = Views(size=embedder.size, tiles=tiles, resize=resize)
    n_rows = project.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    if n_rows == 0:
        raise NotReadyError(f"{project.path} has no images; add some with `raresift add`")
    edir = project.path / "embeddings"
    vec = _vectors.ensure(edir / "vectors.npy", n_rows, (views.count, embedder.dim), np.float16)
    logit_arr = (
        _vectors.ensure(edir / "logits.npy", n_rows, (views.count, 1000), np.float16) if embedder.has_logits else None
    )
    project._set_meta(
        **wanted,
        **{
            "embed.dim": str(embedder.dim),
            "embed.views": str(views.count),
            "embed.logits": "1" if embedder.has_logits else "0",
            "embed.dtype": "float16",
        },
    )

    if retry_errors:
        with project._tx() as db:
            db.execute("DELETE FROM errors WHERE image_id IN (SELECT id FROM images WHERE status = 'error')")
            db.execute("UPDATE images SET status = 'new' WHERE status = 'error' AND fs_path IS NOT NULL")
    todo = [
        (row[0], bytes(row[1]))
        for row in project.db.execute("SELECT id, fs_path FROM images WHERE status = 'new' ORDER BY id")
    ]
    if limit is not None:
        todo = todo[: max(0, limit)]
    if on_start is not None:
        on_start(len(todo))
    root = os.fsencode(project.images_root)
    start_time = time.perf_counter()
    done = failed = 0

    def store(ids: list[int], feats: np.ndarray | None, logits: np.ndarray | None, bad: list[tuple[int, str]]) -> None:
        nonlocal done, failed
        store_batch(project, vec, logit_arr, views, embedder.dim, ids, feats, logits, bad)
        done += len(ids)
        failed += len(bad)
        if progress is not None:
            progress(len(ids) + len(bad))

    if engine == "ray":
        from ..scale.ray_engine import embed_on_ray

        embed_on_ray(
            todo, root=root, views=views, model=model, backend=backend, threads=asked_threads, workers=asked_workers,
            batch_size=batch_size, max_pixels=max_pixels, address=ray_address, store=store,
        )
        remaining = project.db.execute("SELECT COUNT(*) FROM images WHERE status = 'new'").fetchone()[0]
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
                feats, logits = run_model(embedder, stack, max(batch_size, MODEL_CHUNK))
            if bad and not os.path.isdir(root):
                raise InputError(_ROOT_GONE.format(root=project.images_root))
            store([i for i, _ in ok], feats, logits, bad)
    remaining = project.db.execute("SELECT COUNT(*) FROM images WHERE status = 'new'").fetchone()[0]
    if remaining == 0:
        project.prepare_scoring()
    return EmbedReport(
        embedded=done,
        errors=failed,
        remaining=remaining,
        seconds=time.perf_counter() - start_time,
        model=model,
        backend=embedder.backend,
    )


def run_model(embedder, stack: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Run the model over ``stack`` in chunks: with tiles a batch holds many views, and one huge call
    makes ONNX Runtime's memory arena grow by gigabytes for no gain in speed."""
    if len(stack) <= chunk:
        return embedder(stack)
    parts = [embedder(stack[i : i + chunk]) for i in range(0, len(stack), chunk)]
    feats = np.concatenate([f for f, _ in parts])
    logits = None if parts[0][1] is None else np.concatenate([lg for _, lg in parts])
    return feats, logits


def decode_item(root: bytes, raw: bytes, views: Views, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """``(views array, None)`` for a readable file under ``root``, else ``(None, reason)``; never raises."""
    try:
        return load_views(os.path.join(root, raw), views, max_pixels=max_pixels), None
    except DecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # never let one odd file stop the run
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def store_batch(
    project: Project,
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
    _commit(project, ids, bad)


def _commit(project: Project, ok_ids: list[int], bad: list[tuple[int, str]]) -> None:
    now = time.time()
    with project._tx() as db:
        db.executemany("UPDATE images SET status = 'embedded' WHERE id = ?", [(i,) for i in ok_ids])
        for image_id, reason in bad:
            db.execute("UPDATE images SET status = 'error' WHERE id = ?", (image_id,))
            db.execute(
                "INSERT INTO errors (image_id, path, stage, reason, at) "
                "SELECT id, path, 'embed', ?, ? FROM images WHERE id = ? "
                "ON CONFLICT(image_id, stage) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                (reason, now, image_id),
            )
