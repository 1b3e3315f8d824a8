"""Every file name under a project folder, in one place.

::

    PROJECT/
      raresift.sqlite        images, splits, labels, rounds, queue, errors (SQLite, WAL)
      embeddings/
        vectors.npy          (images, views, dim) features; view 0 = whole photo, 1.. = tiles
        logits.npy           (images, views, 1000) ImageNet logits (built-in models only)
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
    def vectors(self) -> Path:
        return self.embed_dir / "vectors.npy"

    @property
    def logits(self) -> Path:
        return self.embed_dir / "logits.npy"

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
