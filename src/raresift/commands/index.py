"""Commands of the vector index (`raresift.index`): `index` (build it now, locally or on Ray), `similar` (more like
this photo) and `duplicates` (near-duplicate groups).

Registered by ``raresift.cli`` like the other command modules (``register(subparsers)``). FAISS is
imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..ray_jobs import ENGINES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build the project's vector index now (knn pools, similar, duplicates), here or on a Ray cluster",
        description="Build (or, when the saved one is current, report) the FAISS index of the project's "
        "whole-photo vectors, kept in embeddings/index.faiss. Every command that needs it builds it on first use; "
        "this one builds it ahead of time, and with --engine ray adds the vectors on a Ray cluster (Ray Data, one "
        "task per shard of the vector file; the project folder must be at the same path on every node). "
        "Kinds: flat (exact) up to 50,000 photos; ivf-sq8 (1 byte per value) while it takes at most "
        "index_sq8_max_gb; ivf-pq (64 bytes per photo, neighbours re-ranked by the exact vectors) above, and "
        "for tiled photos kept compact above 50,000.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--kind", choices=("auto", "flat", "ivf-sq8", "ivf-pq"), default="auto",
                   help="kind of index (default auto: by the number of photos, see above)")
    p.add_argument("--rebuild", action="store_true", help="build it again even when the saved one is current")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="where the vectors are added: local (this process) or ray (inverted files only: a flat "
                   "index, up to 50,000 photos, is built here; needs pip install 'raresift[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: address of a running Ray cluster (default: start a local Ray)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON object: kind, photos, dim, nprobe, bytes, built (false when the saved one was "
                   "current), seconds")
    p.set_defaults(handler=cmd_index)

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


def cmd_index(args: argparse.Namespace) -> int:
    from ..index import project_index
    from ..project import Project

    t0 = time.perf_counter()
    with Project(args.project) as project:
        path = project.store.paths.index
        def identity():  # a rebuild replaces the file (os.replace): a new inode, whatever the clock
            st = path.stat() if path.is_file() else None
            return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

        before = identity()
        index = project_index(project.store, kind=args.kind, rebuild=args.rebuild, engine=args.engine,
                              ray_address=args.ray_address)
        built = identity() != before
    report = {"kind": index.kind, "photos": index.size, "dim": index.dim, "nprobe": index.nprobe,
              "bytes": path.stat().st_size, "built": built, "seconds": round(time.perf_counter() - t0, 2)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        state = "built" if built else "already current"
        print(f"{path}: {index.kind} index of {index.size:,} photos ({report['bytes'] / 1e6:,.1f} MB), {state} "
              f"in {report['seconds']} s")
    return 0


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
