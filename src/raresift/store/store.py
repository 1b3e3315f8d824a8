"""``Store``: the project's database and files. All SQL of raresift lives under ``raresift.store``.

The layers above (embedding, learning, the index, the use cases) take a :class:`Store`; only
:class:`raresift.project.Project`, the Python entry point, wraps it for users.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NotAProjectError, NotReadyError, ProjectExistsError
from . import db as _db
from . import labels as _labels
from . import registry as _registry
from . import vectors as _vectors
from .cache import Cache
from .paths import ProjectPaths

__all__ = ["AddReport", "Store", "Transaction"]

Progress = Callable[[int], None]
_ID_CHUNK = 4_000_000  # ids per group_concat: ~32 MB of text, far below SQLite's 1 GB string limit
GEN_VECTORS = "gen.vectors"
GEN_SPLITS = "gen.splits"  # bumped when the test split is drawn again (the first registration)
_SPLIT_CACHE_MIN = 100_000  # rows from which splits() keeps the test rows in a cache file
EXAMPLE_PREFIX = "file:"  # key of an example photo from outside the collection: file:SHA256
UNSURE_ROW = -2  # label_array()'s value for an "unsure" answer (-1: no label)


@dataclass(frozen=True)
class AddReport:
    """What registering a folder did."""

    added: int
    errors: int
    total: int


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                _db.rollback(self.conn)
                raise
        _db.rollback(self.conn)


class Store:
    """One project folder: its SQLite database (one connection) and its files."""

    def __init__(self, root: Path, conn: sqlite3.Connection, concept: str = _labels.DEFAULT_CONCEPT):
        self.root = Path(root)
        # The rare class this store's labels, rounds, queries and models belong to (one project, one set
        # of embeddings, several concepts); everything else (photos, splits, vectors) is shared.
        self.concept = _labels.check_concept(concept)
        self.paths = ProjectPaths(self.root)
        self.db = conn
        # Caches of the learning loop (priors, clusters) and, beside the vectors, the scoring caches.
        self.cache = Cache(self.paths.learn_dir, self.vectors_generation)
        self.vector_cache = Cache(self.paths.embed_dir, self.vectors_generation)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, concept: str = _labels.DEFAULT_CONCEPT) -> Store:
        p = Path(path)
        if not p.is_dir():
            raise NotAProjectError(f"{p} is not a raresift project (no such folder); create one with `raresift init`")
        _labels.check_concept(concept)
        return cls(p, _db.connect(ProjectPaths(p).db), concept)

    @classmethod
    def create(cls, path: str | os.PathLike, *, images: Path | None, test_fraction: float, seed: int,
               exist_ok: bool = False) -> Store:
        p = Path(path)
        if ProjectPaths(p).db.exists():
            if not exist_ok:
                raise ProjectExistsError(f"{p} already holds a raresift project")
            store = cls.open(p)
            if images is not None:
                known = store.meta("images_root")
                if store.meta("created_at") is None:
                    # Its creation was cut short (killed before the settings were saved): finish it.
                    store.set_meta(created_at=str(time.time()), test_fraction=repr(float(test_fraction)),
                                   seed=str(int(seed)), images_root=str(images))
                elif known is not None and Path(known) != Path(images):
                    store.close()
                    raise ProjectExistsError(
                        f"{p} already holds a project for {known}, not {images}; pick another project folder"
                    )
            return store
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} exists and is not a folder")
        if p.exists() and any(p.iterdir()):
            raise InputError(f"{p} is a folder that is not empty and holds no raresift project; pick a new folder")
        p.mkdir(parents=True, exist_ok=True)
        store = cls(p, _db.connect(ProjectPaths(p).db, create=True))
        store.set_meta(
            created_at=str(time.time()), test_fraction=repr(float(test_fraction)), seed=str(int(seed)),
            **({"images_root": str(images)} if images is not None else {}),
        )
        return store

    def close(self) -> None:
        self.db.close()

    def tx(self) -> Transaction:
        return Transaction(self.db)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """A read transaction: every read inside sees the same state of the database (WAL: writers carry
        on meanwhile). Inside a transaction already, that one is the snapshot."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            _db.rollback(self.db)
            raise
        self.db.execute("COMMIT")  # read only: this only ends the snapshot

    # ------------------------------------------------------------------ settings
    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, **values: str) -> None:
        with self.tx() as db:
            _set_meta(db, values)

    @property
    def images_root(self) -> Path | None:
        root = self.meta("images_root")
        return Path(root) if root else None

    @property
    def test_fraction(self) -> float:
        return float(self.meta("test_fraction", "0.4"))

    @property
    def seed(self) -> int:
        return int(self.meta("seed", "0"))

    def vectors_generation(self) -> int:
        """Bumped in the transaction of every change of the vectors (embedded batch, reset, import)."""
        return int(self.meta(GEN_VECTORS, "0"))

    # ------------------------------------------------------------------ registry
    def add_images(self, *, progress: Progress | None = None) -> AddReport:
        """Register the image files of the images folder that are not registered yet."""
        root = self.images_root
        if root is None:
            raise InputError(f"{self.root} was made from an embeddings file and has no images folder to scan")
        if not root.is_dir():
            raise InputError(f"images folder {root} does not exist any more")
        known = {row[0] for row in self.db.execute("SELECT path FROM images")}
        first = not known
        added = errors = 0
        batch: list[_registry.FoundFile] = []
        folder_errors: list[tuple[str, str]] = []
        scan = _registry.scan(
            root, skip=known.__contains__, progress=progress,
            on_error=lambda raw, reason: folder_errors.append((_registry.display_path(raw) + "/", reason)),
        )
        for found in scan:
            if found.path in known:
                continue  # two raw names with the same printable id: keep the first
            known.add(found.path)
            batch.append(found)
            if len(batch) >= 2000:
                errors += self._insert_found(batch)
                added += len(batch)
                batch = []
        if batch:
            errors += self._insert_found(batch)
            added += len(batch)
        self._record_folder_errors(folder_errors)
        errors += len(folder_errors)
        if added:
            self._count_duplicates()
        if first and added:
            ids = np.array([r[0] for r in self.db.execute("SELECT id FROM images ORDER BY id")], dtype=np.int64)
            test = ids[self.draw_test_split(len(ids))]
            with self.tx() as db:
                db.execute("UPDATE images SET split = 'pool'")
                db.executemany("UPDATE images SET split = 'test' WHERE id = ?", [(int(i),) for i in test])
                _bump(db, GEN_SPLITS)  # cached splits drawn before this are void
        total = self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return AddReport(added=added, errors=errors, total=total)

    def _count_duplicates(self) -> None:
        """Exact copies (same content hash) among the photos: counted once per registration, not per status."""
        dup = self.db.execute(
            "SELECT COALESCE(SUM(n - 1), 0) FROM (SELECT COUNT(*) AS n FROM images "
            "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING n > 1)"
        ).fetchone()[0]
        self.set_meta(**{"images.duplicates": str(dup)})

    def draw_test_split(self, n: int) -> np.ndarray:
        """Positions (0..n-1) of exactly round(fraction * n) photos drawn at random with the project's seed:
        the test split of the first registration (folder or vectors)."""
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.permutation(n)[: int(round(self.test_fraction * n))])

    def _insert_found(self, batch: Sequence[_registry.FoundFile]) -> int:
        now = time.time()
        n_err = 0
        with self.tx() as db:
            for f in batch:
                cur = db.execute(
                    "INSERT INTO images (path, fs_path, size, sha256, mtime, split, status, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.path, f.fs_path, f.size, f.sha256, f.mtime, self._hashed_split(f.path),
                     "error" if f.error else "new", now),
                )
                if f.error:
                    n_err += 1
                    db.execute(
                        "INSERT INTO errors (image_id, path, stage, reason, at) VALUES (?, ?, 'register', ?, ?)",
                        (cur.lastrowid, f.path, f.error, now),
                    )
        return n_err

    def _record_folder_errors(self, folder_errors: list[tuple[str, str]]) -> None:
        now = time.time()
        with self.tx() as db:
            db.execute("DELETE FROM errors WHERE stage = 'scan'")  # a folder fixed since is no error
            db.executemany(
                "INSERT INTO errors (image_id, path, stage, reason, at) VALUES (NULL, ?, 'scan', ?, ?)",
                [(path, reason, now) for path, reason in folder_errors],
            )

    def _hashed_split(self, path: str) -> str:
        """Split of an image added after the first scan: a stable draw from (seed, id)."""
        h = hashlib.blake2b(f"{self.seed}\0{path}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return "test" if int.from_bytes(h, "big") / 2**64 < self.test_fraction else "pool"

    def register_external(self, ids: Sequence[str]) -> None:
        """Register vectors-only images (ids 1..n in order), all embedded, with the project's test split."""
        test = np.zeros(len(ids), dtype=bool)
        test[self.draw_test_split(len(ids))] = True
        now = time.time()
        with self.tx() as db:
            db.executemany(
                "INSERT INTO images (id, path, split, status, added_at) VALUES (?, ?, ?, 'embedded', ?)",
                ((i + 1, ident, "test" if test[i] else "pool", now) for i, ident in enumerate(ids)),
            )
            _bump(db, GEN_VECTORS)

    # ------------------------------------------------------------------ images
    def n_rows(self) -> int:
        """Rows of the vector files: the largest image id."""
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]

    def count_images(self) -> int:
        """The number of images, from the counts the triggers keep (``COUNT(*)`` read 10^7 rows: 0.2 s)."""
        return self.db.execute("SELECT COALESCE(SUM(n), 0) FROM image_counts").fetchone()[0]

    def image_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM images ORDER BY id")]

    def image_id(self, path: str) -> int:
        row = self.db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise InputError(f"no image with id {path!r} in this project")
        return row[0]

    def ids_by_path(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT path, id FROM images").fetchall())

    def id_lookup(self) -> _IdLookup:
        """path -> database id, one indexed query per path asked (``.get(path)``): for a labels file, which
        names a few of the collection's paths (reading all 10^7 paths into a dict took 27 s)."""
        return _IdLookup(self.db)

    def image_row(self, image_id: int) -> sqlite3.Row | None:
        """path, split, fs_path, status of one image."""
        return self.db.execute("SELECT path, split, fs_path, status FROM images WHERE id = ?",
                               (int(image_id),)).fetchone()

    def paths_of(self, image_ids: Iterable[int]) -> dict[int, str]:
        """image id -> path for the given ids."""
        ids = [int(i) for i in image_ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: r[1] for r in self.db.execute(q, chunk)})
        return out

    def image_sizes(self, image_ids: Iterable[int]) -> dict[int, tuple[int, int] | None]:
        """image id -> (width, height) as recorded (:meth:`set_image_sizes`), None where not recorded yet."""
        ids = [int(i) for i in image_ids]
        out: dict[int, tuple[int, int] | None] = {i: None for i in ids}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            q = f"SELECT id, width, height FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: (r[1], r[2]) for r in self.db.execute(q, chunk) if r[1] and r[2]})
        return out

    def set_image_sizes(self, sizes: dict[int, tuple[int, int]]) -> None:
        """Record photos' width and height (as shown, after EXIF orientation)."""
        with self.tx() as db:
            db.executemany("UPDATE images SET width = ?, height = ? WHERE id = ?",
                           [(int(w), int(h), int(i)) for i, (w, h) in sizes.items()])

    def file_path(self, image_id: int) -> Path | None:
        row = self.db.execute("SELECT fs_path FROM images WHERE id = ?", (image_id,)).fetchone()
        root = self.images_root
        if row is None or row[0] is None or root is None:
            return None
        return Path(os.fsdecode(os.path.join(os.fsencode(root), bytes(row[0]))))

    def pending_embed(self) -> list[tuple[int, bytes]]:
        return [(row[0], bytes(row[1]))
                for row in self.db.execute("SELECT id, fs_path FROM images WHERE status = 'new' ORDER BY id")]

    def count_status(self, status: str) -> int:
        """Photos with ``status`` (from the counts the triggers keep: no scan of the collection)."""
        return self.db.execute("SELECT COALESCE(SUM(n), 0) FROM image_counts WHERE status = ?", (status,)).fetchone()[0]

    def retry_errors(self) -> None:
        with self.tx() as db:
            db.execute("DELETE FROM errors WHERE image_id IN (SELECT id FROM images WHERE status = 'error')")
            db.execute("UPDATE images SET status = 'new' WHERE status = 'error' AND fs_path IS NOT NULL")

    def mark_embedded(self, ok_ids: Sequence[int], bad: Sequence[tuple[int, str]]) -> None:
        """One embedded batch: mark its images, record its unreadable files, bump the vectors generation."""
        now = time.time()
        with self.tx() as db:
            db.executemany("UPDATE images SET status = 'embedded' WHERE id = ?", [(int(i),) for i in ok_ids])
            for image_id, reason in bad:
                db.execute("UPDATE images SET status = 'error' WHERE id = ?", (image_id,))
                db.execute(
                    "INSERT INTO errors (image_id, path, stage, reason, at) "
                    "SELECT id, path, 'embed', ?, ? FROM images WHERE id = ? "
                    "ON CONFLICT(image_id, stage) DO UPDATE SET reason = excluded.reason, at = excluded.at",
                    (reason, now, image_id),
                )
            if ok_ids:
                _bump(db, GEN_VECTORS)

    def _ids(self, where: str, n: int) -> np.ndarray:
        """Ids of the images matching ``where``, read as comma-joined text parsed by numpy (no Python object per row)."""
        parts = []
        for lo in range(1, n + 1, _ID_CHUNK):
            text = self.db.execute(
                f"SELECT group_concat(id) FROM images WHERE {where} AND id BETWEEN ? AND ?", (lo, lo + _ID_CHUNK - 1)
            ).fetchone()[0]
            if text:
                parts.append(np.fromstring(text, dtype=np.int64, sep=","))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def embedded_mask(self) -> np.ndarray:
        """Boolean array over rows (id - 1): True where the image is embedded.

        The ``images_status`` index answers which images are *not* embedded (usually none or few);
        ``MAX(id)`` is one look-up and the counts come from ``image_counts``.
        """
        with self.snapshot():  # the counts and the ids from one state of the database
            n = self.n_rows()
            rows = self.count_images()
            waiting = self.count_status("new") + self.count_status("error")
            if (rows - waiting) * 2 >= rows and rows == n:  # ids are 1..n without gaps (nothing deletes images)
                mask = np.ones(n, dtype=bool)
                mask[self._ids("status IN ('new', 'error')", n) - 1] = False
                return mask
            mask = np.zeros(n, dtype=bool)
            mask[self._ids("status = 'embedded'", n) - 1] = True
            return mask

    def splits(self) -> np.ndarray:
        """Array over rows (id - 1) of split names ('pool' / 'test'), a ``<U4`` string array
        (:meth:`test_mask` is the same as booleans: 16x less memory)."""
        return np.where(self.test_mask(), "test", "pool")

    def test_mask(self) -> np.ndarray:
        """Boolean array over rows (id - 1): True where the photo is in the test split.

        A photo's split changes only when the first registration draws the test split (which bumps
        ``gen.splits``), so the test rows are cached (a boolean file in ``learn/``, keyed on that
        counter, the number of rows and of test photos, which the triggers count): reading and parsing
        4 million test ids took 2.2 s of a round at 10^7 photos."""
        with self.snapshot():  # the key and the ids from one state of the database
            n = self.n_rows()
            n_test = self.db.execute("SELECT COALESCE(SUM(n), 0) FROM image_counts WHERE split = 'test'").fetchone()[0]
            drawn = self.meta(GEN_SPLITS, "0")

            def build() -> np.ndarray:
                test = np.zeros(n, dtype=bool)
                test[self._ids("split = 'test'", n) - 1] = True
                return test

            try:
                test = self.cache.array("splits", (n, int(n_test), drawn), build) if n >= _SPLIT_CACHE_MIN \
                    else build()
            except OSError:  # a project that cannot be written to: read them every time
                test = build()
        return np.array(test, dtype=bool)

    # ------------------------------------------------------------------ vectors
    def embedding_info(self) -> dict[str, Any] | None:
        model = self.meta("embed.model")
        if model is None:
            return None
        return {
            "model": model,
            "dim": int(self.meta("embed.dim", "0")),
            "views": int(self.meta("embed.views", "1")),
            "tiles": int(self.meta("embed.tiles", "0")),
            "resize": self.meta("embed.resize"),
            "logits": self.meta("embed.logits") == "1",
            "dtype": self.meta("embed.dtype", "float16"),
            "layout": self.layout,
        }

    @property
    def layout(self) -> str:
        """How the vectors are kept: ``views`` (every view of every photo) or ``compact`` (the parts of each
        photo's feature, :func:`raresift.learn.features.compact_views`)."""
        return self.meta("embed.layout") or "views"

    def vectors(self) -> np.ndarray:
        """All feature vectors as a read-only memory map, row = id - 1: ``(images, views, dim)``, or in the
        compact layout ``(images, 3, dim)`` (whole photo, tile mean, tile max). The map knows its layout
        (:func:`raresift.store.vectors.layout_of`): use that, not :attr:`layout`, which a `compact` running
        meanwhile may have changed."""
        arr, layout = self._open_layout_file(0)
        if arr is None or self.embedding_info() is None:
            raise NotReadyError(f"{self.root} has no embeddings yet; run `raresift embed {self.root}`")
        return _vectors.tag_layout(arr, layout)

    def _open_layout_file(self, which: int) -> tuple[np.ndarray | None, str]:
        """The vector (0) or logits (1) file of the project's layout, opened read-only, and that layout. Read
        twice if it is missing: a `compact` may have switched the layout and removed the old file in between."""
        for _ in range(2):
            layout = self.layout
            arr = _vectors.open_read(self.paths.vector_files(layout)[which])
            if arr is not None:
                break
        return arr, layout

    def logits(self) -> np.ndarray | None:
        """The ImageNet logits ``(images, views, 1000)``, or in the compact layout ``(images,)`` records of each
        view's 32 top classes and each class's best log-probability
        (:func:`raresift.learn.features.compact_logits`); None for models without them."""
        if self.meta("embed.logits") != "1":
            return None
        return self._open_layout_file(1)[0]

    def layout_files(self, layout: str) -> list[Path]:
        """The files an embedding kept in ``layout`` is made of: the vectors, the tile indices (compact) and the
        logits (models that have them)."""
        vectors, logits, tiles = self.paths.vector_files(layout)
        files = [vectors] if tiles is None else [vectors, tiles]
        return files + [logits] if self.meta("embed.logits") == "1" else files

    def tile_argmax(self) -> np.ndarray | None:
        """Compact layout: ``(images, dim)`` uint8, the tile each value of a photo's max part comes from
        (:func:`raresift.learn.features.tile_argmax`); None in the views layout."""
        path = self.paths.vector_files(self.layout)[2]
        return None if path is None else _vectors.open_read(path)

    def reset_embeddings(self) -> None:
        """Discard the vectors. Database first: a kill between the two steps must never leave images marked
        embedded without their vectors (a vector file without settings is discarded by the next `embed`)."""
        with self.tx() as db:
            db.execute("UPDATE images SET status = 'new' WHERE status = 'embedded'")
            db.execute("DELETE FROM meta WHERE key LIKE 'embed.%'")
            _bump(db, GEN_VECTORS)
        for layout in ("views", "compact"):
            for path in self.paths.vector_files(layout):
                if path is not None:
                    path.unlink(missing_ok=True)
        for path in self.paths.embed_dir.glob(".*.compacting.npy"):  # left by a `compact` that was killed
            path.unlink(missing_ok=True)

    def open_vectors_for_writing(self, rows: int, views: int, dim: int, dtype, *, logits: bool,
                                 layout: str = "views") -> tuple[np.ndarray, np.ndarray | None]:
        """The vector file (and logits file) of ``layout`` for writing, with at least ``rows`` rows: ``(rows,
        views, dim)`` and ``(rows, views, 1000)``, or in the compact layout ``(rows, 3, dim)`` and ``rows``
        records of :func:`raresift.store.vectors.top_logits_dtype` (the tile indices:
        :meth:`open_tiles_for_writing`)."""
        vec_path, logit_path, _ = self.paths.vector_files(layout)
        vec = _vectors.ensure(vec_path, rows, (views if layout == "views" else 3, dim), dtype)
        lg = None
        if logits and layout == "views":
            lg = _vectors.ensure(logit_path, rows, (views, 1000), np.float16)
        elif logits:
            lg = _vectors.ensure(logit_path, rows, (), _vectors.top_logits_dtype(views))
        return vec, lg

    def open_tiles_for_writing(self, rows: int, dim: int) -> np.ndarray:
        """The compact layout's tile-index file ``(rows, dim)`` uint8 for writing."""
        return _vectors.ensure(self.paths.tilemax, rows, (dim,), np.uint8)

    # ------------------------------------------------------------------ example photos from outside
    def example_vectors(self, key: str) -> np.ndarray:
        """The ``(views, dim)`` vectors of an example photo added from outside the collection (``file:HASH``)."""
        path = self.paths.examples_dir / f"{key.removeprefix(EXAMPLE_PREFIX)}.npy"
        if not key.startswith(EXAMPLE_PREFIX) or not path.is_file():
            raise InputError(f"example {key} is not in {self.paths.examples_dir} (deleted?); add the file again")
        return np.load(path)

    # ------------------------------------------------------------------ concepts
    def concept_key(self, key: str) -> str:
        """The meta key of a per-concept setting (the query, the examples): ``key`` itself for the default
        concept (so projects made before concepts keep theirs), ``concept.NAME.key`` for the others."""
        return key if self.concept == _labels.DEFAULT_CONCEPT else f"concept.{self.concept}.{key}"

    def concepts(self) -> list[dict[str, Any]]:
        """Every concept of the project with its counts: name, labels, positives, negatives, unsure, rounds."""
        rows = self.db.execute(
            "SELECT c.name, "
            "(SELECT COUNT(*) FROM current_labels l WHERE l.concept = c.name AND l.value IN (0, 1)), "
            "(SELECT COUNT(*) FROM current_labels l WHERE l.concept = c.name AND l.value = 1), "
            "(SELECT COUNT(*) FROM current_labels l WHERE l.concept = c.name AND l.value = 2), "
            "(SELECT COUNT(*) FROM rounds r WHERE r.concept = c.name), c.created_at "
            "FROM concepts c ORDER BY c.created_at, c.name").fetchall()
        return [{"concept": r[0], "labels": r[1], "positives": r[2], "negatives": r[1] - r[2], "unsure": r[3],
                 "rounds": r[4]} for r in rows]

    def add_concept(self) -> None:
        """Record this store's concept (labels and rounds record it by themselves)."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO concepts (name, created_at) VALUES (?, ?)", (self.concept, time.time()))

    # ------------------------------------------------------------------ labels
    def label_array(self) -> np.ndarray:
        """Array over rows (id - 1) of the concept's labels: 1, 0, :data:`UNSURE_ROW` (-2: answered "unsure",
        never trained on, not asked again), or -1 where the image has no label."""
        arr = np.full(self.n_rows(), -1, dtype=np.int8)
        for image_id, value in self.db.execute("SELECT image_id, value FROM current_labels WHERE concept = ?",
                                               (self.concept,)):
            arr[image_id - 1] = UNSURE_ROW if value == _labels.UNSURE else value
        return arr

    def labels_by_path(self) -> dict[str, int]:
        """path -> current label (1, 0 or 2 = unsure) of the concept."""
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT i.path, c.value FROM current_labels c JOIN images i ON i.id = c.image_id WHERE c.concept = ? "
            "ORDER BY c.image_id", (self.concept,))}

    def append_labels(self, items, **kw) -> list[_labels.LabelEvent]:
        return _labels.append(self.db, items, concept=self.concept, **kw)

    def latest_label(self, image_id: int) -> _labels.LabelEvent | None:
        return _labels.latest(self.db, image_id, self.concept)

    def newest_label_of(self, who: str) -> tuple[int, int] | None:
        """(image id, event id) of the newest label by ``who`` that is still current, or None."""
        row = self.db.execute(
            "SELECT l.image_id, l.id FROM labels l WHERE l.concept = ? AND l.who = ? AND l.value IS NOT NULL "
            "AND l.id = (SELECT MAX(id) FROM labels m WHERE m.concept = l.concept AND m.image_id = l.image_id) "
            "ORDER BY l.id DESC LIMIT 1",
            (self.concept, who),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def label_counts(self) -> dict[str, int]:
        """labels (1 and 0), positives, negatives, unsure now, and ``seq``: the newest label event id (read
        together, in one statement)."""
        pos, neg, unsure, seq = self.db.execute(
            "SELECT (SELECT COUNT(*) FROM current_labels WHERE concept = ?1 AND value = 1), "
            "(SELECT COUNT(*) FROM current_labels WHERE concept = ?1 AND value = 0), "
            "(SELECT COUNT(*) FROM current_labels WHERE concept = ?1 AND value = 2), "
            "(SELECT COALESCE(MAX(id), 0) FROM labels)", (self.concept,)).fetchone()
        return {"labels": pos + neg, "positives": pos, "negatives": neg, "unsure": unsure, "seq": seq}

    def labellers(self) -> dict[int, str]:
        """image id -> who gave its current label."""
        return dict(self.db.execute("SELECT image_id, who FROM current_labels WHERE concept = ?",
                                    (self.concept,)).fetchall())

    def label_history(self) -> Iterable[tuple[int, int | None]]:
        return self.db.execute("SELECT image_id, value FROM labels WHERE concept = ? ORDER BY id", (self.concept,))

    def label_rates(self) -> list[tuple[str, int, int]]:
        """(strategy, labels, positives) of the current labels, per strategy that picked them."""
        return self.db.execute(
            "SELECT COALESCE(strategy, 'manual'), COUNT(*), SUM(value = 1) FROM current_labels "
            "WHERE concept = ? AND value IN (0, 1) GROUP BY 1 ORDER BY 2 DESC", (self.concept,)
        ).fetchall()

    def unsure(self) -> list[dict[str, Any]]:
        """The photos answered "unsure" (for review), newest first: image_id, path, split, who, at."""
        return [{"image_id": r[0], "path": r[1], "split": r[2], "who": r[3], "at": r[4]} for r in self.db.execute(
            "SELECT c.image_id, i.path, i.split, c.who, c.at FROM current_labels c JOIN images i ON i.id = c.image_id "
            "WHERE c.concept = ? AND c.value = 2 ORDER BY c.id DESC", (self.concept,))]

    # ------------------------------------------------------------------ rounds and queue
    def record_round(self, *, strategy: str, n: int, seed: int, purpose: str, params: dict,
                     picks: Sequence[tuple[int, str, float | None]]) -> int:
        """Record a round of the concept and its queue (``picks``: image id, strategy, score) in one transaction."""
        with self.tx() as db:
            db.execute("INSERT OR IGNORE INTO concepts (name, created_at) VALUES (?, ?)", (self.concept, time.time()))
            cur = db.execute(
                "INSERT INTO rounds (started_at, strategy, n, seed, purpose, params, concept) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), strategy, int(n), int(seed), purpose, json.dumps(params), self.concept),
            )
            round_id = cur.lastrowid
            db.executemany(
                "INSERT INTO queue (round_id, image_id, position, strategy, score) VALUES (?, ?, ?, ?, ?)",
                [(round_id, int(i), k, s, p) for k, (i, s, p) in enumerate(picks)],
            )
        return round_id

    def count_rounds(self, purpose: str | None = None) -> int:
        if purpose is None:
            return self.db.execute("SELECT COUNT(*) FROM rounds WHERE concept = ?", (self.concept,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM rounds WHERE concept = ? AND purpose = ?",
                               (self.concept, purpose)).fetchone()[0]

    def evaluation_random_ids(self) -> set[int]:
        """Image ids drawn by earlier `next --evaluate --strategy random` rounds of the concept."""
        return {r[0] for r in self.db.execute(
            "SELECT q.image_id FROM queue q JOIN rounds r ON r.id = q.round_id "
            "WHERE r.concept = ? AND r.purpose = 'evaluate' AND q.strategy = 'random'", (self.concept,))}

    def pending(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Photos queued by earlier rounds of the concept that have no label yet (an "unsure" answer counts as
        one), oldest round first, in queue order."""
        sql = (
            "SELECT q.image_id, i.path, q.score, q.strategy, q.round_id, i.split, r.purpose FROM queue q "
            "JOIN rounds r ON r.id = q.round_id JOIN images i ON i.id = q.image_id "
            "WHERE r.concept = ?1 AND q.image_id NOT IN (SELECT image_id FROM current_labels WHERE concept = ?1)"
            + (" AND r.purpose = ?2" if purpose else "")
            + " ORDER BY q.round_id, q.position"
        )
        seen: set[int] = set()
        out = []
        for row in self.db.execute(sql, (self.concept, purpose) if purpose else (self.concept,)):
            if row[0] in seen:
                continue
            seen.add(row[0])
            out.append({"path": row[1], "image_id": row[0], "score": row[2], "strategy": row[3], "round": row[4],
                        "split": row[5], "purpose": row[6]})
        return out

    def queued_in(self, image_id: int) -> sqlite3.Row | None:
        """round id, strategy, score, purpose of the concept's newest round that queued the photo."""
        return self.db.execute(
            "SELECT q.round_id, q.strategy, q.score, r.purpose FROM queue q JOIN rounds r ON r.id = q.round_id "
            "WHERE r.concept = ? AND q.image_id = ? ORDER BY q.round_id DESC LIMIT 1",
            (self.concept, int(image_id))).fetchone()

    def latest_round(self) -> dict[str, Any] | None:
        """The concept's newest round with its progress: size, labelled, positives, left."""
        row = self.db.execute("SELECT id, strategy, n, purpose, started_at FROM rounds WHERE concept = ? "
                              "ORDER BY id DESC LIMIT 1", (self.concept,)).fetchone()
        if row is None:
            return None
        n_q, n_lab, n_pos = self.db.execute(
            "SELECT COUNT(*), COUNT(c.image_id), COALESCE(SUM(c.value = 1), 0) FROM queue qu "
            "LEFT JOIN current_labels c ON c.image_id = qu.image_id AND c.concept = ? WHERE qu.round_id = ?",
            (self.concept, row[0])).fetchone()
        return {"id": row[0], "strategy": row[1], "purpose": row[3], "size": n_q, "labelled": n_lab,
                "positives": n_pos, "left": n_q - n_lab}

    # ------------------------------------------------------------------ reports
    def status(self) -> dict[str, Any]:
        """Counts that describe the project; the CLI's `status --json` prints exactly this."""
        q = self.db.execute
        # Image counts from image_counts (kept by triggers): no scan of the collection.
        counts = q("SELECT status, split, n FROM image_counts").fetchall()
        by_status: dict[str, int] = {}
        by_split: dict[str, int] = {}
        for status, split, n in counts:
            by_status[status] = by_status.get(status, 0) + n
            if status != "error":
                by_split[split] = by_split.get(split, 0) + n
        lab = q(
            "SELECT COUNT(*), COALESCE(SUM(c.value = 1), 0), COALESCE(SUM(i.split = 'test'), 0), "
            "COALESCE(SUM((c.value = 1) * (i.split = 'test')), 0) "
            "FROM current_labels c JOIN images i ON i.id = c.image_id WHERE c.concept = ? AND c.value IN (0, 1)",
            (self.concept,),
        ).fetchone()
        unsure = q("SELECT COUNT(*) FROM current_labels WHERE concept = ? AND value = 2", (self.concept,)).fetchone()[0]
        info = self.embedding_info()
        return {
            "project": str(self.root),
            "images_root": self.meta("images_root"),
            "images": sum(by_status.values()),
            "embedded": by_status.get("embedded", 0),
            "pending": by_status.get("new", 0),
            "errors": q("SELECT COUNT(DISTINCT COALESCE(image_id, -id)) FROM errors").fetchone()[0],
            "concept": self.concept,
            "labels": lab[0],
            "positives": lab[1],
            "negatives": lab[0] - lab[1],
            "unsure": unsure,
            "test": by_split.get("test", 0),
            "pool": by_split.get("pool", 0),
            "test_labels": lab[2],
            "test_positives": lab[3],
            "duplicates": int(self.meta("images.duplicates", "0")),
            "rounds": self.count_rounds(),
            "conflicts": q("SELECT COUNT(*) FROM labels WHERE concept = ? AND conflict = 1", (self.concept,)).fetchone()[0],
            "model": info["model"] if info else None,
            "tiles": info["tiles"] if info else None,
            "layout": info["layout"] if info else None,
        }

    def errors(self) -> list[dict[str, Any]]:
        return [
            {"path": r["path"], "stage": r["stage"], "reason": r["reason"], "at": r["at"]}
            for r in self.db.execute("SELECT path, stage, reason, at FROM errors ORDER BY id")
        ]

    def error_reason(self, image_id: int) -> str | None:
        row = self.db.execute("SELECT reason FROM errors WHERE image_id = ? ORDER BY at DESC LIMIT 1",
                              (image_id,)).fetchone()
        return row[0] if row else None


class _IdLookup:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def get(self, path: str, default: int | None = None) -> int | None:
        row = self.db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        return default if row is None else row[0]


def _set_meta(db: sqlite3.Connection, values: dict[str, str]) -> None:
    db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        list(values.items()),
    )


def _bump(db: sqlite3.Connection, key: str) -> None:
    """Increment a generation counter kept in ``meta`` (inside the caller's transaction)."""
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, '1') "
        "ON CONFLICT(key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)", (key,))
