"""Learning commands: next, evaluate, export, simulate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ..ray_jobs import ENGINES
from ..settings import POOLS, default
QUERY_HELP = (
    "describe the rare class in words for the cold start, e.g. 'insect or spider'. There is no text model "
    "offline: the words are matched to the embedding model's 1,000 ImageNet classes (bee, ant, ladybug, "
    "butterflies, spiders, ...), so it cannot know classes ImageNet has no concept for (logos, traffic cones, "
    "face masks, a specific person) and cannot read relations ('a bee on a yellow flower' = bee + flower)"
)

CONCEPT_HELP = ("the rare class to work on: one project, one set of embeddings, several concepts, each with its own "
                "labels, rounds, query and model (the test split is shared). Default: 'default' (a project made "
                "before concepts holds only it); `raresift concepts PROJECT` lists them")


def add_concept(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concept", default="default", metavar="NAME", help=CONCEPT_HELP)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "next",
        help="retrain on all labels and list the next photos to label",
        description="Retrain the model on every label of the pool split and choose the next photos to label "
        "(recorded as a round). Before there are labels of both classes, the first photos come from --query, "
        "--examples, or at random. With --evaluate the photos come from the held-out test split instead: the "
        "unlabelled ones among the test top N (for precision@N), or N random ones with --strategy random "
        "(for the random baseline and recall estimates of `raresift evaluate`).",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help=f"photos to choose (default {default('batch')}; with --evaluate {default('evaluate_n')})")
    p.add_argument("--strategy", default="default", metavar="NAME",
                   help="random, uncertainty (highest entropy), uncertainty-sampling (random, weighted by entropy), "
                   "top (most likely positives), diverse (top without near-duplicates), default = mixed "
                   "(70%% top, 20%% uncertain, 10%% random, no near-duplicates)")
    p.add_argument("--query", default=None, metavar="TEXT", help=QUERY_HELP + "; remembered for later rounds")
    p.add_argument("--examples", nargs="+", default=None, metavar="ID|FILE",
                   help="photos that show the class: ids of photos of the project (they are labelled positive), "
                   "or image files from anywhere (a photo on your phone, a picture from the web, a crop): each is "
                   "copied into the project, embedded with its model and trains as a positive; never counted as "
                   "a photo of the collection")
    p.add_argument("--not-like", nargs="+", default=None, metavar="FILE",
                   help="image files of what the class is not (they train as negatives)")
    p.add_argument("--evaluate", action="store_true", help="choose test photos to measure the ranking (see above)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random choices (default: fresh, recorded)")
    p.add_argument("--who", default=None, help="name recorded with the round")
    p.add_argument("--pool", choices=POOLS, default=default("pool"),
                   help="photos a round scores once there is a model: full = every photo; knn = the "
                   f"{default('knn_k')} nearest neighbours of each labelled photo (FAISS index, built on first use) "
                   f"plus {default('knn_random')} random ones, so the round's time follows the labels, not the "
                   f"collection (SEALS); auto = knn from {default('pool_auto_min'):,} embedded photos on "
                   f"({default('pool_auto_min') // 10:,} with 3 x 3 tiles: a photo counts as its views) "
                   f"(default {default('pool')})")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="where a round's full scan of the collection runs: local (this process) or ray (a Ray Data "
                   "job over shards of the vector file, on the cluster at --ray-address or a local Ray; the project "
                   "folder must be at the same path on every node; same picks; rounds that score a knn pool or have no model "
                   "yet need no full scan and run here; needs pip install 'raresift[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: address of a running Ray cluster (default: start a local Ray)")
    p.add_argument("--review", action="store_true",
                   help="start no round: list the photos answered 'unsure' (stored, never trained on), to look at again")
    add_concept(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of objects: path, image_id, score, strategy, round, split, region (the "
                   "box in original pixels where the score comes from, or null) and tiles (every tile's box and "
                   "score); with --review: image_id, path, split, who, at")
    p.set_defaults(handler=cmd_next)

    p = sub.add_parser(
        "evaluate",
        help="precision@K on the test split with a 95%% interval, random baseline, lift, positives estimate",
        description="Measure the current ranking on the held-out test split: precision@K of the test top K "
        "(label them via `next --evaluate`), the random baseline from random test labels (`next --evaluate "
        "--strategy random`), the lift, the estimated number of positives in the whole collection and the "
        "share of them the top N holds, all with 95%% intervals, so you know when to stop.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--k", type=int, default=default("k"), help=f"K of precision@K (default {default('k')})")
    p.add_argument("--top", type=int, default=None, metavar="N",
                   help="size of the subset you would export, for the recall estimate (default: K x photos / test photos)")
    add_concept(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser(
        "export",
        help="write the ranked candidates and the labelled positives (csv, jsonl, folder, label-studio, imagefolder, coco)",
        description="Export every photo labelled positive and the top N unlabelled photos of the current "
        "ranking with their scores. csv / jsonl: one row per photo (rank, path, score, label, split). "
        "folder: subfolders positive/ and candidate/ with copies (or --link symbolic links) and ranking.csv. "
        "label-studio: a JSON list of tasks with the model's prediction, to import in Label Studio with the "
        "labelling config <Image name=\"image\"/> + <Choices name=\"class\"> (positive / negative). "
        "imagefolder: a dataset to train on, in the Hugging Face imagefolder layout: positive/, negative/ "
        "(labelled) and candidate/ (top N unlabelled, unverified) with metadata.jsonl. coco: a COCO-style JSON "
        "with the photos, the concept as the category and each photo's region as an unverified box.",
    )
    p.add_argument("project", type=Path)
    p.add_argument("--top", type=int, required=True, metavar="N", help="unlabelled candidates to export")
    p.add_argument("--format", dest="fmt", choices=("csv", "jsonl", "folder", "label-studio", "imagefolder", "coco"),
                   default="csv")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="file (or new folder for --format folder)")
    p.add_argument("--link", action="store_true", help="folder: symbolic links instead of copies")
    p.add_argument("--url-prefix", default=None, metavar="URL",
                   help="label-studio: image URL = this prefix + photo id (default: Label Studio local-files URL)")
    add_concept(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "simulate",
        help="replay whole labelling sessions against an answer key (precision@K by labels, plot)",
        description="Replay labelling sessions with a known answer key: an oracle labels what raresift asks. "
        "Each repeat draws a new random 40%% test split (--seed + repeat). Protocol seed = the reference "
        "write-up (300 random labels, then 100 most uncertain; K = 50). Protocol default = raresift's "
        "workflow (cold start from --query, then its default strategy in batches of 25) up to --budget.",
    )
    p.add_argument("--images", type=Path, default=None, metavar="DIR", help="folder of photos (embedded first)")
    p.add_argument("--truth", type=Path, default=None, metavar="FILE.csv", help="answer key, CSV path,label")
    p.add_argument("--truth-folder", default=None, metavar="NAME", help="answer key: positives = photos under folder NAME")
    p.add_argument("--protocol", choices=("seed", "default"), default="default")
    p.add_argument("--strategy", default="default", metavar="NAME", help="strategy of the default protocol")
    p.add_argument("--query", default=None, metavar="TEXT", help=QUERY_HELP)
    p.add_argument("--examples", nargs="+", default=None, metavar="FILE",
                   help="image files from anywhere that show the class: every session starts from them, as "
                   "`next --examples FILE` does (copied into the project, embedded with its model)")
    p.add_argument("--budget", type=int, default=default("budget"), metavar="N",
                   help=f"labels per session (default {default('budget')})")
    p.add_argument("--repeats", type=int, default=default("repeats"), metavar="N",
                   help=f"sessions, each on its own split (default {default('repeats')})")
    p.add_argument("--seed", type=int, default=0, help="seed of repeat 0 (repeat r uses seed + r)")
    p.add_argument("--k", type=int, default=default("k"), help=f"K of precision@K (default {default('k')})")
    p.add_argument("--batch", type=int, default=default("batch"), metavar="N",
                   help=f"photos per round in the default protocol (default {default('batch')})")
    p.add_argument("--pool", choices=POOLS, default=default("pool"),
                   help="photos a round scores, as `next --pool` (knn: an exact index of the simulated photos)")
    p.add_argument("--concept", default=None, metavar="NAME",
                   help="with --project: start the sessions from that concept's query and examples, as `next "
                   "--concept NAME` remembers them (unless --query / --examples are given)")
    p.add_argument("--split", choices=("random", "project"), default="random",
                   help="random (default): a new random test split per session, as the write-up; project: the "
                   "project's own test split in every session")
    p.add_argument("--project", type=Path, default=None, metavar="DIR",
                   help="project folder to embed into and keep, or an embedded project to reuse (skips embedding)")
    p.add_argument("--tiles", type=int, default=None, metavar="N", help="tiles when embedding a new project (see embed)")
    p.add_argument("--model", default=None, metavar="NAME|PATH.onnx",
                   help="model when embedding a new project (see embed; default efficientnet-lite2)")
    p.add_argument("--json", dest="json_path", type=Path, default=None, metavar="FILE",
                   help="write the result as JSON to FILE, and the plot beside it (FILE with .png)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="where to write the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_simulate)


def _project(path: Path, concept: str = "default"):
    from ..project import Project

    return Project(path, concept=concept)


def cmd_next(args: argparse.Namespace) -> int:
    if args.review:
        with _project(args.project, args.concept) as project:
            unsure = project.review()
        if args.json:
            print(json.dumps(unsure, indent=2))
        else:
            for item in unsure:
                print(f"{item['path']}\t{item['split']}\t{item['who']}")
            print(f"{len(unsure)} photos answered 'unsure' (concept {args.concept})", file=sys.stderr)
        return 0
    n = args.n if args.n is not None else (default("evaluate_n") if args.evaluate else default("batch"))
    with _project(args.project, args.concept) as project:
        batch = project.next(n, strategy=args.strategy, query=args.query, examples=args.examples,
                             not_like=args.not_like, evaluate=args.evaluate, seed=args.seed, who=args.who,
                             pool=args.pool, engine=args.engine, ray_address=args.ray_address)
    if args.json:
        print(json.dumps(batch, indent=2))
        return 0
    for item in batch:
        score = "" if item["score"] is None else f"{item['score']:.4f}"
        print(f"{item['path']}\t{score}\t{item['strategy']}")
    rnd = batch[0]["round"] if batch else "-"
    print(f"round {rnd}: {len(batch)} photos to label", file=sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    with _project(args.project, args.concept) as project:
        report = project.evaluate(k=args.k, top=args.top)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0

    def fmt(v, ci=None):
        if v is None:
            return "n/a"
        return f"{v}" + (f"  (95% {ci[0]}..{ci[1]})" if ci else "")
    k = report["k"]
    print(f"precision@{k}      {fmt(report['precision_at_k'], report['precision_at_k_ci'])}"
          f"   [{report['top_k_positives']} of {report['top_k_labelled']} labelled, {report['top_k_missing']} unlabelled]")
    print(f"random baseline   {fmt(report['random_precision'], report['random_precision_ci'])}"
          f"   [{report['random_positives']} of {report['random_labels']} random test photos]")
    print(f"lift              {fmt(report['lift'], report['lift_ci'])}")
    print(f"positives (est.)  {fmt(report['estimated_positives'], report['estimated_positives_ci'])}"
          f" of {report['collection_photos']} photos")
    print(f"top {report['top_n']} holds   {fmt(report['top_n_recall'], report['top_n_recall_ci'])} of them")
    for hint in report["hints"]:
        print(f"hint: {hint}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _project(args.project, args.concept) as project:
        out = project.export(top=args.top, fmt=args.fmt, out=args.out, link=args.link, url_prefix=args.url_prefix)
        root = project.store.images_root
    print(f"wrote {out}", file=sys.stderr)
    if args.fmt == "label-studio" and args.url_prefix is None:
        from ..export import LABEL_STUDIO_CONFIG

        print(label_studio_hint(root, LABEL_STUDIO_CONFIG), file=sys.stderr)
    return 0


def label_studio_hint(images_root, config: str) -> str:
    """What Label Studio needs before the exported tasks show their photos (local-files URLs)."""
    root = Path(images_root).resolve() if images_root else Path("/")
    doc_root = root.anchor or "/"
    return (
        "Label Studio shows these photos only when it serves local files:\n"
        f"  1. start it with LOCAL_FILES_SERVING_ENABLED=true LOCAL_FILES_DOCUMENT_ROOT={doc_root} label-studio start\n"
        "  2. in the project: Settings > Labeling Interface > Code, paste this config:\n"
        + "".join(f"       {line}\n" for line in config.strip().splitlines())
        + f"  3. Settings > Cloud Storage > Add Source Storage > Local files, absolute path {root}\n"
        "     (tick nothing else; no need to sync), then import the JSON file\n"
        "  Or pass --url-prefix URL to point the tasks at a web server of your own."
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..simulate import simulate

    if args.images is None and args.project is None:
        raise InputError("give --images DIR (photos) or --project DIR (an embedded project)")
    embed_options = {k: v for k, v in (("tiles", args.tiles), ("model", args.model)) if v is not None} or None
    with tqdm(total=args.repeats, desc="sessions", unit="run", disable=args.no_progress or None, file=sys.stderr) as bar:
        result = simulate(
            images=args.images, truth=args.truth, truth_folder=args.truth_folder, protocol=args.protocol,
            strategy=args.strategy, query=args.query, examples=args.examples, budget=args.budget, repeats=args.repeats, seed=args.seed,
            project=args.project, k=args.k, batch=args.batch, split=args.split, json_path=args.json_path,
            plot_path=args.plot,
            embed_options=embed_options, progress=bar.update, pool=args.pool, concept=args.concept,
        )
    k = result["k"]
    print(f"{result['protocol']} protocol, {result['repeats']} sessions, {result['photos']} photos "
          f"({result['positives']} positive); random precision@{k} = {result['random_precision_at_k_mean']:.3f}")
    print(f"{'labels':>7}  {'precision@' + str(k):>13}  {'sd':>6}  {'positives found':>15}")
    for p in result["curve"]:
        print(f"{p['labels']:>7}  {p['precision_at_k_mean']:>13.3f}  {p['precision_at_k_sd']:>6.3f}  "
              f"{p['positives_found_mean']:>15.1f}")
    if args.json_path:
        print(f"wrote {args.json_path}" + (f" and {result['plot']}" if result.get("plot") else ""), file=sys.stderr)
    return 0
