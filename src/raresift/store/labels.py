"""Label events: appended, never overwritten; the newest event per image is its current label."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass


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
