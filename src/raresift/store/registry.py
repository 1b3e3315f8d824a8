"""Finding image files in a folder and describing them (size, content hash) for the registry."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class FoundFile:
    """One image file found under the images root."""

    path: str  # stable id: relative path, '/'-separated, printable (non-UTF-8 bytes escaped)
    fs_path: bytes  # the raw relative path, to open the file again whatever its name's encoding
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    error: str | None = None  # why the file cannot be read, if it cannot


def display_path(raw: bytes) -> str:
    """The id of a raw relative path: UTF-8 where it is, ``\\xNN`` escapes for other bytes."""
    return raw.decode("utf-8", errors="backslashreplace")


def walk_images(root: Path, *, on_error: Callable[[bytes, str], None] | None = None) -> Iterator[bytes]:
    """Yield the raw relative paths of image files under ``root`` (recursively, sorted, any case of extension).

    Symlinks to files are followed (a broken one is still yielded, so it can be reported);
    symlinked folders are not descended into, which keeps the walk free of cycles. A folder that
    cannot be listed is reported to ``on_error(relative path, reason)`` and skipped.
    """
    root_b = os.fsencode(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root_b, rel) if rel else root_b
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as exc:
            if on_error is not None and rel:
                on_error(rel.replace(os.sep.encode(), b"/"), f"cannot list folder: {exc.strerror or exc}")
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            child = os.path.join(rel, name) if rel else name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if not name.startswith(b"."):
                    subdirs.append(child)
                continue
            if os.path.splitext(name)[1].decode("ascii", "ignore").lower() in IMAGE_EXTENSIONS:
                yield child.replace(os.sep.encode(), b"/")
        stack.extend(reversed(subdirs))


def describe(root: Path, raw: bytes) -> FoundFile:
    """Stat and hash one file; a file that cannot be read gets ``error`` set instead of raising."""
    full = os.path.join(os.fsencode(root), raw)
    path = display_path(raw)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        if os.path.islink(full):
            return FoundFile(path, raw, error="broken symbolic link (its target does not exist)")
        return FoundFile(path, raw, error="file disappeared while scanning")
    except OSError as exc:
        return FoundFile(path, raw, error=f"cannot stat file: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return FoundFile(path, raw, error="not a regular file")
    digest = hashlib.sha256()
    try:
        with open(full, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        return FoundFile(path, raw, size=st.st_size, error=f"cannot read file: {exc.strerror or exc}")
    return FoundFile(path, raw, size=st.st_size, mtime=st.st_mtime, sha256=digest.hexdigest())


def scan(
    root: Path,
    *,
    skip: Callable[[str], bool] = lambda _p: False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_error: Callable[[bytes, str], None] | None = None,
) -> Iterator[FoundFile]:
    """Describe every image file under ``root`` whose id ``skip`` does not reject, hashing in threads.

    Folders that cannot be listed go to ``on_error`` (see :func:`walk_images`).
    """
    todo = (raw for raw in walk_images(root, on_error=on_error) if not skip(display_path(raw)))
    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Chunks bound the number of pending futures; map() keeps order; hashlib and file reads
        # release the GIL, so the threads overlap the I/O.
        while chunk := list(itertools.islice(todo, 512)):
            for found in pool.map(lambda raw: describe(root, raw), chunk):
                if progress is not None:
                    progress(1)
                yield found
