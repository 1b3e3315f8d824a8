"""The project's SQLite database: connection settings and versioned schema migrations.

Migrations are applied in order and each one is recorded in ``schema_migrations``; a database
whose newest recorded version is above what this code knows is refused untouched.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from ..errors import NotAProjectError, SchemaTooNewError

DB_NAME = "raresift.sqlite"

# Each entry: (version, description, SQL script). Never edit a released entry: append a new one.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        -- One row per registered image; row in the vector files = id - 1.
        CREATE TABLE images (
            id        INTEGER PRIMARY KEY,
            path      TEXT NOT NULL UNIQUE,      -- stable id: path relative to the images root, or a URI
            fs_path   BLOB,                      -- raw relative path bytes (non-UTF-8 names), NULL if external
            size      INTEGER,
            sha256    TEXT,
            mtime     REAL,
            width     INTEGER,
            height    INTEGER,
            split     TEXT NOT NULL CHECK (split IN ('pool', 'test')),
            status    TEXT NOT NULL DEFAULT 'new' CHECK (status IN ('new', 'embedded', 'error')),
            added_at  REAL NOT NULL
        );
        CREATE INDEX images_status ON images(status);
        CREATE INDEX images_sha ON images(sha256);
        -- Files that could not be registered or decoded, with the reason.
        CREATE TABLE errors (
            id        INTEGER PRIMARY KEY,
            image_id  INTEGER REFERENCES images(id),
            path      TEXT NOT NULL,
            stage     TEXT NOT NULL,              -- 'register' or 'embed'
            reason    TEXT NOT NULL,
            at        REAL NOT NULL
        );
        CREATE UNIQUE INDEX errors_image_stage ON errors(image_id, stage);
        -- Active-learning rounds: one row each time a batch is chosen.
        CREATE TABLE rounds (
            id         INTEGER PRIMARY KEY,
            started_at REAL NOT NULL,
            strategy   TEXT NOT NULL,
            n          INTEGER NOT NULL,
            seed       INTEGER,
            purpose    TEXT NOT NULL DEFAULT 'label',   -- 'label' or 'evaluate'
            params     TEXT                              -- JSON
        );
        -- Photos chosen in a round and waiting for a label (or already labelled).
        CREATE TABLE queue (
            round_id  INTEGER NOT NULL REFERENCES rounds(id),
            image_id  INTEGER NOT NULL REFERENCES images(id),
            position  INTEGER NOT NULL,
            strategy  TEXT NOT NULL,
            score     REAL,
            PRIMARY KEY (round_id, image_id)
        );
        -- Labels are append-only events: a new event supersedes, never overwrites, an older one.
        -- value 1 = shows the class, 0 = does not, NULL = label withdrawn (undo).
        CREATE TABLE labels (
            id        INTEGER PRIMARY KEY,
            image_id  INTEGER NOT NULL REFERENCES images(id),
            value     INTEGER CHECK (value IN (0, 1)),
            who       TEXT NOT NULL,
            at        REAL NOT NULL,
            round_id  INTEGER REFERENCES rounds(id),
            strategy  TEXT,
            source    TEXT NOT NULL,              -- 'csv', 'web', 'api', 'python', 'simulate', ...
            replaces  INTEGER REFERENCES labels(id),
            conflict  INTEGER NOT NULL DEFAULT 0  -- 1: replaced a label given by someone else
        );
        CREATE INDEX labels_image ON labels(image_id, id);
        CREATE VIEW current_labels AS
            SELECT l.* FROM labels l
            WHERE l.id = (SELECT MAX(id) FROM labels m WHERE m.image_id = l.image_id)
              AND l.value IS NOT NULL;
        """,
    ),
    (
        2,
        "partial index of the test split (reading the split of 10^6 photos each round)",
        """
        CREATE INDEX images_test ON images(id) WHERE split = 'test';
        """,
    ),
    (
        3,
        "image counts kept by triggers, exact-duplicate count in meta (status in O(1) of the collection)",
        """
        CREATE TABLE image_counts (
            status TEXT NOT NULL,
            split  TEXT NOT NULL,
            n      INTEGER NOT NULL,
            PRIMARY KEY (status, split)
        );
        INSERT INTO image_counts (status, split, n) SELECT status, split, COUNT(*) FROM images GROUP BY status, split;
        CREATE TRIGGER image_counts_insert AFTER INSERT ON images BEGIN
            INSERT INTO image_counts (status, split, n) VALUES (NEW.status, NEW.split, 1)
                ON CONFLICT(status, split) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER image_counts_update AFTER UPDATE OF status, split ON images
            WHEN OLD.status != NEW.status OR OLD.split != NEW.split BEGIN
            UPDATE image_counts SET n = n - 1 WHERE status = OLD.status AND split = OLD.split;
            INSERT INTO image_counts (status, split, n) VALUES (NEW.status, NEW.split, 1)
                ON CONFLICT(status, split) DO UPDATE SET n = n + 1;
        END;
        CREATE TRIGGER image_counts_delete AFTER DELETE ON images BEGIN
            UPDATE image_counts SET n = n - 1 WHERE status = OLD.status AND split = OLD.split;
        END;
        INSERT INTO meta (key, value)
            SELECT 'images.duplicates', CAST(COALESCE(SUM(n - 1), 0) AS TEXT)
            FROM (SELECT COUNT(*) AS n FROM images WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING n > 1)
            WHERE true ON CONFLICT(key) DO UPDATE SET value = excluded.value;
        """,
    ),
    (
        4,
        "concepts (several rare classes per project: labels and rounds per concept) and unsure labels (value 2)",
        # The labels table is rebuilt (SQLite cannot change a CHECK constraint): every event is copied with
        # its id, so `replaces` and the label history stay as they were; all of it becomes concept 'default'.
        """
        CREATE TABLE concepts (
            name       TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        );
        INSERT INTO concepts (name, created_at) VALUES ('default', CAST(strftime('%s', 'now') AS REAL));
        CREATE TABLE labels_new (
            id        INTEGER PRIMARY KEY,
            image_id  INTEGER NOT NULL REFERENCES images(id),
            -- 1 = shows the class, 0 = does not, 2 = unsure (kept, never trained on), NULL = withdrawn
            value     INTEGER CHECK (value IN (0, 1, 2)),
            who       TEXT NOT NULL,
            at        REAL NOT NULL,
            round_id  INTEGER REFERENCES rounds(id),
            strategy  TEXT,
            source    TEXT NOT NULL,
            replaces  INTEGER REFERENCES labels(id),
            conflict  INTEGER NOT NULL DEFAULT 0,
            concept   TEXT NOT NULL DEFAULT 'default' REFERENCES concepts(name)
        );
        INSERT INTO labels_new (id, image_id, value, who, at, round_id, strategy, source, replaces, conflict, concept)
            SELECT id, image_id, value, who, at, round_id, strategy, source, replaces, conflict, 'default' FROM labels;
        DROP VIEW current_labels;
        DROP INDEX labels_image;
        DROP TABLE labels;
        ALTER TABLE labels_new RENAME TO labels;
        CREATE INDEX labels_concept_image ON labels(concept, image_id, id);
        CREATE VIEW current_labels AS
            SELECT l.* FROM labels l
            WHERE l.id = (SELECT MAX(id) FROM labels m WHERE m.image_id = l.image_id AND m.concept = l.concept)
              AND l.value IS NOT NULL;
        ALTER TABLE rounds ADD COLUMN concept TEXT NOT NULL DEFAULT 'default';
        CREATE INDEX rounds_concept ON rounds(concept, id);
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def connect(path: Path, *, create: bool = False) -> sqlite3.Connection:
    """Open the project database at ``path`` with the project's settings and run pending migrations.

    Raises :class:`NotAProjectError` when the file does not exist (and ``create`` is false) and
    :class:`SchemaTooNewError` when it was written by a newer raresift; in both cases nothing
    is written.
    """
    if not create and not path.is_file():
        raise NotAProjectError(f"{path.parent} is not a raresift project (no {DB_NAME}); create one with `raresift init`")
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        version = _current_version(conn)
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"{path} has schema version {version}, but this raresift understands up to {SCHEMA_VERSION}; "
                "upgrade raresift to open it (the project was not changed)"
            )
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed label survives a power cut or an OS crash, not only a killed process
        # (WAL + NORMAL may roll back the newest commits then). Costs one fsync per commit (a few ms):
        # labels come at human pace, embedding commits once per batch.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        if version < SCHEMA_VERSION:
            _migrate(conn, version)
    except sqlite3.OperationalError:
        # Locked, disk full, I/O error: a problem of the moment, not of the file; say what it is.
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise NotAProjectError(f"{path} is not a readable raresift database ({exc})") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if row is None:
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    # Foreign keys off while tables are rebuilt (SQLite's own procedure for schema changes), checked
    # before the commit: a migration that left a dangling reference is rolled back.
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        version = _current_version(conn)
        for number, description, script in MIGRATIONS:
            if number <= version:
                continue
            for statement in _split_sql(script):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (number, description, time.time()),
            )
        bad = conn.execute("PRAGMA foreign_key_check").fetchall()
        if bad:
            raise sqlite3.IntegrityError(f"migration left {len(bad)} rows with a dangling reference, e.g. {tuple(bad[0])}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    finally:
        conn.execute("PRAGMA foreign_keys = ON")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if one is still open, keeping the error that led here: SQLite rolls
    some failures back by itself (a full disk: SQLITE_FULL), and a second ROLLBACK would fail with "no
    transaction is active" and hide the error worth reporting."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _split_sql(script: str) -> list[str]:
    """Split a migration script into statements (executescript would commit our transaction)."""
    statements, buf = [], []
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        buf.append(line)
        joined = "\n".join(buf)
        if sqlite3.complete_statement(joined):
            if joined.strip():
                statements.append(joined.strip())
            buf = []
    rest = "\n".join(buf).strip()
    if rest:
        statements.append(rest)
    return statements
