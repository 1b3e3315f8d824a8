"""The EfficientNet-Lite ONNX graphs built from the weight files without PyTorch (raresift.embed.lite_onnx)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from raresift import EmbeddingError
from raresift.embed import lite_onnx
from raresift.embed.decode import Views, load_views
from raresift.embed import models
from raresift.embed.models import BUILTIN_MODELS

from conftest import FLOWERS

MODELS = ["efficientnet-lite0", "efficientnet-lite2"]
CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _skimage_photo(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def _photos() -> list[Path]:
    """The scikit-image sample photos, plus a spread of real flower photos where the data set is present."""
    photos = [_skimage_photo(n) for n in ("chelsea.png", "coffee.png", "astronaut.png")]
    if FLOWERS.is_dir():
        for sub in ("daisy", "dandelion"):
            files = sorted((FLOWERS / sub).glob("*.jpg"))
            photos += files[:: max(1, len(files) // 3)][:3]
    return photos


def _batch(size: int) -> np.ndarray:
    return np.concatenate([load_views(p, Views(size, 0, "crop")) for p in _photos()])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module", params=MODELS)
def built(request, tmp_path_factory):
    """(name, session) of the graph built with all three outputs."""
    import onnxruntime as ort

    name = request.param
    path = lite_onnx.export_builtin(name, tmp_path_factory.mktemp("lite") / f"{name}.onnx", feature_map=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return name, ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# --- reading .pth without torch ---------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_weights_read_without_torch_equal_torch_load(name):
    torch = pytest.importorskip("torch")
    path = lite_onnx.weights_file(name)
    ours = lite_onnx.read_torch_weights(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref)
    for key, tensor in ref.items():
        expected = tensor.numpy()
        assert ours[key].dtype == expected.dtype and ours[key].shape == expected.shape, key
        assert np.array_equal(ours[key], expected), key


def test_zip_format_with_views_and_strides(tmp_path):
    """``torch.save``'s zip format, shared storages, offsets, non-contiguous and 0-d tensors."""
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "w": base,
        "t": base.t(),  # strided view of the same storage
        "row": base[2],  # offset into it
        "h": torch.tensor([1.5, -2.0], dtype=torch.float16),
        "n": torch.tensor(7),  # 0-d int64
        "b": torch.tensor([True, False]),
    }
    path = tmp_path / "state.pth"
    torch.save(state, path)
    ours = lite_onnx.read_torch_weights(path)
    for key, tensor in state.items():
        assert ours[key].dtype == tensor.numpy().dtype and np.array_equal(ours[key], tensor.numpy()), key


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    payload = pickle.dumps({"w": _Evil()}, protocol=2)
    legacy = tmp_path / "legacy.pth"
    with open(legacy, "wb") as fh:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, fh, protocol=2)
        fh.write(payload)
    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    for path in (legacy, zipped):
        with pytest.raises(lite_onnx.WeightsFileError, match=r"refusing to load (posix|nt|os)\.system"):
            lite_onnx.read_torch_weights(path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(lite_onnx.WeightsFileError, match="not a readable PyTorch weights file"):
        lite_onnx.read_torch_weights(junk)


def test_weights_that_do_not_fit_are_reported():
    state = lite_onnx.read_torch_weights(lite_onnx.weights_file("efficientnet-lite0"))
    with pytest.raises(lite_onnx.BuildError, match=r"_blocks\.\d+\._depthwise_conv\.weight has shape"):
        lite_onnx.build_model(state, "efficientnet-lite2")  # Lite2's later blocks are wider
    state["_extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(lite_onnx.BuildError, match="does not use: _extra.weight"):
        lite_onnx.build_model(state, "efficientnet-lite0")


# --- the built graph ----------------------------------------------------------------------------


def test_graph_matches_eager_pytorch_on_real_photos(built):
    torch = pytest.importorskip("torch")
    from raresift.embed.models import _torch_module

    name, sess = built
    x = _batch(BUILTIN_MODELS[name].size)
    feats, logits, fmap = sess.run(None, {"image": x})
    module, _ = _torch_module(name)
    torch.set_num_threads(2)
    with torch.inference_mode():
        t = (torch.from_numpy(x).permute(0, 3, 1, 2).float() - 127.0) / 128.0
        ref_map = module.inner.extract_features(t)
        ref_feats = ref_map.mean((2, 3))
        ref_logits = module.inner._fc(ref_feats)
    assert feats.shape == (len(x), 1280) and logits.shape == (len(x), 1000)
    assert fmap.shape == tuple(ref_map.shape) and fmap.shape[:2] == (len(x), 1280)
    for ours, ref in ((feats, ref_feats), (logits, ref_logits), (fmap, ref_map)):
        cos = _cosines(ours, ref.numpy())
        assert cos.min() >= 0.9999, cos
    np.testing.assert_allclose(feats, fmap.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)


def test_chelsea_is_a_cat(built):
    name, sess = built
    x = load_views(_skimage_photo("chelsea.png"), Views(BUILTIN_MODELS[name].size, 0, "crop"))
    _feats, logits, _fmap = sess.run(None, {"image": x})
    assert int(logits[0].argmax()) in CATS


def test_default_graph_has_two_outputs_and_a_dynamic_batch(tmp_path):
    import onnx

    path = lite_onnx.export_builtin("efficientnet-lite0", tmp_path / "lite0.onnx")
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["features", "logits"]
    (image,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims == ["batch", 224, 224, 3]
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8


_NO_TORCH = r"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import numpy as np
from PIL import Image
from raresift import EmbeddingError
from raresift.embed.models import load_model
import skimage, pathlib

m = load_model("efficientnet-lite0", backend="onnxruntime", threads=2)
im = Image.open(pathlib.Path(skimage.__file__).parent / "data" / "chelsea.png").convert("RGB").resize((224, 224))
feats, logits = m(np.asarray(im)[None])
assert feats.shape == (1, 1280) and 281 <= int(logits[0].argmax()) <= 285, int(logits[0].argmax())
try:
    load_model("efficientnet-lite0", backend="torch")
except EmbeddingError as exc:
    print("torch backend:", exc)
assert sys.modules["torch"] is None
loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "torchvision", "efficientnet_lite_pytorch") and sys.modules[k] is not None)
assert not loaded, loaded
print("ok")
"""


def test_build_and_run_without_torch(tmp_path):
    env = {**os.environ, "RARESIFT_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _NO_TORCH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines == ["torch backend: the torch backend needs PyTorch: pip install 'raresift[torch]'", "ok"]
    (built_file,) = (tmp_path / "cache").glob("efficientnet-lite0-*.onnx")
    assert built_file.name.endswith(f"-v{models._EXPORT_VERSION}.onnx")


def test_exported_onnx_path_is_cached_and_feature_map_is_separate(tmp_path, monkeypatch):
    monkeypatch.setenv("RARESIFT_CACHE_DIR", str(tmp_path))
    first = models.exported_onnx_path("efficientnet-lite0")
    mtime = first.stat().st_mtime_ns
    assert models.exported_onnx_path("efficientnet-lite0") == first and first.stat().st_mtime_ns == mtime
    fmap = models.exported_onnx_path("efficientnet-lite0", feature_map=True)
    assert fmap != first and fmap.name.endswith("-fmap.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, fmap.name])  # no temporary left


def test_unknown_names_are_embedding_errors():
    with pytest.raises(EmbeddingError, match="unknown built-in model"):
        lite_onnx.weights_file("efficientnet-b9")
    with pytest.raises(lite_onnx.BuildError, match="unknown EfficientNet-Lite variant"):
        lite_onnx.build_model({}, "efficientnet-b9")
