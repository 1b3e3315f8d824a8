"""Models from open_clip (``open_clip:ARCH[:PRETRAINED|:PATH]``) and timm (``timm:NAME[:PATH]``).

* **open_clip** (extra ``raresift[clip]``): the image tower embeds photos; the text tower turns a text
  query into a vector of the same space (:func:`text_embedding`), so a query needs no ImageNet concept.
* **timm** (extra ``raresift[timm]``): image-only models (DINOv2, ConvNeXt, EfficientNet, ...). Features
  are the model's pooled pre-logits features; a model with a 1,000-class ImageNet head also returns its
  logits, so text queries still map through ImageNet's concepts.

Weights never come from the network. ``PRETRAINED`` (open_clip's tag, e.g. ``laion2b_s34b_b79k``; without
it the first tag of the architecture found on this machine) and a timm ``NAME`` (with or without its
``.tag``) are looked up in the local caches only: the Hugging Face cache (``$HF_HOME``, ``$HF_HUB_CACHE``),
open_clip's ``~/.cache/clip`` and torch hub's ``checkpoints`` folder. ``PATH`` is a state dict file
(``.pt``, ``.pth``, ``.bin`` or ``.safetensors``). Where neither is there, loading stops with one line
saying what to pass or download (:class:`~raresift.errors.EmbeddingError`); while a model is built the
Hugging Face libraries are held offline.

Input to every model is a uint8 batch ``(B, size, size, 3)``: scaling to 0-1 and the model's own
mean/std (from its preprocessing config) happen inside the model, whose input size also comes from
that config. The image model is exported once to ONNX (``torch.onnx.export``), checked against eager
PyTorch, cached in raresift's cache folder under a name made of the model, the weights' hash and
:data:`EXPORT_VERSION`, and run in ONNX Runtime; where the export fails (or differs), ``backend="auto"``
runs eager PyTorch instead, with a logged warning, and remembers the failure (a ``.failed`` file beside
where the export would be) so later runs go straight to PyTorch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbeddingError, MissingExtraError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROMPTS",
    "EXPORT_VERSION",
    "FAMILIES",
    "ModelSpec",
    "canonical_name",
    "has_text_tower",
    "image_text_cosine",
    "is_torch_model",
    "load",
    "parse",
    "resolve_weights",
    "text_embedding",
    "weights_digest",
]

FAMILIES = ("open_clip", "timm")
EXTRAS = {"open_clip": "clip", "timm": "timm"}

# Bump when the exported graph changes (wrapper, inputs, outputs), so stale cached files are not reused.
EXPORT_VERSION = 1
OPSET = 17
COSINE_MIN = 0.9999  # the export must match eager PyTorch at least this well, row by row

# The prompt ensemble of a text query: each prompt's text embedding is L2-normalised, the mean of them
# normalised again (CLIP's zero-shot recipe). Pass ``prompts=`` to :func:`text_embedding` to change it.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


# --------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``open_clip:...`` or ``timm:...`` model name."""

    family: str  # 'open_clip' or 'timm'
    arch: str  # open_clip architecture (ViT-B-32) or timm model name (resnet50, resnet50.a1_in1k)
    tag: str | None  # open_clip pretrained tag, as given
    path: str | None  # weights file given by the user
    name: str  # the name as given


def is_torch_model(name: str) -> bool:
    """Whether ``name`` names an open_clip or timm model (``open_clip:...``, ``timm:...``)."""
    return isinstance(name, str) and name.split(":", 1)[0] in FAMILIES and ":" in name


def parse(name: str) -> ModelSpec:
    """``open_clip:ARCH[:PRETRAINED|:PATH]`` or ``timm:NAME[:PATH]`` into its parts (no file is read)."""
    family, _, rest = name.partition(":")
    if family not in FAMILIES:
        raise EmbeddingError(f"unknown model family {family!r} in {name!r}; expected open_clip:ARCH or timm:NAME")
    arch, _, tail = rest.partition(":")
    arch, tail = arch.strip(), tail.strip()
    if not arch:
        example = "open_clip:ViT-B-32" if family == "open_clip" else "timm:convnext_tiny"
        raise EmbeddingError(f"model {name!r} names no architecture; e.g. {example}")
    tag = path = None
    if tail:
        if family == "timm" or _looks_like_path(tail):
            path = tail
        else:
            tag = tail
    return ModelSpec(family, arch, tag, path, name)


