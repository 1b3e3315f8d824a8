"""Vectors computed elsewhere (`raresift init --embeddings ...`): checked, then stored, streamed.

Three shapes of input, the ones pipelines that embed large collections write:

* one ``.npy`` matrix and an ids file (``--ids FILE.txt``, one id per line, line i = row i);
* one Parquet file with an ``id`` column and a vector column (``embedding`` or ``vector``: a list of
  floats per row, all of one length);
* a folder of shards, taken in name order: ``NAME.npy`` each with ``NAME.txt`` beside it (its ids), or
  ``NAME.parquet`` files as above (not both kinds in one folder).

Every matrix is read block by block (a memory map, or Parquet record batches), never whole; the ids
(needed to register the photos) are the only thing held for every row. Checked before anything is
written: float vectors of one length, finite values, as many ids as rows, no id twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingExtraError
from ..store.store import Store

__all__ = ["import_embeddings"]

BLOCK = 65536  # rows copied at a time
VECTOR_COLUMNS = ("embedding", "vector")


@dataclass
class _Shard:
    path: Path  # the .npy or .parquet file
    ids_path: Path | None  # the ids file of an .npy shard
    rows: int
    dim: int
    dtype: np.dtype
    ids: list[str] | None = None  # an .npy shard's ids, read once (counted when the shard is checked)


def import_embeddings(store: Store, embeddings: str | os.PathLike, ids: str | os.PathLike | None = None) -> int:
    """Register images from vectors computed elsewhere (see the module's docstring for the input shapes).

    The ids may be paths or URIs. Returns the number of images registered.
    """
    if store.count_images():
        raise InputError(f"{store.root} already has images; bring your own vectors into a new project")
    src = Path(embeddings)
    if src.is_dir():
        if ids is not None:
            raise InputError(f"{src} is a folder of shards: each shard brings its own ids (leave --ids out)")
        shards = _folder_shards(src)
    elif not src.is_file():
        raise InputError(f"embeddings {src} does not exist")
    elif src.suffix.lower() == ".parquet":
        if ids is not None:
            raise InputError(f"{src} is a Parquet file: its `id` column holds the ids (leave --ids out)")
        shards = [_parquet_shard(src)]
    else:
        if ids is None:
            raise InputError("--embeddings FILE.npy needs --ids FILE.txt (one id per line, line i = row i)")
        if not Path(ids).is_file():
            raise InputError(f"ids file {ids} does not exist")
        shards = [_npy_shard(src, Path(ids))]
    shards = [s for s in shards if s.rows]
    dims = {s.dim for s in shards}
    if len(dims) > 1:
        raise InputError(f"the shards hold vectors of different lengths: {sorted(dims)}; all must be alike")
    if not shards:
        raise InputError(f"{src} holds no vectors")
    dim = dims.pop()
    total = sum(s.rows for s in shards)
    dtype = np.float16 if all(s.dtype == np.float16 for s in shards) else np.float32

    id_list: list[str] = []
    seen: dict[str, tuple[Path, int]] = {}
    store.reset_embeddings()
    vec, _ = store.open_vectors_for_writing(total, 1, dim, dtype, logits=False)
    try:
        start = 0
        for shard in shards:
            shard_ids = _shard_ids(shard)
            file = shard.ids_path or shard.path
            unit = "line" if shard.ids_path is not None else "row"
            for k, ident in enumerate(shard_ids, 1):
                if not ident:
                    raise InputError(f"{file} {unit} {k}: empty id (one id per {unit} expected)")
                if ident in seen:
                    other, at = seen[ident]
                    raise InputError(f"{file} {unit} {k}: id {ident!r} repeats "
                                     + (f"{unit} {at}" if other == file else f"{other} {unit} {at}"))
                seen[ident] = (file, k)
            id_list.extend(shard_ids)
            shard.ids = None  # id_list holds them now
            for offset, block in _blocks(shard):
                block = np.asarray(block, dtype=dtype)
                if not np.isfinite(block).all():
                    raise InputError(f"{shard.path} holds NaN or infinite values "
                                     f"(rows {offset + 1}..{offset + len(block)})")
                vec[start + offset : start + offset + len(block), 0, :] = block
            start += shard.rows
        vec.flush()
    finally:
        del vec
    del seen
    store.register_external(id_list)
    name = src.name if len(shards) == 1 else f"{src.name}/ ({len(shards)} shards)"
    store.set_meta(**{
        "embed.model": f"external:{name}",
        "embed.dim": str(dim),
        "embed.views": "1",
        "embed.tiles": "0",
        "embed.logits": "0",
        "embed.dtype": np.dtype(dtype).name,
    })
    return len(id_list)


# ---------------------------------------------------------------------- shards
def _folder_shards(folder: Path) -> list[_Shard]:
    npys = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    parquets = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".parquet" and p.is_file())
    if npys and parquets:
        raise InputError(f"{folder} mixes .npy and .parquet shards; keep one kind per folder")
    if parquets:
        return [_parquet_shard(p) for p in parquets]
    if not npys:
        raise InputError(f"{folder} holds no shards: expected NAME.npy files with NAME.txt ids beside them, "
                         "or NAME.parquet files with an `id` and an `embedding` column")
    shards = []
    for p in npys:
        ids = p.with_suffix(".txt")
        if not ids.is_file():
            raise InputError(f"shard {p.name} has no ids file {ids.name} beside it (one id per line, line i = row i)")
        shards.append(_npy_shard(p, ids))
    return shards


def _npy_shard(path: Path, ids_path: Path) -> _Shard:
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds for a file that is not .npy
        raise InputError(f"{path} is not a readable .npy matrix ({exc})") from exc
    if matrix.ndim != 2 or matrix.dtype.kind != "f" or matrix.shape[1] < 1:
        raise InputError(f"{path} must hold a 2-D float matrix (rows = images), got shape {matrix.shape} {matrix.dtype}")
    ids = _read_ids(ids_path)
    if len(ids) != matrix.shape[0]:
        raise InputError(f"{path} has {matrix.shape[0]} rows but {ids_path} has {len(ids)} ids; "
                         "row i of the matrix must belong to line i of the ids file")
    return _Shard(path, ids_path, int(matrix.shape[0]), int(matrix.shape[1]), matrix.dtype, ids)


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError("reading Parquet shards", "parquet") from None
    return pq


def _vector_column(schema, path: Path) -> str:
    for name in VECTOR_COLUMNS:
        if name in schema.names:
            return name
    raise InputError(f"{path} has no vector column: expected one named {' or '.join(VECTOR_COLUMNS)} "
                     f"(a list of floats per row); its columns: {', '.join(schema.names)}")


def _parquet_shard(path: Path) -> _Shard:
    import pyarrow as pa

    pq = _parquet()
    try:
        f = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and others for a file that is not Parquet
        raise InputError(f"{path} is not a readable Parquet file ({exc})") from exc
    schema = f.schema_arrow
    if "id" not in schema.names:
        raise InputError(f"{path} has no `id` column (the photo's path or URI); its columns: {', '.join(schema.names)}")
    col = _vector_column(schema, path)
    if f.metadata.num_rows == 0:  # an empty shard (its column types may be unknown): nothing to read
        return _Shard(path, None, 0, 0, np.dtype(np.float32))
    kind = schema.field(col).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_floating(kind.value_type):
        raise InputError(f"{path}: column {col!r} must hold a list of floats per row, got {kind}")
    dim = kind.list_size if pa.types.is_fixed_size_list(kind) else None
    if dim is None:  # a variable-length list: the first row tells the length, _blocks checks every row
        first = next(f.iter_batches(batch_size=1, columns=[col]), None)
        dim = len(first.column(0)[0]) if first is not None and first.num_rows else 0
    dtype = np.dtype(np.float16) if pa.types.is_float16(kind.value_type) else np.dtype(np.float32)
    return _Shard(path, None, int(f.metadata.num_rows), int(dim), dtype)


def _read_ids(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} must be UTF-8 text, one id per line ({exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _shard_ids(shard: _Shard) -> list[str]:
    if shard.ids is not None:
        return shard.ids
    pq = _parquet()
    out: list[str] = []
    for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=BLOCK, columns=["id"]):
        out.extend("" if v is None else str(v).strip() for v in batch.column(0).to_pylist())
    return out


def _blocks(shard: _Shard) -> Iterator[tuple[int, np.ndarray]]:
    """(row offset in the shard, block of vectors), block by block."""
    if shard.ids_path is not None:
        matrix = np.load(shard.path, mmap_mode="r", allow_pickle=False)
        for start in range(0, shard.rows, BLOCK):
            yield start, matrix[start : start + BLOCK]
        return
    pq = _parquet()
    import pyarrow.compute as pc

    f = pq.ParquetFile(shard.path)
    col = _vector_column(f.schema_arrow, shard.path)
    start = 0
    for batch in f.iter_batches(batch_size=BLOCK, columns=[col]):
        arr = batch.column(0)
        if arr.null_count:
            raise InputError(f"{shard.path}: a row of column {col!r} is empty (rows {start + 1}..{start + len(arr)})")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if (lengths != shard.dim).any():
            bad = start + int(np.flatnonzero(lengths != shard.dim)[0]) + 1
            raise InputError(f"{shard.path}: row {bad}'s vector is {int(lengths[bad - start - 1])} long, not {shard.dim} "
                             "(all must have one length)")
        values = arr.flatten().to_numpy(zero_copy_only=False)
        yield start, values.reshape(len(arr), shard.dim)
        start += len(arr)
