"""Vector files beside the database: ``.npy`` arrays opened as memory maps, row = image id - 1.

Shapes are ``(rows, views, dim)``: view 0 is the whole photo, views 1.. are its tiles; in the compact
layout ``(rows, 3, dim)``: the whole photo, the tiles' mean and max (:func:`layout_of` tells which).
Files grow by copy-and-rename, so a reader holding the old file never sees a half-written one.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import ProjectError

ADD_BLOCK = 16384  # rows read from a vector file at a time while an index is filled
# The compact layout's logits (raresift.learn.features.compact_logits): each view's LOGIT_TOP most likely
# classes, and each class's best log-probability over the views.
LOGIT_TOP = 32


def top_logits_dtype(views: int, classes: int = 1000, top: int = LOGIT_TOP) -> np.dtype:
    """One photo's compact logits: ``c`` / ``lp`` (views, top) class indices and float16 log-probabilities of
    each view's ``top`` most likely classes, ``best`` (classes,) each class's best log-probability."""
    return np.dtype([("c", "<u2", (views, top)), ("lp", "<f2", (views, top)), ("best", "<f2", (classes,))])


READ_BYTES = 64 << 20  # bytes read at a time by whole_rows from a run of consecutive rows


def _row_bytes(array: np.ndarray) -> int:
    """Bytes of one row of ``array`` (one photo: all its views)."""
    return array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))


def whole_rows(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Whole-photo vectors (view 0) of ``rows`` as float32 (reads only those rows of a memory map; a run of
    consecutive rows with :func:`read_block`, so a pass over the file does not map it into the process)."""
    rows = np.asarray(rows, dtype=np.int64)
    contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1)
    if not contiguous:
        part = read_rows(vectors, rows, view=0 if vectors.ndim == 3 else None)
        return np.ascontiguousarray(part, dtype=np.float32)
    out = np.empty((len(rows), vectors.shape[-1]), dtype=np.float32)
    step = max(1, READ_BYTES // max(1, _row_bytes(vectors)))
    first = int(rows[0])
    for start in range(0, len(rows), step):
        block = read_block(vectors, first + start, first + min(len(rows), start + step))
        out[start : start + len(block)] = block[:, 0, :] if block.ndim == 3 else block
    return out


def read_rows(array: np.ndarray, rows: np.ndarray, *, view: int | None = None) -> np.ndarray:
    """``array[rows]`` (or ``array[rows, view]``) as an array in memory.

    From a memory map opened by :func:`map_file` and a few scattered rows (a knn pool, re-ranked
    neighbours), the rows are read from the mapped file with ``pread``, not through the map: a page fault
    maps the 16 pages around each row into the process, so gathering 40,000 rows of a 10^7-row file
    made its resident set grow by 2.2 GB of file pages (what `ru_maxrss` counts) for 40 MB of data.
    Dense rows (filling a quarter of the rows they span), many rows (an eighth of the file), rows out
    of range, any other array, or a file replaced or removed since it was mapped: plain indexing
    through the map.
    """
    rows = np.asarray(rows, dtype=np.int64)
    fd = _mapped_file(array, rows, view)
    if fd is None:
        return np.asarray(array[rows] if view is None else array[rows, view])
    try:
        row_bytes = _row_bytes(array)
        shape = array.shape[1:] if view is None else array.shape[2:]
        out = np.empty((len(rows), *shape), dtype=array.dtype)
        size = out.dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        skip = 0 if view is None else view * size
        buf = memoryview(out.reshape(-1).view(np.uint8))
        for i, r in enumerate(rows.tolist()):
            if os.preadv(fd, [buf[i * size : (i + 1) * size]], array.offset + r * row_bytes + skip) != size:
                raise ProjectError(f"{array.filename} was cut short while it was read (row {r} of "
                                   f"{array.shape[0]}); run the command again")
    finally:
        os.close(fd)
    return out


_IDENTITY = "_raresift_file"  # (device, inode) of the file a map opened by map_file maps
_LAYOUT = "_raresift_layout"  # the vector layout of a map opened by Store.vectors


def tag_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """Remember on ``array`` (a project's vector map) the layout it was opened in; see :func:`layout_of`."""
    setattr(array, _LAYOUT, layout)
    return array


def layout_of(array: np.ndarray) -> str:
    """The layout of a vector map from ``Store.vectors`` (``views`` for any other array): read from the map
    itself, so a reader holding it is never told another layout by a `compact` that finished meanwhile."""
    return getattr(array, _LAYOUT, "views")


def map_file(path: str | os.PathLike, mode: str = "r") -> np.ndarray:
    """``np.load(path, mmap_mode=mode)``, remembering which file it maps (device and inode), so that
    :func:`read_rows` reads that file and never one that replaced it."""
    before = os.stat(path)
    arr = np.load(path, mmap_mode=mode, allow_pickle=False)
    after = os.stat(path)
    if isinstance(arr, np.memmap) and (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino):
        setattr(arr, _IDENTITY, (after.st_dev, after.st_ino))
    return arr


def _mapped_file(array: np.ndarray, rows: np.ndarray, view: int | None, *, dense: bool = False) -> int | None:
    """A descriptor of the file ``array`` maps when :func:`read_rows` should read ``rows`` with pread."""
    identity = getattr(array, _IDENTITY, None)
    if (identity is None or not hasattr(os, "preadv") or not isinstance(array.base, mmap.mmap)
            or array.mode == "c" or not array.flags.c_contiguous or not len(rows)):
        return None  # only whole maps of map_file, not slices, copies on write or other arrays
    n = array.shape[0]
    lo, hi = int(rows.min()), int(rows.max())
    if lo < 0 or hi >= n or (view is not None and not 0 <= view < array.shape[1]):
        return None  # numpy's own meaning (negative rows) or its IndexError
    if not dense and (len(rows) * 8 > n or hi - lo + 1 <= 4 * len(rows)):
        return None  # many rows, or rows filling a quarter of their span: the map is faster, maps few extra pages
    try:
        fd = os.open(array.filename, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != identity:
        os.close(fd)
        return None
    return fd


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; rows of zeros stay zeros)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # a third of np.linalg.norm's time
    np.maximum(norms, 1e-12, out=norms)
    return x / norms


def open_read(path: Path) -> np.memmap | None:
    """Open an array read-only as a memory map, or return None if it does not exist."""
    if not path.exists():
        return None
    return _load(path, "r")


def ensure(path: Path, rows: int, tail: tuple[int, ...], dtype: str | np.dtype) -> np.memmap:
    """Open ``path`` for writing with at least ``rows`` rows of shape ``tail``, creating or growing it.

    A file with another row shape or dtype is an error of the caller (the project resets the
    embedding files before switching models).
    """
    dtype = np.dtype(dtype)
    if path.exists():
        _load(path, "r")  # checks the file first: opened "r+", numpy would pad a truncated file with zeros
        current = _load(path, "r+")
        if current.shape[1:] != tail or current.dtype != dtype:
            raise ValueError(f"{path} holds {current.shape[1:]} {current.dtype}, expected {tail} {dtype}")
        if current.shape[0] >= rows:
            return current
        tmp = path.with_suffix(".grow.npy")
        grown = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *tail))
        _preallocate(tmp)
        step = 65536
        for start in range(0, current.shape[0], step):
            block = current[start : start + step]
            grown[start : start + len(block)] = block  # grown is longer: bound the slice by the block
        grown.flush()
        del grown, current
        fsync_path(tmp)
        os.replace(tmp, path)
        return map_file(path, "r+")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".new.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows, *tail))
    _preallocate(tmp)
    arr.flush()
    del arr
    fsync_path(tmp)
    os.replace(tmp, path)
    return map_file(path, "r+")