def _looks_like_path(text: str) -> bool:
    return ("/" in text or os.sep in text or text.lower().endswith(WEIGHT_SUFFIXES) or text.startswith("~")
            or os.path.isfile(text))


def canonical_name(name: str) -> str:
    """The name with its weights PATH made absolute, so the project's record names the file from anywhere
    (the web app, a notebook started in another folder); other names are returned as they are."""
    spec = parse(name)
    if spec.path is None:
        return name
    return f"{spec.family}:{spec.arch}:{os.path.abspath(os.path.expanduser(spec.path))}"


def has_text_tower(model_name: str | None) -> bool:
    """Whether the model has a text tower, so :func:`text_embedding` can turn a query into an image-space vector.

    True for every ``open_clip:`` model; no library is imported and no file is read.
    """
    return bool(model_name) and is_torch_model(model_name) and model_name.split(":", 1)[0] == "open_clip"


# ---------------------------------------------------------------------------------------- imports
_TV_STUBS: Any = None  # keeps the stub op library alive (a torch.library.Library unregisters when collected)


def _torchvision_importable() -> None:
    """Make ``import torchvision`` work where its compiled ops cannot load.

    pip pairs a CPU-only torch (from the CPU index, or a constraints file) with the CUDA build of
    torchvision from PyPI; that torchvision's ``_C`` extension then fails to load and its import dies
    registering fake kernels for ``torchvision::nms`` / ``qnms``, ops that do not exist. open_clip and
    timm import torchvision but raresift runs none of its compiled ops, so the two ops' schemas are
    declared (no kernels) and torchvision imports with its Python parts only.
    """
    global _TV_STUBS
    if "torchvision" in sys.modules or _TV_STUBS is not None:
        return
    try:
        with _quiet():
            import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: the caller's import names the extra
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    import torch

    for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[mod]
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    for op in ("nms", "qnms"):
        with contextlib.suppress(RuntimeError):  # already declared
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TV_STUBS = lib
    log.info("torchvision's compiled ops do not load (a CUDA torchvision beside a CPU torch?); using its Python "
             "parts only")


@contextlib.contextmanager
def _quiet():
    """No warnings (deprecations, 'Failed to load image Python extension', ...) and no library log lines
    below ERROR while third-party code runs: the command's output stays raresift's own lines."""
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def _import(family: str):
    """The open_clip or timm module, or a one-line error naming the extra."""
    module = "open_clip" if family == "open_clip" else "timm"
    what = "open_clip models" if family == "open_clip" else "timm models"
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingExtraError(what, EXTRAS[family]) from None
    try:
        _torchvision_importable()
        with _quiet():
            return __import__(module)
    except ImportError:
        raise MissingExtraError(what, EXTRAS[family]) from None
    except Exception as exc:  # a broken install
        raise EmbeddingError(f"cannot import {module}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The reason of an exception in one line: its lines joined (a state dict's error lists the keys on the
    lines after a bare heading), cut at ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "none"


@contextlib.contextmanager
def _offline():
    """Hold the Hugging Face libraries offline (environment and the already-imported constant)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    constants = sys.modules.get("huggingface_hub.constants")
    saved_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_flag


# ---------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class Weights:
    """The weights file a model name resolves to on this machine."""

    file: str
    digest: str  # first 16 hex digits of the file's SHA-256
    tag: str | None = None  # open_clip tag or timm NAME.tag the file belongs to (None: the user's file)
    cfg: dict = field(default_factory=dict, compare=False)  # open_clip's pretrained config of the tag


def weights_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of a weights file, remembered per (path, size, mtime) in the cache."""
    path = os.path.realpath(path)
    st = os.stat(path)
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    from .runtime import atomic_file, cache_dir

    book = cache_dir() / "weights-sha256.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    if not isinstance(known, dict):
        known = {}
    known[key] = digest
    known = dict(list(known.items())[-256:])  # the latest files only
    with contextlib.suppress(OSError), atomic_file(book) as tmp:  # a read-only cache only costs the hash next time
        Path(tmp).write_text(json.dumps(known))
    return digest


