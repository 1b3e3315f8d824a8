"""Caches derived from a project's vectors and labels: one scheme for every one of them.

A cache file is named ``NAME-KEY.npy`` (one array, memory-mappable) or ``NAME-KEY.npz`` (several),
where KEY hashes what the content depends on: the caller's parts plus a *generation counter* kept
in the database (bumped in the same transaction that changes the vectors), never a file's size or
mtime. Writers build under an exclusive lock per cache name (``.NAME.lock``), so two processes that
need the same cache at once (the web page and a `next` in a shell) build it once: the second waits
for the first and then reads its file. Each writer writes its own temporary file and renames it
into place, so a reader never sees half a file. Older files of the same name are removed by the
writer that replaces them, under the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .vectors import map_file

__all__ = ["Cache", "cache_key", "exclusive"]

log = logging.getLogger(__name__)


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-able parts."""
    text = json.dumps(list(parts), default=str, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` across processes (fcntl) and across threads of this process."""
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(str(path), threading.Lock())
    with tlock:
        try:
            import fcntl
        except ImportError:  # not POSIX: threads are still serialised
            yield
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


class Cache:
    """A folder of derived arrays, keyed on ``generation()`` plus the caller's parts."""

    def __init__(self, folder: Path, generation: Callable[[], object]):
        self.folder = Path(folder)
        self.generation = generation

    def path(self, name: str, parts: tuple, suffix: str) -> Path:
        return self.folder / f"{name}-{cache_key(self.generation(), *parts)}{suffix}"

    def existing(self, name: str, parts: tuple, *, mmap: bool = True) -> np.ndarray | None:
        """The cached ``.npy`` array ``name`` for ``parts`` if it has been written (and reads), else None:
        for callers that use a cache only when someone else paid for it."""
        target = self.path(name, parts, ".npy")
        try:
            return map_file(target) if mmap else np.load(target, allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing or damaged: the caller does without
            return None

    def array(self, name: str, parts: tuple, build: Callable[[], np.ndarray], *, mmap: bool = False) -> np.ndarray:
        """The cached array ``name`` for ``parts``, built by ``build()`` when missing (memory-mapped with ``mmap``)."""
        target = self.path(name, parts, ".npy")

        def load() -> np.ndarray:
            return map_file(target) if mmap else np.load(target, allow_pickle=False)

        return self._get(name, target, load, lambda tmp: np.save(tmp, build()))

    def arrays(self, name: str, parts: tuple, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Several arrays cached together in one ``.npz`` file."""
        target = self.path(name, parts, ".npz")

        def load() -> dict[str, np.ndarray]:
            with np.load(target, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **build())

        return self._get(name, target, load, write)

    def writer(self, name: str, parts: tuple, write: Callable[[Path], None], *, mmap: bool = True) -> np.ndarray:
        """Like :meth:`array`, for a cache too big to build in memory: ``write(tmp_path)`` writes the ``.npy``."""
        target = self.path(name, parts, ".npy")
        return self._get(name, target, lambda: map_file(target) if mmap else np.load(target), write)

    def _get(self, name: str, target: Path, load: Callable, write: Callable[[Path], None]):
        try:
            return load()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError) as exc:  # damaged: rebuilt below
            log.warning("rebuilding damaged cache %s (%s)", target, exc)
        self.folder.mkdir(parents=True, exist_ok=True)
        with exclusive(self.folder / f".{name}.lock"):
            if target.is_file():  # built by another writer while this one waited
                try:
                    return load()
                except (OSError, ValueError, EOFError):
                    pass
            tmp = target.with_name(f".{target.stem}.{os.getpid()}-{threading.get_ident()}.tmp{target.suffix}")
            try:
                write(tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            for old in self.folder.glob(f"{name}-*{target.suffix}"):
                if old != target:
                    old.unlink(missing_ok=True)
            return load()

    def clear(self) -> None:
        """Remove every cache file of the folder (they are rebuilt on demand)."""
        for old in self.folder.glob("*-*.np[yz]"):
            old.unlink(missing_ok=True)
