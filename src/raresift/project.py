"""``Project``: the one entry point that ties the store, the registry and the embeddings together.

A project is a folder::

    PROJECT/
      raresift.sqlite        images, splits, labels, rounds, queue, errors (SQLite, WAL)
      embeddings/
        vectors.npy          (images, views, dim) features, view 0 = whole photo, 1.. = tiles
        logits.npy           (images, views, 1000) ImageNet logits (built-in models only)
        index.faiss, ...     FAISS index and caches derived from the vectors (raresift.scale)
      learn/                 caches of the learning loop (text-query scores, clusters)
      exports/               what the web page exported
      embed.lock             held while `embed` runs
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import io
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    InputError,
    LabelImportError,
    NotAProjectError,
    NotReadyError,
    ProjectExistsError,
)
from .store import db as _db
from .store import labels as _labels
from .store import registry as _registry
from .store import vectors as _vectors

__all__ = ["Project", "AddReport", "DEFAULT_TEST_FRACTION"]

log = logging.getLogger(__name__)

DEFAULT_TEST_FRACTION = 0.4
DEFAULT_SEED = 0
EMBED_DIR = "embeddings"
VECTORS_FILE = "vectors.npy"
LOGITS_FILE = "logits.npy"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class AddReport:
    """What registering a folder did."""

    added: int
    errors: int
    total: int


def _default_who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


class Project:
    """A raresift project folder. Open one with :meth:`open`, make one with :meth:`create`.

    The object holds one SQLite connection; use it as a context manager or call :meth:`close`.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self.db = conn

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> Project:
        """Open an existing project folder."""
        p = Path(path)
        if not p.is_dir():
            raise NotAProjectError(f"{p} is not a raresift project (no such folder); create one with `raresift init`")
        return cls(p, _db.connect(p / _db.DB_NAME))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        images: str | os.PathLike | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        seed: int = DEFAULT_SEED,
        exist_ok: bool = False,
    ) -> Project:
        """Create a project folder (or, with ``exist_ok``, open the one that is there).

        ``images`` is the folder whose photos the project registers (see :meth:`add_images`).
        A random ``test_fraction`` of the photos is held out as the test split, drawn with ``seed``.
        """
        if not 0.0 <= test_fraction < 1.0:
            raise InputError(f"--test-fraction must be in [0, 1), got {test_fraction}")
        p = Path(path)
        if images is not None:
            root = Path(images)
            if not root.exists():
                raise InputError(f"images folder {root} does not exist")
            if not root.is_dir():
                raise InputError(f"images folder {root} is not a folder")
            if not os.access(root, os.R_OK | os.X_OK):
                raise InputError(f"images folder {root} is not readable")
            images = root.resolve()
        if (p / _db.DB_NAME).exists():
            if not exist_ok:
                raise ProjectExistsError(f"{p} already holds a raresift project")
            project = cls.open(p)
            if images is not None:
                known = project.meta("images_root")
                if project.meta("created_at") is None:
                    # Its creation was cut short (killed before the settings were saved): finish it.
                    project._set_meta(created_at=str(time.time()), test_fraction=repr(float(test_fraction)),
                                      seed=str(int(seed)), images_root=str(images))
                elif known is not None and Path(known) != Path(images):
                    project.close()
                    raise ProjectExistsError(
                        f"{p} already holds a project for {known}, not {images}; pick another project folder"
                    )
            return project
        if p.exists() and not p.is_dir():
            raise InputError(f"{p} exists and is not a folder")
        if p.exists() and any(p.iterdir()):
            raise InputError(f"{p} is a folder that is not empty and holds no raresift project; pick a new folder")
        p.mkdir(parents=True, exist_ok=True)
        project = cls(p, _db.connect(p / _db.DB_NAME, create=True))
        project._set_meta(
            created_at=str(time.time()),
            test_fraction=repr(float(test_fraction)),
            seed=str(int(seed)),
            **({"images_root": str(images)} if images is not None else {}),
        )
        return project

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    # ------------------------------------------------------------------ settings
    def meta(self, key: str, default: str | None = None) -> str | None:
        """A project setting stored in the database (strings), or ``default``."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, **values: str) -> None:
        with self._tx():
            self.db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def _tx(self):
        return _Transaction(self.db)

    @property
    def images_root(self) -> Path | None:
        """The folder the photos were registered from (None for a project of external vectors)."""
        root = self.meta("images_root")
        return Path(root) if root else None

    @property
    def test_fraction(self) -> float:
        return float(self.meta("test_fraction", str(DEFAULT_TEST_FRACTION)))

    @property
    def seed(self) -> int:
        return int(self.meta("seed", str(DEFAULT_SEED)))

    # ------------------------------------------------------------------ registry
    def add_images(self, *, progress: Progress | None = None) -> AddReport:
        """Register the image files of the images folder that are not registered yet.

        Files that cannot be read (broken links, unreadable) are registered with an error, so
        they are reported and never retried silently. Returns counts of what was added.
        """
        root = self.images_root
        if root is None:
            raise InputError(f"{self.path} was made from an embeddings file and has no images folder to scan")
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
        if first and added:
            self._draw_test_split()
        total = self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        return AddReport(added=added, errors=errors, total=total)

    def _insert_found(self, batch: Sequence[_registry.FoundFile]) -> int:
        now = time.time()
        n_err = 0
        with self._tx():
            for f in batch:
                split = self._hashed_split(f.path)
                cur = self.db.execute(
                    "INSERT INTO images (path, fs_path, size, sha256, mtime, split, status, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (f.path, f.fs_path, f.size, f.sha256, f.mtime, split, "error" if f.error else "new", now),
                )
                if f.error:
                    n_err += 1
                    self.db.execute(
                        "INSERT INTO errors (image_id, path, stage, reason, at) VALUES (?, ?, 'register', ?, ?)",
                        (cur.lastrowid, f.path, f.error, now),
                    )
        return n_err

    def _record_folder_errors(self, folder_errors: list[tuple[str, str]]) -> None:
        """Folders the last scan could not list (their photos are missing from the registry)."""
        now = time.time()
        with self._tx():
            self.db.execute("DELETE FROM errors WHERE stage = 'scan'")  # a folder fixed since is no error
            self.db.executemany(
                "INSERT INTO errors (image_id, path, stage, reason, at) VALUES (NULL, ?, 'scan', ?, ?)",
                [(path, reason, now) for path, reason in folder_errors],
            )

    def _hashed_split(self, path: str) -> str:
        """Split of an image added after the first scan: a stable draw from (seed, id)."""
        h = hashlib.blake2b(f"{self.seed}\0{path}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        u = int.from_bytes(h, "big") / 2**64
        return "test" if u < self.test_fraction else "pool"

    def _draw_test_split(self) -> None:
        """Hold out exactly round(fraction * n) random images as the test split (first registration)."""
        ids = np.array([r[0] for r in self.db.execute("SELECT id FROM images ORDER BY id")], dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        n_test = int(round(self.test_fraction * len(ids)))
        test = set(rng.permutation(ids)[:n_test].tolist())
        with self._tx():
            self.db.executemany(
                "UPDATE images SET split = ? WHERE id = ?",
                [("test" if i in test else "pool", int(i)) for i in ids],
            )

    def import_embeddings(self, embeddings: str | os.PathLike, ids: str | os.PathLike) -> int:
        """Register images from a matrix computed elsewhere: row i of ``embeddings`` belongs to line i of ``ids``.

        The ids may be paths or URIs; the matrix must be 2-D float (float16/float32/float64).
        Returns the number of images registered.
        """
        if self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]:
            raise InputError(f"{self.path} already has images; bring your own vectors into a new project")
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
        self._reset_embeddings()
        vec = _vectors.ensure(self._embed_dir / VECTORS_FILE, len(id_list), (1, matrix.shape[1]), dtype)
        step = 65536
        for start in range(0, matrix.shape[0], step):
            block = np.asarray(matrix[start : start + step], dtype=dtype)
            if not np.isfinite(block).all():
                raise InputError(f"{emb_path} holds NaN or infinite values (rows {start}..{start + len(block) - 1})")
            vec[start : start + len(block), 0, :] = block
        vec.flush()
        del vec
        now = time.time()
        n_test = int(round(self.test_fraction * len(id_list)))
        rng = np.random.default_rng(self.seed)
        is_test = np.zeros(len(id_list), dtype=bool)
        is_test[rng.permutation(len(id_list))[:n_test]] = True
        with self._tx():
            self.db.executemany(
                "INSERT INTO images (id, path, split, status, added_at) VALUES (?, ?, ?, 'embedded', ?)",
                ((i + 1, ident, "test" if is_test[i] else "pool", now) for i, ident in enumerate(id_list)),
            )
        self._set_meta(
            **{
                "embed.model": f"external:{emb_path.name}",
                "embed.dim": str(matrix.shape[1]),
                "embed.views": "1",
                "embed.tiles": "0",
                "embed.logits": "0",
                "embed.dtype": np.dtype(dtype).name,
            }
        )
        self.prepare_scoring()
        return len(id_list)

    # ------------------------------------------------------------------ embeddings
    @property
    def _embed_dir(self) -> Path:
        return self.path / EMBED_DIR

    def _reset_embeddings(self) -> None:
        # Database first: a kill between the two steps must never leave images marked embedded
        # without their vectors (a vector file without settings is discarded by the next `embed`).
        with self._tx():
            self.db.execute("UPDATE images SET status = 'new' WHERE status = 'embedded'")
            self.db.execute("DELETE FROM meta WHERE key LIKE 'embed.%'")
        for name in (VECTORS_FILE, LOGITS_FILE):
            (self._embed_dir / name).unlink(missing_ok=True)

    def embed(self, **options: Any):
        """Embed every registered image that is not embedded yet; see :func:`raresift.embed.run.embed_project`."""
        from .embed.run import embed_project

        return embed_project(self, **options)

    def prepare_scoring(self) -> None:
        """Write the caches that make a labelling round fast at scale (signed-square-root features and
        their norms, see :mod:`raresift.scale.scoring`), so the first `next` does not pay for them.

        Only for one view per photo (no tiles), the case the fast scoring path serves; a project
        folder that cannot be written to is left as it is (rounds then score block by block)."""
        info = self.embedding_info()
        if info is None or info["views"] != 1:
            return
        from .scale import scoring

        try:
            vectors = self.vectors()
            scoring.row_norms(self, vectors, power=True)
            scoring.whole_features(self, vectors, power=True)
        except OSError as exc:
            log.warning("scoring caches not written (%s); rounds will score block by block", exc)

    def embedding_info(self) -> dict[str, Any] | None:
        """The embedding settings of the project (model, dim, views, tiles, ...), or None before `embed`."""
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
        }

    def vectors(self) -> np.ndarray:
        """All feature vectors as a read-only memory map of shape (images, views, dim), row = id - 1.

        Rows of images that are not embedded hold zeros; see :meth:`embedded_mask`.
        """
        arr = _vectors.open_read(self._embed_dir / VECTORS_FILE)
        if arr is None or self.embedding_info() is None:
            raise NotReadyError(f"{self.path} has no embeddings yet; run `raresift embed {self.path}`")
        return arr

    def logits(self) -> np.ndarray | None:
        """ImageNet logits, (images, views, 1000) memory map, or None where the model has none."""
        if self.meta("embed.logits") != "1":
            return None
        return _vectors.open_read(self._embed_dir / LOGITS_FILE)

    def embedded_mask(self) -> np.ndarray:
        """Boolean array over rows (id - 1): True where the image is embedded.

        Read by SQL aggregates (no Python object per image: a round at 10^6 photos reads it)."""
        from .scale.scoring import embedded_mask

        return embedded_mask(self)

    def embeddings(self) -> tuple[list[str], np.ndarray]:
        """``(ids, matrix)``: the id of every embedded image and its whole-photo vector (row i = ids[i]).

        Where every registered image is embedded, ``matrix`` is a read-only view of the memory map
        (no copy); otherwise the embedded rows are gathered into a new array.
        """
        vec = self.vectors()
        rows = self.db.execute("SELECT id, path FROM images WHERE status = 'embedded' ORDER BY id").fetchall()
        ids = [r[1] for r in rows]
        idx = np.fromiter((r[0] - 1 for r in rows), dtype=np.int64, count=len(rows))
        if len(idx) == vec.shape[0] and (len(idx) == 0 or idx[-1] == len(idx) - 1):
            return ids, vec[:, 0, :]
        return ids, np.asarray(vec[idx, 0, :])

    # ------------------------------------------------------------------ images
    def image_ids(self) -> list[str]:
        """Ids (paths) of all registered images, in registration order (row = position)."""
        return [r[0] for r in self.db.execute("SELECT path FROM images ORDER BY id")]

    def image_id(self, path: str) -> int:
        """The database id of the image with id (path) ``path``."""
        row = self.db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise InputError(f"no image with id {path!r} in this project")
        return row[0]

    def file_path(self, image_id: int) -> Path | None:
        """The file of a registered image on disk, or None for an external id (URI, vectors only)."""
        row = self.db.execute("SELECT fs_path FROM images WHERE id = ?", (image_id,)).fetchone()
        root = self.images_root
        if row is None or row[0] is None or root is None:
            return None
        return Path(os.fsdecode(os.path.join(os.fsencode(root), bytes(row[0]))))

    def splits(self) -> np.ndarray:
        """Array over rows (id - 1) of split names ('pool' / 'test'), a ``<U4`` string array.

        Read by SQL aggregates (no Python object per image: a round at 10^6 photos reads it)."""
        from .scale.scoring import split_names

        return split_names(self)

    # ------------------------------------------------------------------ labels
    def label(
        self,
        items: Iterable[tuple[str | int, int | None]],
        *,
        who: str | None = None,
        source: str = "python",
        round_id: int | None = None,
        strategy: str | None = None,
        expected: dict[int, int | None] | None = None,
    ) -> list[_labels.LabelEvent]:
        """Record labels: ``(image, value)`` pairs, image as id (path) or database id, value 1, 0 or None (withdraw).

        All pairs are committed in one transaction before this returns. Nothing is overwritten:
        each label is a new event with who / when / round / strategy.
        """
        pairs = []
        for image, value in items:
            image_id = image if isinstance(image, int) else self.image_id(image)
            if value is not None and value not in (0, 1):
                raise InputError(f"label must be 1 or 0, got {value!r}")
            pairs.append((image_id, None if value is None else int(value)))
        return _labels.append(
            self.db, pairs, who=who or _default_who(), source=source,
            round_id=round_id, strategy=strategy, expected=expected,
        )

    def labels(self) -> dict[str, int]:
        """Current labels: image id (path) -> 1 or 0."""
        return {
            r[0]: r[1]
            for r in self.db.execute(
                "SELECT i.path, c.value FROM current_labels c JOIN images i ON i.id = c.image_id ORDER BY c.image_id"
            )
        }

    def label_array(self) -> np.ndarray:
        """Array over rows (id - 1): 1, 0, or -1 where the image has no label."""
        n = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
        arr = np.full(n, -1, dtype=np.int8)
        for image_id, value in self.db.execute("SELECT image_id, value FROM current_labels"):
            arr[image_id - 1] = value
        return arr

    def import_labels(self, csv_path: str | os.PathLike, *, who: str | None = None) -> int:
        """Import a CSV with header ``path,label`` (label 1 or 0, path = image id), all or nothing.

        A bad line raises :class:`LabelImportError` naming the line; nothing is imported then.
        Returns the number of labels read.
        """
        p = Path(csv_path)
        if not p.is_file():
            raise InputError(f"labels file {p} does not exist")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LabelImportError(f"{p} must be UTF-8 text ({exc})") from exc
        rows = _csv_rows(text, p)
        header = next(rows, None)
        if header is None:
            raise LabelImportError(f"{p} is empty; expected a header line `path,label`")
        names = [h.strip().lower() for h in header]
        if "path" not in names or "label" not in names:
            raise LabelImportError(f"{p} line 1: header must have columns `path` and `label`, got {header}")
        ip, il = names.index("path"), names.index("label")
        id_of = {r[0]: r[1] for r in self.db.execute("SELECT path, id FROM images")}
        chosen: dict[int, tuple[int, int]] = {}  # image id -> (value, line)
        for lineno, row in enumerate(rows, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(ip, il):
                raise LabelImportError(f"{p} line {lineno}: expected {len(names)} columns, got {len(row)}")
            path, raw = row[ip].strip(), row[il].strip()
            if raw not in ("0", "1"):
                raise LabelImportError(f"{p} line {lineno}: label must be 1 or 0, got {raw!r}")
            image_id = id_of.get(path)
            if image_id is None:
                raise LabelImportError(f"{p} line {lineno}: no image with id {path!r} in this project")
            value = int(raw)
            if image_id in chosen and chosen[image_id][0] != value:
                raise LabelImportError(
                    f"{p} line {lineno}: {path!r} is labelled {value} here but {chosen[image_id][0]} "
                    f"on line {chosen[image_id][1]}"
                )
            chosen.setdefault(image_id, (value, lineno))
        _labels.append(self.db, [(i, v) for i, (v, _) in chosen.items()], who=who or _default_who(), source="csv")
        return len(chosen)

    # ------------------------------------------------------------------ reports
    def status(self) -> dict[str, Any]:
        """Counts that describe the project; the CLI's `status --json` prints exactly this."""
        q = self.db.execute
        images = q("SELECT COUNT(*) FROM images").fetchone()[0]
        by_status = dict(q("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        by_split = dict(q("SELECT split, COUNT(*) FROM images WHERE status != 'error' GROUP BY split").fetchall())
        lab = q(
            "SELECT COUNT(*), COALESCE(SUM(c.value), 0), COALESCE(SUM(i.split = 'test'), 0), "
            "COALESCE(SUM(c.value * (i.split = 'test')), 0) "
            "FROM current_labels c JOIN images i ON i.id = c.image_id"
        ).fetchone()
        dup = q(
            "SELECT COALESCE(SUM(n - 1), 0) FROM (SELECT COUNT(*) AS n FROM images "
            "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING n > 1)"
        ).fetchone()[0]
        info = self.embedding_info()
        return {
            "project": str(self.path),
            "images_root": self.meta("images_root"),
            "images": images,
            "embedded": by_status.get("embedded", 0),
            "pending": by_status.get("new", 0),
            "errors": q("SELECT COUNT(DISTINCT COALESCE(image_id, -id)) FROM errors").fetchone()[0],
            "labels": lab[0],
            "positives": lab[1],
            "negatives": lab[0] - lab[1],
            "test": by_split.get("test", 0),
            "pool": by_split.get("pool", 0),
            "test_labels": lab[2],
            "test_positives": lab[3],
            "duplicates": dup,
            "rounds": q("SELECT COUNT(*) FROM rounds").fetchone()[0],
            "conflicts": q("SELECT COUNT(*) FROM labels WHERE conflict = 1").fetchone()[0],
            "model": info["model"] if info else None,
            "tiles": info["tiles"] if info else None,
        }

    def errors(self) -> list[dict[str, Any]]:
        """Files that could not be registered or read, with the stage and the reason."""
        return [
            {"path": r["path"], "stage": r["stage"], "reason": r["reason"], "at": r["at"]}
            for r in self.db.execute("SELECT path, stage, reason, at FROM errors ORDER BY id")
        ]


def _csv_rows(text: str, p: Path) -> Iterable[list[str]]:
    """The rows of a CSV text; a line the csv module rejects (e.g. a field over its size limit) is a
    :class:`LabelImportError` naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        yield from reader
    except csv.Error as exc:
        raise LabelImportError(f"{p} line {reader.line_num}: cannot be read as CSV ({exc})") from None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