def _user_file(spec: ModelSpec) -> Weights:
    path = os.path.expanduser(spec.path)
    if not os.path.isfile(path):
        raise EmbeddingError(f"weights file {spec.path} of {spec.family}:{spec.arch} does not exist")
    return Weights(file=os.path.abspath(path), digest=weights_digest(path))


def _hf_cached(repo_id: str, filenames: list[str]) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # a malformed repo id or cache: treat as not cached
            continue
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _torch_hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(torch_home) / "hub" / "checkpoints"


def _safe_alternative(filename: str) -> list[str]:
    """open_clip's and timm's preference: a ``.safetensors`` twin of a ``.bin`` / ``.pth`` file first."""
    if filename in ("open_clip_pytorch_model.bin",):
        return ["open_clip_model.safetensors", filename]
    if filename == "pytorch_model.bin":
        return ["model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _open_clip_cached(cfg: dict) -> str | None:
    """The file of an open_clip pretrained config on this machine, or None (nothing is downloaded)."""
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    hub = cfg.get("hf_hub") or ""
    if hub:
        repo_id, filename = os.path.split(hub)
        found = _hf_cached(repo_id, _safe_alternative(filename or "open_clip_pytorch_model.bin"))
        if found:
            return found
    url = cfg.get("url") or ""
    if url:
        candidate = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(candidate):
            return candidate
    return None


def _no_weights(spec: ModelSpec, download: str) -> EmbeddingError:
    return EmbeddingError(
        f"no weights for {spec.family}:{spec.arch}{':' + spec.tag if spec.tag else ''} on this machine, and "
        f"raresift downloads nothing: pass a weights file as --model {spec.family}:{spec.arch}:PATH (a .pt, .bin "
        f"or .safetensors state dict), or download them once with {download} and run this again"
    )


def _resolve_open_clip(spec: ModelSpec) -> Weights:
    open_clip = _import("open_clip")
    if open_clip.get_model_config(spec.arch) is None:
        known = ", ".join(m for m in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "convnext_base_w")
                          if m in open_clip.list_models())
        raise EmbeddingError(f"unknown open_clip architecture {spec.arch!r}; e.g. {known} "
                             "(python -c \"import open_clip; print(open_clip.list_models())\" lists them)")
    if spec.path:
        return _user_file(spec)
    tags = open_clip.list_pretrained_tags_by_model(spec.arch)
    if spec.tag is not None:
        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.tag)
        if not cfg:
            raise EmbeddingError(
                f"{spec.tag!r} is neither a weights file nor a pretrained tag of open_clip {spec.arch} "
                f"(tags: {_some(tags)})")
        candidates = [spec.tag]
    else:
        candidates = list(tags)
    for tag in candidates:
        cfg = open_clip.get_pretrained_cfg(spec.arch, tag)
        found = _open_clip_cached(cfg)
        if found:
            return Weights(file=found, digest=weights_digest(found), tag=tag, cfg=dict(cfg))
    if not candidates:
        raise EmbeddingError(f"open_clip {spec.arch} has no published weights: pass a weights file as "
                             f"--model open_clip:{spec.arch}:PATH (a .pt, .bin or .safetensors state dict)")
    tag = candidates[0]
    err = _no_weights(spec, f"python -c \"import open_clip; open_clip.create_model('{spec.arch}', '{tag}'); "
                            f"open_clip.get_tokenizer('{spec.arch}')\"")
    if spec.tag is None and len(candidates) > 1:
        err = EmbeddingError(f"{err} (tags of {spec.arch}: {_some(candidates, 6)})")
    raise err


def _timm_cached(cfg: dict) -> str | None:
    if cfg.get("file") and os.path.isfile(cfg["file"]):
        return cfg["file"]
    if cfg.get("hf_hub_id"):
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else _safe_alternative("pytorch_model.bin")
        found = _hf_cached(cfg["hf_hub_id"], names)
        if found:
            return found
    if cfg.get("url"):
        candidate = _torch_hub_checkpoints() / os.path.basename(cfg["url"])
        if candidate.is_file():
            return str(candidate)
    return None


