"""Commands of the vector index (`raresift.index`): `similar` (more like this photo) and `duplicates` (near-duplicate groups).

Registered by ``raresift.cli`` like the other command modules (``register(subparsers)``). FAISS is
imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



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

    with Project(args.project) as project:
        items = project.similar(args.examples, n=args.n, unlabelled=args.unlabelled)
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for item in items:
            print(f"{item['path']}\t{item['similarity']:.4f}")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from ..index import duplicate_groups
    from ..project import Project

    with Project(args.project) as project:
        named = duplicate_groups(project.store, threshold=args.threshold, k=args.k)
    if args.json:
        print(json.dumps(named, indent=2))
    else:
        for g in named:
            print("\t".join(g))
        print(f"{len(named)} groups of near-duplicates, {sum(len(g) for g in named)} photos", file=sys.stderr)
    return 0
