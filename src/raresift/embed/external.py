"""Vectors computed elsewhere (`raresift init --embeddings FILE.npy --ids FILE.txt`): checked, then stored."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..store.store import Store

__all__ = ["import_embeddings"]


def import_embeddings(store: Store, embeddings: str | os.PathLike, ids: str | os.PathLike) -> int:
    """Register images from a matrix computed elsewhere: row i of ``embeddings`` belongs to line i of ``ids``.

    The ids may be paths or URIs; the matrix must be 2-D float (float16/float32/float64). The file is
    read block by block (a memory map), never whole. Returns the number of images registered.
    """
    if store.count_images():
        raise InputError(f"{store.root} already has images; bring your own vectors into a new project")
    emb_path, ids_path = Path(embeddings), Path(ids)
    for p, what in ((emb_path, "embeddings file"), (ids_path, "ids file")):
        if not p.is_file():
            raise InputError(f"{what} {p} does not exist")
    try:
        matrix = np.load(emb_path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds for a file that is not .npy
        raise InputError(f"{emb_path} is not a readable .npy matrix ({exc})") from exc
    if matrix.ndim != 2 or matrix.dtype.kind != "f" or matrix.shape[1] < 1:
        raise InputError(
            f"{emb_path} must hold a 2-D float matrix (rows = images), got shape {matrix.shape} {matrix.dtype}"
        )
    try:
        text = ids_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{ids_path} must be UTF-8 text, one id per line ({exc})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    id_list = [line.strip() for line in lines]
    for i, ident in enumerate(id_list, 1):
        if not ident:
            raise InputError(f"{ids_path} line {i}: empty id (one id per line expected)")
    if len(id_list) != matrix.shape[0]:
        raise InputError(
            f"{emb_path} has {matrix.shape[0]} rows but {ids_path} has {len(id_list)} ids; "
            "row i of the matrix must belong to line i of the ids file"
        )
    seen: dict[str, int] = {}
    for i, ident in enumerate(id_list, 1):
        if ident in seen:
            raise InputError(f"{ids_path} line {i}: id {ident!r} repeats line {seen[ident]}")
        seen[ident] = i
    dtype = np.float16 if matrix.dtype == np.float16 else np.float32
    store.reset_embeddings()
    vec, _ = store.open_vectors_for_writing(len(id_list), 1, matrix.shape[1], dtype, logits=False)
    step = 65536
    for start in range(0, matrix.shape[0], step):
        block = np.asarray(matrix[start : start + step], dtype=dtype)
        if not np.isfinite(block).all():
            raise InputError(f"{emb_path} holds NaN or infinite values (rows {start}..{start + len(block) - 1})")
        vec[start : start + len(block), 0, :] = block
    vec.flush()
    del vec
    store.register_external(id_list)
    store.set_meta(**{
        "embed.model": f"external:{emb_path.name}",
        "embed.dim": str(matrix.shape[1]),
        "embed.views": "1",
        "embed.tiles": "0",
        "embed.logits": "0",
        "embed.dtype": np.dtype(dtype).name,
    })
    return len(id_list)