def _resolve_timm(spec: ModelSpec) -> Weights:
    timm = _import("timm")
    if not timm.is_model(spec.arch):
        raise EmbeddingError(f"unknown timm model {spec.arch!r}; e.g. timm:convnext_tiny, "
                             "timm:vit_small_patch14_dinov2 (python -c \"import timm; print(timm.list_models())\")")
    if spec.path:
        return _user_file(spec)
    try:
        cfg = timm.models.get_pretrained_cfg(spec.arch)
    except RuntimeError as exc:  # an unknown tag
        raise EmbeddingError(f"{spec.name}: {_first_line(exc)}") from None
    cfg = cfg.to_dict() if cfg is not None else {}
    found = _timm_cached(cfg)
    if found:
        return Weights(file=found, digest=weights_digest(found), tag=f"{cfg.get('architecture')}.{cfg.get('tag')}")
    if not cfg.get("hf_hub_id") and not cfg.get("url"):
        raise EmbeddingError(f"timm {spec.arch} has no published weights: pass a weights file as "
                             f"--model timm:{spec.arch}:PATH (a .pt, .bin or .safetensors state dict)")
    raise _no_weights(spec, f"python -c \"import timm; timm.create_model('{spec.arch}', pretrained=True)\"")


def resolve_weights(name: str | ModelSpec) -> Weights:
    """The weights file of a model name on this machine and its hash; an EmbeddingError of one line when there
    is none (nothing is downloaded)."""
    spec = parse(name) if isinstance(name, str) else name
    with _offline():
        return _resolve_open_clip(spec) if spec.family == "open_clip" else _resolve_timm(spec)


# ------------------------------------------------------------------------------------ building
@dataclass
class _Built:
    """A model built in PyTorch: the wrapped image model (uint8 NHWC in) and what it needs."""

    module: Any  # torch.nn.Module: uint8 (B, s, s, 3) -> (features,) or (features, logits)
    settings: dict
    net: Any = None  # the whole open_clip model (text tower too), or the timm model


def _library_version(family: str) -> str:
    module = sys.modules.get("open_clip" if family == "open_clip" else "timm")
    return f"{family} {getattr(module, '__version__', '?')}"


def _square(size, what: str) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise EmbeddingError(f"{what} takes {size[0]}x{size[-1]} inputs; only square inputs are supported")
        size = size[0]
    return int(size)


