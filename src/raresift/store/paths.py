"""Every file name under a project folder, in one place.

::

    PROJECT/
      raresift.sqlite        images, splits, labels, rounds, queue, errors (SQLite, WAL)
      embeddings/
        vectors.npy          (images, views, dim) features; view 0 = whole photo, 1.. = tiles
        logits.npy           (images, views, 1000) ImageNet logits (built-in models only)
        parts.npy            compact layout, instead of vectors.npy: (images, 3, dim) whole photo, tile mean, tile max
        tilemax.npy          compact layout: (images, dim) uint8, the tile each value of the max comes from
        logittop.npy         compact layout, instead of logits.npy: (images,) records, each view's 32 top classes
                             and each class's best log-probability (raresift.learn.features.compact_logits)
        index.faiss, ...     FAISS index and the caches derived from the vectors
      learn/                 caches of the learning loop (priors, clusters, heads); safe to delete
      examples/              example photos from outside the collection (copies, by content hash)
      exports/               what the web page exported
      embed.lock             held while `embed` runs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DB_NAME", "ProjectPaths"]

DB_NAME = "raresift.sqlite"


@dataclass(frozen=True)
class ProjectPaths:
    """The files of the project folder ``root``."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def embed_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def models_dir(self) -> Path:
        """Models ``raresift tune`` wrote (ONNX graphs)."""
        return self.root / "models"

    @property
    def vectors(self) -> Path:
        return self.embed_dir / "vectors.npy"

    @property
    def logits(self) -> Path:
        return self.embed_dir / "logits.npy"

    @property
    def parts(self) -> Path:
        return self.embed_dir / "parts.npy"

    @property
    def tilemax(self) -> Path:
        return self.embed_dir / "tilemax.npy"

    @property
    def logittop(self) -> Path:
        return self.embed_dir / "logittop.npy"

    def vector_files(self, layout: str) -> tuple[Path, Path, Path | None]:
        """The vector file, the logits file and the tile-index file (None) of a vector layout."""
        if layout == "compact":
            return self.parts, self.logittop, self.tilemax
        return self.vectors, self.logits, None

    @property
    def index(self) -> Path:
        return self.embed_dir / "index.faiss"

    @property
    def learn_dir(self) -> Path:
        return self.root / "learn"

    @property
    def examples_dir(self) -> Path:
        return self.root / "examples"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def embed_lock(self) -> Path:
        return self.root / "embed.lock"
