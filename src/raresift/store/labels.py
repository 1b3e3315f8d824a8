"""Label events: appended, never overwritten; the newest event per image and concept is its current label.

Values: 1 (shows the class), 0 (does not), 2 (:data:`UNSURE`: the person could not tell; kept and listed
for review, never trained on), None (the label was withdrawn). Every event belongs to a concept (a rare
class of the project); a project made before concepts existed holds one, :data:`DEFAULT_CONCEPT`.
"""

from __future__ import annotations

import csv
import getpass
import io
import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, LabelImportError
from .db import rollback

UNSURE = 2  # the stored value of an "unsure" answer
DEFAULT_CONCEPT = "default"
VALUE_NAMES = {"1": 1, "0": 0, "unsure": UNSURE, "?": UNSURE}  # what a labels CSV may say
CONCEPT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_concept(name: str) -> str:
    """A concept name (letters, digits, ``_ . -``; at most 64 characters), or :class:`InputError`."""
    if not isinstance(name, str) or not CONCEPT_PATTERN.match(name):
        raise InputError(f"a concept name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                         f"digit), got {name!r}")
    return name


def default_who() -> str:
    """The name recorded with labels when the person gives none: the user name."""
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "unknown"


@dataclass(frozen=True)
class LabelEvent:
    """One stored label event (``value`` 1, 0, :data:`UNSURE`, or None: the label was withdrawn)."""

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


def latest(conn: sqlite3.Connection, image_id: int, concept: str = DEFAULT_CONCEPT) -> LabelEvent | None:
    """The newest label event of an image for a concept (a withdrawal included), or None."""
    row = conn.execute(
        "SELECT * FROM labels WHERE concept = ? AND image_id = ? ORDER BY id DESC LIMIT 1", (concept, image_id)
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
    concept: str = DEFAULT_CONCEPT,
) -> list[LabelEvent]:
    """Append label events for ``(image_id, value)`` pairs in one transaction (all or nothing).

    An item may also be ``(image_id, value, round_id, strategy)``: its own round and strategy
    instead of the ``round_id`` / ``strategy`` arguments (one transaction for photos of several rounds),
    or ``(image_id, value, round_id, strategy, concept)`` (one transaction for several concepts).

    ``expected`` maps an image id to the id of the newest event the caller saw (None: it saw no
    label); if the image has a newer event, :class:`LabelConflict` is raised and nothing is written.
    An event that replaces a label given by someone else is marked ``conflict``.
    Must be called outside a transaction; it opens and commits its own.
    """
    now = time.time()
    events = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        known: set[str] = set()
        for item in items:
            image_id, value = item[0], item[1]
            round_id_, strategy_ = (item[2], item[3]) if len(item) > 2 else (round_id, strategy)
            concept_ = item[4] if len(item) > 4 else concept
            if concept_ not in known:
                conn.execute("INSERT OR IGNORE INTO concepts (name, created_at) VALUES (?, ?)", (concept_, now))
                known.add(concept_)
            if value not in (0, 1, UNSURE, None):
                raise InputError(f"a label is 1, 0, {UNSURE} (unsure) or None (withdraw), got {value!r}")
            prev = latest(conn, image_id, concept_)
            if expected is not None and image_id in expected:
                seen = expected[image_id]
                if (prev.id if prev else None) != seen:
                    raise LabelConflict(image_id, prev)
            if prev is not None and prev.value == value and prev.who == who:
                events.append(prev)  # same label again from the same person: nothing new to record
                continue
            conflict = prev is not None and prev.value is not None and prev.who != who and prev.value != value
            cur = conn.execute(
                "INSERT INTO labels (image_id, value, who, at, round_id, strategy, source, replaces, conflict, concept) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, value, who, now, round_id_, strategy_, source, prev.id if prev else None, int(conflict),
                 concept_),
            )
            events.append(
                LabelEvent(cur.lastrowid, image_id, value, who, now, round_id_, strategy_, source,
                           prev.id if prev else None, conflict)
            )
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return events


def current(conn: sqlite3.Connection, concept: str = DEFAULT_CONCEPT) -> dict[int, int]:
    """Map image id -> current label (0, 1 or :data:`UNSURE`) for every labelled image of a concept."""
    return {row[0]: row[1] for row in conn.execute("SELECT image_id, value FROM current_labels WHERE concept = ?",
                                                   (concept,))}


def read_csv(csv_path: str | os.PathLike, id_of: Any, concept: str = DEFAULT_CONCEPT
             ) -> dict[str, dict[int, int]]:
    """A labels CSV (header ``path,label``, optionally ``concept``) as concept -> image id -> value (``id_of``:
    anything with ``.get(path)`` giving the image id or None, e.g. a dict); a bad
    line raises :class:`LabelImportError`. ``label`` is 1, 0 or ``unsure``; rows without a ``concept``
    column (or with an empty one) belong to ``concept``."""
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
    ic = names.index("concept") if "concept" in names else None
    chosen: dict[tuple[str, int], tuple[int, int]] = {}  # (concept, image id) -> (value, line)
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il):
            raise LabelImportError(f"{p} line {lineno}: expected {len(names)} columns, got {len(row)}")
        path, raw = row[ip].strip(), row[il].strip().lower()
        if raw not in VALUE_NAMES:
            raise LabelImportError(f"{p} line {lineno}: label must be 1, 0 or unsure, got {row[il].strip()!r}")
        name = (row[ic].strip() if ic is not None and len(row) > ic else "") or concept
        if not CONCEPT_PATTERN.match(name):
            raise LabelImportError(f"{p} line {lineno}: concept must be 1-64 letters, digits, '_', '.' or '-', "
                                   f"got {name!r}")
        image_id = id_of.get(path)
        if image_id is None:
            raise LabelImportError(f"{p} line {lineno}: no image with id {path!r} in this project")
        value = VALUE_NAMES[raw]
        key = (name, image_id)
        if key in chosen and chosen[key][0] != value:
            raise LabelImportError(
                f"{p} line {lineno}: {path!r} is labelled {value} here but {chosen[key][0]} "
                f"on line {chosen[key][1]}" + (f" (concept {name})" if ic is not None else "")
            )
        chosen.setdefault(key, (value, lineno))
    out: dict[str, dict[int, int]] = {}
    for (name, i), (v, _) in chosen.items():
        out.setdefault(name, {})[i] = v
    return out


def _csv_rows(text: str, p: Path) -> Iterable[list[str]]:
    """The rows of a CSV text; a line the csv module rejects is a :class:`LabelImportError` naming the line."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        yield from reader
    except csv.Error as exc:
        raise LabelImportError(f"{p} line {reader.line_num}: cannot be read as CSV ({exc})") from None