def _build_open_clip(spec: ModelSpec, weights: Weights) -> _Built:
    open_clip = _import("open_clip")
    import torch

    cfg = weights.cfg or {}
    preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    quick_gelu = bool(cfg.get("quick_gelu")) and not spec.arch.endswith("-quickgelu")
    try:
        with _offline(), _quiet():
            net = open_clip.create_model(
                spec.arch, pretrained=weights.file, pretrained_image=False, pretrained_text=False,
                force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess or None, device="cpu")
    except Exception as exc:
        raise EmbeddingError(f"cannot build {spec.name} from {weights.file}: {_first_line(exc)}") from exc
    net.eval()
    pcfg = open_clip.get_model_preprocess_cfg(net)
    size = _square(pcfg.get("size", 224), spec.name)
    mean, std = [float(v) for v in pcfg["mean"]], [float(v) for v in pcfg["std"]]

    class ImageTower(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

        def forward(self, x):
            x = (x.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
            return (self.inner.encode_image(x),)

    settings = {
        "family": "open_clip", "arch": spec.arch, "pretrained": weights.tag, "weights": weights.digest,
        "size": size, "mean": mean, "std": std, "interpolation": pcfg.get("interpolation"),
        "logits": False, "text_tower": True, "quick_gelu": quick_gelu or spec.arch.endswith("-quickgelu"),
        "library": _library_version("open_clip"), "export_version": EXPORT_VERSION,
    }
    return _Built(ImageTower(net).eval(), settings, net)


def _timm_num_classes(state: dict, classifier) -> int:
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        w = state.get(f"{name}.weight")
        if w is not None and getattr(w, "ndim", 0) == 2:
            return int(w.shape[0])
    return 0


def _build_timm(spec: ModelSpec, weights: Weights) -> _Built:
    timm = _import("timm")
    import torch

    try:
        with _offline(), _quiet():
            state = timm.models.load_state_dict(weights.file, weights_only=True)
            cfg = timm.models.get_pretrained_cfg(spec.arch)
            classifier = cfg.classifier if cfg is not None else "head"
            num_classes = _timm_num_classes(state, classifier)
            overlay = {"state_dict": state, "file": None, "url": "", "hf_hub_id": None, "source": None}
            net = timm.create_model(spec.arch, pretrained=True, num_classes=num_classes,
                                    pretrained_cfg_overlay=overlay)
    except Exception as exc:
        raise EmbeddingError(f"cannot build {spec.name} from {weights.file}: {_first_line(exc)}") from exc
    net.eval()
    for attr in ("pretrained_cfg", "default_cfg"):  # timm keeps the overlay: drop its copy of the weights
        cfg_dict = getattr(net, attr, None)
        if isinstance(cfg_dict, dict):
            cfg_dict.pop("state_dict", None)
    del state
    data = timm.data.resolve_model_data_config(net)
    size = _square(tuple(data["input_size"][1:]), spec.name)
    mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
    has_logits = getattr(net, "num_classes", 0) == 1000

    class ImageModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

        def forward(self, x):
            x = (x.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
            fmap = self.inner.forward_features(x)
            feats = self.inner.forward_head(fmap, pre_logits=True)
            if feats.ndim > 2:  # a model whose head keeps a spatial or token axis
                feats = feats.flatten(2).mean(2) if feats.ndim == 4 else feats.mean(1)
            if has_logits:
                return feats, self.inner.forward_head(fmap)
            return (feats,)

    settings = {
        "family": "timm", "arch": spec.arch, "pretrained": weights.tag, "weights": weights.digest,
        "size": size, "mean": mean, "std": std, "interpolation": data.get("interpolation"),
        "crop_pct": data.get("crop_pct"), "num_classes": int(getattr(net, "num_classes", 0)),
        "logits": has_logits, "text_tower": False,
        "library": _library_version("timm"), "export_version": EXPORT_VERSION,
    }
    return _Built(ImageModel(net).eval(), settings, net)


def _build(spec: ModelSpec, weights: Weights) -> _Built:
    return _build_open_clip(spec, weights) if spec.family == "open_clip" else _build_timm(spec, weights)


# ------------------------------------------------------------------------------------- embedders
class TorchModel:
    """Eager PyTorch: the fallback where the ONNX export does not work, and ``backend="torch"``."""

    backend = "torch"

    def __init__(self, spec: ModelSpec, built: _Built, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.name = spec.name
        self.module = built.module
        self.settings = dict(built.settings)
        self.size = int(self.settings["size"])
        self.has_logits = bool(self.settings["logits"])
        self.weights = self.settings["weights"]
        self.dim = int(self(np.zeros((1, self.size, self.size, 3), dtype=np.uint8))[0].shape[1])
        self.settings["dim"] = self.dim

    def __call__(self, batch: np.ndarray):
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8)))
        feats = out[0].to(torch.float32).numpy()
        return feats, (out[1].to(torch.float32).numpy() if self.has_logits else None)


class OnnxModel:
    """The exported image model in ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, spec: ModelSpec, path: Path, threads: int):
        from .runtime import onnx_session as _session

        self.sess = _session(path, threads)
        self.path = path
        self.name = spec.name
        meta = self.sess.get_modelmeta().custom_metadata_map
        try:
            self.settings = json.loads(meta["raresift"])
        except (KeyError, ValueError) as exc:
            raise EmbeddingError(f"{path} lacks raresift's metadata; delete it to export again") from exc
        self.size = int(self.settings["size"])
        self.has_logits = bool(self.settings["logits"])
        self.weights = self.settings["weights"]
        self.outputs = ["features", "logits"] if self.has_logits else ["features"]
        self.dim = int(self.settings["dim"])

    def __call__(self, batch: np.ndarray):
        out = self.sess.run(self.outputs, {"image": np.ascontiguousarray(batch, dtype=np.uint8)})
        return out[0], (out[1] if self.has_logits else None)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]


def onnx_path(spec: ModelSpec, weights: Weights) -> Path:
    """Where the exported ONNX file of a model lives: keyed by model, weights hash, settings and export version."""
    from .runtime import cache_dir

    family_module = _import(spec.family)
    if spec.family == "open_clip":
        arch_cfg = family_module.get_model_config(spec.arch)
        extra = {k: weights.cfg.get(k) for k in ("mean", "std", "quick_gelu") if k in weights.cfg}
    else:
        arch_cfg = None
        extra = {}
    import torch

    key = json.dumps([spec.family, spec.arch, arch_cfg, extra, _library_version(spec.family), torch.__version__],
                     sort_keys=True, default=str)
    settings_hash = hashlib.sha1(key.encode()).hexdigest()[:8]
    return cache_dir() / f"{spec.family}-{_slug(spec.arch)}-{weights.digest}-{settings_hash}-v{EXPORT_VERSION}.onnx"


def export_onnx(built: _Built, target: Path) -> Path:
    """Export the image model to ``target`` (atomically), after checking ONNX Runtime gives what PyTorch gives."""
    import onnx
    import onnxruntime as ort
    import torch

    from .runtime import atomic_file

    size = int(built.settings["size"])
    has_logits = bool(built.settings["logits"])
    outputs = ["features", "logits"] if has_logits else ["features"]
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
    with atomic_file(target) as tmp:  # a concurrent exporter never sees half a file
        # Traced with autograd on: under no_grad, nn.MultiheadAttention takes its fused fast path, an op the
        # exporter does not know. The exporter's own diagnostics (a dump of the graph) stay off the terminal.
        with _quiet(), torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(
                built.module, (torch.from_numpy(probe),), tmp, dynamo=False, opset_version=OPSET,
                input_names=["image"], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["image", *outputs]},
            )
        with torch.inference_mode():
            expected = [t.to(torch.float32).numpy() for t in built.module(torch.from_numpy(probe))]
        model = onnx.load(tmp)
        settings = dict(built.settings)
        settings["dim"] = int(expected[0].shape[1])
        onnx.helper.set_model_props(model, {"raresift": json.dumps(settings, sort_keys=True)})
        onnx.save(model, tmp)
        del model
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(tmp, sess_options=opts, providers=["CPUExecutionProvider"])
        got = sess.run(outputs, {"image": probe})
        cos = _row_cosines(got[0], expected[0])
        if cos.min() < COSINE_MIN:
            raise EmbeddingError(f"the ONNX export differs from PyTorch (cosine {cos.min():.6f})")
    return target


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, (a * b).sum(axis=1) / np.where(den > 0, den, 1), 1.0)


def load(name: str, *, backend: str = "auto", threads: int = 1):
    """An open_clip or timm image model as a raresift embedder (uint8 NHWC batch in, features [+ logits] out).

    ``backend``: ``auto`` (ONNX Runtime, exported once; eager PyTorch where that fails, with a warning),
    ``onnxruntime`` or ``torch``.
    """
    if backend not in ("auto", "onnxruntime", "torch"):
        raise EmbeddingError(f"unknown backend {backend!r}; expected auto, onnxruntime or torch")
    spec = parse(name)
    weights = resolve_weights(spec)
    built = None
    if backend in ("auto", "onnxruntime"):
        path = onnx_path(spec, weights)
        failed = path.with_name(path.name + ".failed")
        reason: str
        if path.is_file():
            try:
                return OnnxModel(spec, path, threads)
            except Exception as exc:  # a damaged cached file
                reason = _first_line(exc)
        elif failed.is_file() and backend == "auto":
            reason = f"its export failed before: {failed.read_text().strip()} (delete {failed} to try again)"
        else:
            built = _build(spec, weights)  # bad weights stop here, whatever the backend
            try:
                export_onnx(built, path)
                return OnnxModel(spec, path, threads)
            except Exception as exc:
                reason = _first_line(exc)
                if not isinstance(exc, OSError):  # remember a failing export (not a full disk)
                    with contextlib.suppress(OSError):
                        failed.write_text(reason + "\n")
        if backend == "onnxruntime":
            raise EmbeddingError(f"cannot run {spec.name} in ONNX Runtime: {reason}")
        log.warning("ONNX Runtime path of %s unavailable (%s); using eager PyTorch", spec.name, reason)
    if built is None:
        built = _build(spec, weights)
    return TorchModel(spec, built, threads)


# -------------------------------------------------------------------------------------- text tower
@functools.lru_cache(maxsize=2)
def _clip(name: str, digest: str):
    """The whole open_clip model (both towers) and its tokenizer, kept for the next query."""
    spec = parse(name)
    weights = resolve_weights(spec)
    built = _build_open_clip(spec, weights)
    open_clip = _import("open_clip")
    try:
        with _offline(), _quiet():
            tokenizer = open_clip.get_tokenizer(spec.arch)
    except Exception as exc:
        raise EmbeddingError(f"cannot load the tokenizer of {spec.name} offline: {_first_line(exc)}") from exc
    return built.net, tokenizer


def text_embedding(model_name: str, query: str, *, prompts: tuple[str, ...] | list[str] | None = None
                   ) -> np.ndarray:
    """A text query as a unit vector ``(D,)`` float32 in the image-embedding space of an open_clip model.

    Each prompt of ``prompts`` (default :data:`DEFAULT_PROMPTS`; a prompt holds ``{}`` where the query
    goes) is encoded by the text tower and L2-normalised; the mean of them is normalised again. The
    score of a photo is then the cosine of this vector and its image embeddings, the highest over its
    views (:func:`image_text_cosine`).
    """
    if not has_text_tower(model_name):
        raise EmbeddingError(f"{model_name} has no text tower; text queries need an open_clip:... model")
    query = " ".join(str(query).split())
    if not query:
        raise EmbeddingError("the text query is empty")
    prompts = tuple(prompts or DEFAULT_PROMPTS)
    if not all("{}" in p for p in prompts):
        raise EmbeddingError("each prompt must hold {} where the query goes, e.g. 'a photo of a {}.'")
    weights = resolve_weights(model_name)
    return _text_vector(model_name, weights.digest, query, prompts).copy()


@functools.lru_cache(maxsize=64)
def _text_vector(model_name: str, digest: str, query: str, prompts: tuple[str, ...]) -> np.ndarray:
    import torch

    net, tokenizer = _clip(model_name, digest)
    with torch.inference_mode():
        tokens = tokenizer([p.format(query) for p in prompts])
        emb = net.encode_text(tokens).to(torch.float32)
        emb = torch.nn.functional.normalize(emb, dim=-1).mean(0)
        emb = torch.nn.functional.normalize(emb, dim=0)
    return emb.numpy().astype(np.float32)


def image_text_cosine(vectors: np.ndarray, text: np.ndarray, *, block: int = 16384) -> np.ndarray:
    """Cosine of the text vector and each photo's image embeddings, the highest over its views.

    ``vectors`` is ``(rows, views, D)`` (a project's vectors) or ``(rows, D)``; returns ``(rows,)`` float32.
    Rows of zeros (photos not embedded) score 0; mask them as the caller needs.
    """
    t = np.asarray(text, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(t))
    if norm == 0:
        raise EmbeddingError("the text vector is zero")
    t = t / norm
    out = np.empty(vectors.shape[0], dtype=np.float32)
    for start in range(0, vectors.shape[0], block):
        b = np.asarray(vectors[start : start + block], dtype=np.float32)
        if b.ndim == 2:
            b = b[:, None, :]
        if b.shape[-1] != t.shape[0]:
            raise EmbeddingError(f"the text vector has {t.shape[0]} dimensions, the image vectors {b.shape[-1]}")
        n = np.linalg.norm(b, axis=2)
        out[start : start + len(b)] = ((b @ t) / np.where(n > 0, n, 1.0)).max(axis=1)
    return out
