"""Commands of the vector index: `similar` (more like this photo) and `duplicates` (near-duplicate groups).

Registered by ``raresift.cli`` like the other command modules (``register(subparsers)``). FAISS is
imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similar",
        help="list the photos most similar to one or more example photos (more like this)",
        description="Rank the collection by cosine similarity to the example photos (their mean direction) "
        "with the project's vector index (FAISS; built on first use and kept in embeddings/index.faiss). "
        "Labelled photos are listed too unless --unlabelled.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("examples", nargs="+", metavar="ID", help="ids (paths) of example photos of the project")
    p.add_argument("--n", type=int, default=20, metavar="N", help="photos to list (default 20)")
    p.add_argument("--unlabelled", action="store_true", help="leave out photos that have a label")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects: path, image_id, similarity")
    p.set_defaults(handler=cmd_similar)

    p = sub.add_parser(
        "duplicates",
        help="find groups of near-duplicate photos (same scene, resized, re-encoded, lightly edited)",
        description="Group photos whose vectors have a cosine similarity of at least --threshold with one of "
        "their --k nearest neighbours (linked transitively), using the project's vector index. "
        "Exact copies (same content hash) are counted by `raresift status` already.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    p.add_argument("--k", type=int, default=8, help="neighbours compared per photo (default 8)")
    p.add_argument("--json", action="store_true", help="print a JSON list of groups (lists of ids)")
    p.set_defaults(handler=cmd_duplicates)


def cmd_similar(args: argparse.Namespace) -> int:
    from ..project import Project
    from .index import more_like_this, project_index

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    with Project.open(args.project) as project:
        index = project_index(project)
        vectors = project.vectors()
        rows = [project.image_id(e) - 1 for e in args.examples]
        exclude = (project.label_array() >= 0) if args.unlabelled else None
        found, sims = more_like_this(index, vectors, rows, n=args.n, exclude=exclude)
        paths = _paths(project, found)
    items = [{"path": paths[int(r)], "image_id": int(r) + 1, "similarity": round(float(s), 6)}
             for r, s in zip(found, sims)]
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for item in items:
            print(f"{item['path']}\t{item['similarity']:.4f}")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from ..project import Project
    from .index import near_duplicates, project_index

    if not 0.0 < args.threshold <= 1.0:
        raise InputError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.k < 1:
        raise InputError(f"--k must be at least 1, got {args.k}")
    with Project.open(args.project) as project:
        index = project_index(project)
        groups = near_duplicates(index, project.vectors(), threshold=args.threshold, k=args.k)
        paths = _paths(project, [r for g in groups for r in g])
    named = [[paths[r] for r in g] for g in groups]
    if args.json:
        print(json.dumps(named, indent=2))
    else:
        for g in named:
            print("\t".join(g))
        print(f"{len(named)} groups of near-duplicates, {sum(len(g) for g in named)} photos", file=sys.stderr)
    return 0


def _paths(project, rows) -> dict[int, str]:
    rows = sorted({int(r) for r in rows})
    out: dict[int, str] = {}
    for start in range(0, len(rows), 500):
        chunk = [r + 1 for r in rows[start : start + 500]]
        q = f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})"
        out.update({i - 1: p for i, p in project.db.execute(q, chunk)})
    return out