def create(path: Path, shape: tuple[int, ...], dtype: str | np.dtype) -> np.memmap:
    """A new ``.npy`` memory map of zeros at ``path`` (replaced if there), its disk blocks reserved up front
    (see :func:`_preallocate`: a full disk is an ``OSError`` here, never a SIGBUS later)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    _preallocate(Path(path))
    return arr


def read_block(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``array[start:stop]`` in memory; from a map of :func:`map_file`, read with one ``pread``, so a pass over a
    whole file (a conversion) does not map its pages into the process (its resident set stays one block)."""
    stop = min(int(stop), array.shape[0])
    fd = _mapped_file(array, np.array([start, stop - 1], dtype=np.int64), None, dense=True) if stop > start else None
    if fd is None:
        return np.array(array[start:stop])
    try:
        row_bytes = _row_bytes(array)
        out = np.empty((stop - start, *array.shape[1:]), dtype=array.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        done, at = 0, array.offset + start * row_bytes
        while done < len(buf):  # a read may return less than asked (network file systems): go on from there
            got = os.preadv(fd, [buf[done:]], at + done)
            if got <= 0:
                raise ProjectError(f"{array.filename} was cut short while it was read (rows {start} to {stop - 1} "
                                   f"of {array.shape[0]}); run the command again")
            done += got
    finally:
        os.close(fd)
    return out


class BlockWriter:
    """A new ``.npy`` file of ``shape`` written front to back, a block of rows at a time, with plain writes (no
    memory map: a conversion of a big file keeps one block in memory). Disk blocks are reserved up front."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str | np.dtype):
        arr = create(path, shape, dtype)
        self.path, self.offset, self.dtype, self.tail = Path(path), arr.offset, arr.dtype, tuple(shape[1:])
        self.rows, self.written = int(shape[0]), 0
        del arr
        self.fh = open(path, "r+b")  # noqa: SIM115  closed by close()
        self.fh.seek(self.offset)

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.tail:
            raise ValueError(f"rows of {block.shape[1:]} written to a file of {self.tail}")
        if self.written + len(block) > self.rows:
            raise ValueError(f"{self.written + len(block)} rows written to a file of {self.rows}")
        self.fh.write(memoryview(block.reshape(-1).view(np.uint8)))
        self.written += len(block)

    def close(self) -> None:
        """Flush and fsync the file; every row must have been written."""
        if self.written != self.rows:
            raise ValueError(f"{self.path} got {self.written} of its {self.rows} rows")
        if not self.fh.closed:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()


def _load(path: Path, mode: str) -> np.memmap:
    try:
        return map_file(path, mode)
    except (ValueError, EOFError) as exc:  # truncated, or not an .npy array at all
        what = "cut short" if "length is greater" in str(exc) else "not a numeric .npy array"
        raise ProjectError(
            f"{path} is damaged ({what}); run `raresift embed {path.parent.parent} --reembed` "
            "to compute the vectors again"
        ) from None


def _preallocate(path: Path) -> None:
    """Reserve the disk blocks of a new (sparse) file now: a full disk is then an ``OSError`` here,
    not a SIGBUS that kills the process later, when a page of the memory map is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return  # the file system cannot reserve blocks ahead
        path.unlink(missing_ok=True)  # do not leave a big half-made file on a full disk
        raise
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder: its entries, e.g. renames into it, are on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
