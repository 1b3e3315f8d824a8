"""Label events: appended, never overwritten; the newest event per image is its current label."""

from __future__ import annotations

import csv
import getpass
import io
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, LabelImportError


def default_who() -> str:
    """The name recorded with labels when the person gives none: the user name."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


@dataclass(frozen=True)
class LabelEvent:
    """One stored label event (``value`` None means the label was withdrawn)."""

    id: int
    image_id: int
    value: int | None
    who: str
    at: float
    round_id: int | None
    strategy: str | None
    source: str
    replaces: int | None
    conflict: bool


class LabelConflict(Exception):
    """The image's label changed since the caller last saw it (internal; the project re-raises)."""

    def __init__(self, image_id: int, current: LabelEvent | None):
        super().__init__(image_id)
        self.image_id = image_id
        self.current = current


def _event(row: sqlite3.Row | None) -> LabelEvent | None:
    if row is None:
        return None
    return LabelEvent(
        id=row["id"],
        image_id=row["image_id"],
        value=row["value"],
        who=row["who"],
        at=row["at"],
        round_id=row["round_id"],
        strategy=row["strategy"],
        source=row["source"],
        replaces=row["replaces"],
        conflict=bool(row["conflict"]),
    )


def latest(conn: sqlite3.Connection, image_id: int) -> LabelEvent | None:
    """The newest label event of an image (a withdrawal included), or None."""
    row = conn.execute(
        "SELECT * FROM labels WHERE image_id = ? ORDER BY id DESC LIMIT 1", (image_id,)
    ).fetchone()
    return _event(row)


def append(
    conn: sqlite3.Connection,
    items: Iterable[tuple[int, int | None] | tuple[int, int | None, int | None, str | None]],
    *,
    who: str,
    source: str,
    round_id: int | None = None,
    strategy: str | None = None,
    expected: dict[int, int | None] | None = None,
) -> list[LabelEvent]:
    """Append label events for ``(image_id, value)`` pairs in one transaction (all or nothing).

    An item may also be ``(image_id, value, round_id, strategy)``: its own round and strategy
    instead of the ``round_id`` / ``strategy`` arguments (one transaction for photos of several rounds).

    ``expected`` maps an image id to the id of the newest event the caller saw (None: it saw no
    label); if the image has a newer event, :class:`LabelConflict` is raised and nothing is written.
    An event that replaces a label given by someone else is marked ``conflict``.
    Must be called outside a transaction; it opens and commits its own.
    """
    now = time.time()
    events = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for item in items:
            image_id, value = item[0], item[1]
            round_id_, strategy_ = (item[2], item[3]) if len(item) > 2 else (round_id, strategy)
            prev = latest(conn, image_id)
            if expected is not None and image_id in expected:
                seen = expected[image_id]
                if (prev.id if prev else None) != seen:
                    raise LabelConflict(image_id, prev)
            if prev is not None and prev.value == value and prev.who == who:
                events.append(prev)  # same label again from the same person: nothing new to record
                continue
            conflict = prev is not None and prev.value is not None and prev.who != who and prev.value != value
            cur = conn.execute(
                "INSERT INTO labels (image_id, value, who, at, round_id, strategy, source, replaces, conflict) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, value, who, now, round_id_, strategy_, source, prev.id if prev else None, int(conflict)),
            )
            events.append(
                LabelEvent(cur.lastrowid, image_id, value, who, now, round_id_, strategy_, source,
                           prev.id if prev else None, conflict)
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return events


def current(conn: sqlite3.Connection) -> dict[int, int]:
    """Map image id -> current label (0 or 1) for every labelled image."""
    return {row[0]: row[1] for row in conn.execute("SELECT image_id, value FROM current_labels")}


def read_csv(csv_path: str | os.PathLike, id_of: dict[str, int]) -> dict[int, int]:
    """A labels CSV (header ``path,label``) as image id -> value; a bad line raises :class:`LabelImportError`."""
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
    return {i: v for i, (v, _) in chosen.items()}


def _csv_rows(text: str, p: Path) -> Iterable[list[str]]:
    """The rows of a CSV text; a line the csv module rejects is a :class:`LabelImportError` naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        yield from reader
    except csv.Error as exc:
        raise LabelImportError(f"{p} line {reader.line_num}: cannot be read as CSV ({exc})") from None
