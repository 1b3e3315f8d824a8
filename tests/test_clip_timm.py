"""open_clip and timm models (``open_clip:ARCH[:PRETRAINED|:PATH]``, ``timm:NAME[:PATH]``), with weights made here.

No weights can be downloaded, so each test builds a tiny model with random weights (a 2-layer ViT
open_clip config registered on the spot, timm's ``test_vit``), saves its state dict to a file and
passes that file as PATH. Skipped where open_clip / timm (extras ``raresift[clip]`` / ``raresift[timm]``)
are not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raresift import InputError, Project
from raresift.embed import torch_models as tm
from raresift.embed.models import has_text_tower, load_model, model_weights, text_embedding
from raresift.errors import EmbeddingError, RaresiftError

pytest.importorskip("torch")

TINY = "raresift-test-tiny-vit"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _family(name: str):
    """open_clip / timm through raresift's importer (which also copes with a torchvision whose compiled ops do
    not load), or skip."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed")
    try:
        return tm._import("open_clip" if name == "open_clip" else "timm")
    except RaresiftError as exc:
        pytest.skip(str(exc))


def _sha16(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _cos_rows(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Exports of these throwaway models go to a cache of their own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARESIFT_CACHE_DIR", str(tmp_path_factory.mktemp("raresift-cache")))
        yield


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(open_clip module, model name with PATH, weights file) of a tiny random CLIP."""
    open_clip = _family("open_clip")
    import torch

    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    net = open_clip.create_model(TINY)
    weights = folder / "tiny-clip.pt"
    torch.save(net.state_dict(), weights)
    return open_clip, f"open_clip:{TINY}:{weights}", weights


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """(timm module, weights file of test_vit with its 1000-class head, weights file without a head)."""
    timm = _family("timm")
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    with_head = folder / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(with_head))
    headless = folder / "test_vit-headless.pt"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), headless)
    return timm, with_head, headless


def _photos(folder: Path, n: int, size=(48, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        # PNG: the pipeline's pixels are then exactly what load_views gives (no reduced JPEG decoding)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


# --------------------------------------------------------------------------------------------- names
def test_names_parse_and_text_tower_needs_no_import():
    spec = tm.parse("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert (spec.family, spec.arch, spec.tag, spec.path) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k", None)
    spec = tm.parse("open_clip:ViT-B-32:/w/clip.safetensors")
    assert (spec.tag, spec.path) == (None, "/w/clip.safetensors")
    spec = tm.parse("open_clip:ViT-B-32:weights.bin")
    assert spec.path == "weights.bin"
    spec = tm.parse("timm:vit_small_patch14_dinov2.lvd142m:dino.pth")
    assert (spec.family, spec.arch, spec.path) == ("timm", "vit_small_patch14_dinov2.lvd142m", "dino.pth")
    assert tm.parse("timm:convnext_tiny").path is None
    with pytest.raises(EmbeddingError, match="names no architecture"):
        tm.parse("open_clip:")
    assert has_text_tower("open_clip:ViT-B-32") and not has_text_tower("timm:convnext_tiny")
    assert not has_text_tower("efficientnet-lite2") and not has_text_tower("model.onnx") and not has_text_tower(None)
    assert tm.is_torch_model("timm:resnet50") and not tm.is_torch_model("efficientnet-lite0")
    # The project records a weights file by its absolute path.
    assert tm.canonical_name("timm:resnet50:w/r50.pt") == f"timm:resnet50:{os.path.abspath('w/r50.pt')}"
    assert tm.canonical_name("open_clip:ViT-B-32:openai") == "open_clip:ViT-B-32:openai"


# ------------------------------------------------------------------------------------------ open_clip
def test_open_clip_image_tower_shapes_and_onnx_equals_eager(clip):
    open_clip, name, weights = clip
    onnx = load_model(name, threads=2)
    eager = load_model(name, backend="torch", threads=2)
    assert (onnx.backend, eager.backend) == ("onnxruntime", "torch")
    assert onnx.size == eager.size == 32 and onnx.dim == eager.dim == 32
    assert not onnx.has_logits and onnx.weights == eager.weights == _sha16(weights) == model_weights(name)
    assert onnx.path.name.startswith(f"open_clip-{TINY}-{_sha16(weights)}-") and onnx.path.name.endswith(
        f"-v{tm.EXPORT_VERSION}.onnx")
    batch = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    (f1, l1), (f2, l2) = onnx(batch), eager(batch)
    assert f1.shape == f2.shape == (5, 32) and f1.dtype == np.float32 and l1 is None and l2 is None
    assert _cos_rows(f1, f2).min() >= 0.9999
    # The same as open_clip's own image tower on pixels normalised with the model's mean and std.
    import torch

    net = open_clip.create_model(TINY, pretrained=str(weights)).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net.encode_image((torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - mean) / std).numpy()
    assert _cos_rows(f1, ref).min() >= 0.9999
    # Exported once: the next load reuses the cached file.
    mtime = onnx.path.stat().st_mtime_ns
    assert load_model(name, threads=2).path.stat().st_mtime_ns == mtime


def test_failed_export_falls_back_to_eager_with_a_warning(clip, monkeypatch, caplog, tmp_path):
    _open_clip, name, weights = clip
    monkeypatch.setenv("RARESIFT_CACHE_DIR", str(tmp_path))  # nothing exported yet

    def broken(built, target):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX is not supported")

    monkeypatch.setattr(tm, "export_onnx", broken)
    with pytest.raises(EmbeddingError, match="cannot run .* in ONNX Runtime: Exporting the operator"):
        load_model(name, backend="onnxruntime", threads=1)
    with caplog.at_level("WARNING", logger="raresift.embed.torch_models"):
        model = load_model(name, threads=1)
    assert model.backend == "torch" and "using eager PyTorch" in caplog.text
    # The failure is remembered: the next run goes straight to PyTorch, without exporting again.
    monkeypatch.setattr(tm, "export_onnx", lambda built, target: pytest.fail("exported again"))
    assert load_model(name, threads=1).backend == "torch"
    assert list(tmp_path.glob("*.onnx.failed"))


def test_text_prior_is_the_cosine_of_open_clip_text_and_image_embeddings(clip, tmp_path):
    open_clip, name, weights = clip
    import torch

    from raresift.embed.decode import Views, load_views

    images = _photos(tmp_path / "images", 4)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        project.embed(model=name, tiles=1, batch_size=2)  # whole photo + one tile: the prior is the max over views
        vectors = project.vectors()
        ids, _ = project.embeddings()  # every photo embedded: ids[i] is row i
        assert vectors.shape == (4, 2, 32)
        text = text_embedding(name, "insect or spider")
        assert text.shape == (32,) and abs(float(np.linalg.norm(text)) - 1) < 1e-5
        prior = tm.image_text_cosine(vectors, text)

    # Independently, with open_clip: its text tower over the same prompts, its image tower over the same pixels.
    net = open_clip.create_model(TINY, pretrained=str(weights)).eval()
    tokenizer = open_clip.get_tokenizer(TINY)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        t = net.encode_text(tokenizer([p.format("insect or spider") for p in tm.DEFAULT_PROMPTS]))
        t = torch.nn.functional.normalize(torch.nn.functional.normalize(t, dim=-1).mean(0), dim=0)
        assert float(t @ torch.from_numpy(text)) > 0.99999
        for row, path in enumerate(ids):
            views = load_views(images / path, Views(size=32, tiles=1, resize="crop"))
            x = (torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255 - mean) / std
            img = torch.nn.functional.normalize(net.encode_image(x), dim=-1)
            expected = float((img @ t).max())
            assert abs(float(prior[row]) - expected) < 3e-3  # vectors are stored as float16
    # Another prompt ensemble gives another vector; a prompt without {} is refused.
    assert float(text @ text_embedding(name, "insect or spider", prompts=("{}",))) < 0.99999
    with pytest.raises(EmbeddingError, match="prompt"):
        text_embedding(name, "insect", prompts=("a photo",))
    with pytest.raises(EmbeddingError, match="no text tower"):
        text_embedding("timm:test_vit", "insect")


def test_project_records_model_and_weights_and_refuses_other_weights(clip, tmp_path):
    open_clip, name, weights = clip
    import torch

    images = _photos(tmp_path / "images", 3)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        project.embed(model=name, tiles=0, limit=2)
        store = project.store
        info = project.embedding_info()
        assert (info["model"], info["dim"], info["views"], info["logits"]) == (name, 32, 1, False)
        assert store.meta("embed.weights") == _sha16(weights)
        settings = json.loads(store.meta("embed.model_settings"))
        assert settings["family"] == "open_clip" and settings["arch"] == TINY and settings["size"] == 32
        assert settings["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
        assert settings["weights"] == _sha16(weights) and settings["text_tower"] is True
        assert project.imagenet_logits() is None

        # Other weights under the very same name (the file replaced): refused, in one line.
        saved = weights.read_bytes()
        try:
            torch.manual_seed(1)
            torch.save(open_clip.create_model(TINY).state_dict(), weights)
            with pytest.raises(InputError) as err:
                project.embed(model=name, tiles=0)
            msg = str(err.value)
            assert "\n" not in msg and f"weights={hashlib.sha256(saved).hexdigest()[:16]}" in msg
            assert f"these weights are {_sha16(weights)}" in msg and "--reembed" in msg
            assert project.status()["embedded"] == 2  # nothing changed
            report = project.embed(model=name, tiles=0, reembed=True)
            assert report.embedded == 3 and store.meta("embed.weights") == _sha16(weights)
        finally:
            weights.write_bytes(saved)


# ----------------------------------------------------------------------------------------------- timm
def test_timm_features_are_pooled_pre_logits_and_the_imagenet_head_gives_logits(timm_file):
    timm, with_head, headless = timm_file
    import torch

    name = f"timm:test_vit:{with_head}"
    onnx = load_model(name, threads=2)
    eager = load_model(name, backend="torch", threads=2)
    assert onnx.backend == "onnxruntime" and onnx.has_logits and eager.has_logits
    assert onnx.size == 160 and onnx.dim == 64 and onnx.weights == _sha16(with_head)
    batch = np.random.default_rng(1).integers(0, 256, (3, 160, 160, 3), dtype=np.uint8)
    (f1, l1), (f2, l2) = onnx(batch), eager(batch)
    assert f1.shape == (3, 64) and l1.shape == (3, 1000)
    assert _cos_rows(f1, f2).min() >= 0.9999 and _cos_rows(l1, l2).min() >= 0.9999
    net = timm.create_model("test_vit", pretrained=True, pretrained_cfg_overlay={"file": str(with_head)}).eval()
    x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # test_vit's mean and std
    with torch.no_grad():
        fmap = net.forward_features(x)
        ref_f, ref_l = net.forward_head(fmap, pre_logits=True).numpy(), net(x).numpy()
    assert _cos_rows(f1, ref_f).min() >= 0.9999 and _cos_rows(l1, ref_l).min() >= 0.9999

    # Without a 1000-class head (DINOv2-like): features only.
    bare = load_model(f"timm:test_vit:{headless}", backend="torch", threads=2)
    feats, logits = bare(batch)
    assert not bare.has_logits and logits is None and feats.shape == (3, 64)


# -------------------------------------------------------------------------------- no weights: one line
def test_no_weights_is_one_line_and_nothing_is_downloaded(monkeypatch, tmp_path):
    _family("open_clip")
    import urllib.request

    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_network)
    with pytest.raises(EmbeddingError) as err:
        load_model("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert str(err.value) == (
        "no weights for open_clip:ViT-B-32:laion2b_s34b_b79k on this machine, and raresift downloads nothing: pass a "
        "weights file as --model open_clip:ViT-B-32:PATH (a .pt, .bin or .safetensors state dict), or download them "
        "once with python -c \"import open_clip; open_clip.create_model('ViT-B-32', 'laion2b_s34b_b79k'); "
        "open_clip.get_tokenizer('ViT-B-32')\" and run this again")
    with pytest.raises(EmbeddingError, match="neither a weights file nor a pretrained tag"):
        load_model("open_clip:ViT-B-32:no_such_tag")
    with pytest.raises(EmbeddingError, match="unknown open_clip architecture"):
        load_model("open_clip:No-Such-Arch")
    with pytest.raises(EmbeddingError, match="does not exist"):
        load_model(f"open_clip:ViT-B-32:{tmp_path / 'missing.pt'}")

    # A file in the Hugging Face cache is found, offline, without any download.
    snap = tmp_path / "hf" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"not really weights")
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    found = tm.resolve_weights("open_clip:ViT-B-32")  # no tag: the first tag found on this machine
    assert found.tag == "laion2b_s34b_b79k" and found.file == str(snap / "open_clip_model.safetensors")
    assert found.digest == _sha16(snap / "open_clip_model.safetensors")


def test_timm_weights_from_the_local_cache(timm_file, monkeypatch, tmp_path):
    timm, with_head, _ = timm_file
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(EmbeddingError, match=r"^no weights for timm:test_vit on this machine, and raresift downloads"):
        tm.resolve_weights("timm:test_vit")
    snap = tmp_path / "hf" / "models--timm--test_vit.r160_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(with_head.read_bytes())
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc")
    model = load_model("timm:test_vit", backend="torch", threads=1)
    assert model.has_logits and model.weights == _sha16(with_head)
    assert model.settings["pretrained"] == "test_vit.r160_in1k"


def _no_weights_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1",
           "XDG_CACHE_HOME": str(home / "cache"), "TORCH_HOME": str(home / "torch"),
           "RARESIFT_CACHE_DIR": str(home / "raresift")}
    env.pop("HF_HUB_CACHE", None)
    return env


def _assert_one_line_no_weights(model: str, rc: int, stdout: str, stderr: str, download: str) -> None:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and stdout == "" and "Traceback" not in stderr, stderr
    assert lines[0] == (
        f"raresift embed: error: no weights for {model} on this machine, and raresift downloads nothing: pass a "
        f"weights file as --model {model}:PATH (a .pt, .bin or .safetensors state dict), or download them once with "
        f"{download} and run this again" + (" (tags of ViT-B-32: openai, laion400m_e31, laion400m_e32, laion2b_e16, "
                                            "laion2b_s34b_b79k, datacomp_xl_s13b_b90k, ...)" if "open_clip" in model
                                            else ""))


def test_cli_without_weights_exits_with_one_line(tmp_path):
    """`raresift embed P --model open_clip:ViT-B-32` with no weights on the machine, in a fresh process."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed")
    images = _photos(tmp_path / "images", 2)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
    run = subprocess.run([sys.executable, "-m", "raresift", "embed", str(tmp_path / "p"), "--model",
                          "open_clip:ViT-B-32"], env=_no_weights_env(tmp_path / "home"), capture_output=True,
                         text=True, timeout=300)
    _assert_one_line_no_weights("open_clip:ViT-B-32", run.returncode, run.stdout, run.stderr,
                                "python -c \"import open_clip; open_clip.create_model('ViT-B-32', 'openai'); "
                                "open_clip.get_tokenizer('ViT-B-32')\"")
    with Project.open(tmp_path / "p") as project:
        assert project.embedding_info() is None and project.status()["embedded"] == 0


def test_cli_without_timm_weights_exits_with_one_line(timm_file, tmp_path, monkeypatch, capsys):
    """The same for `--model timm:resnet10t`, in this process (timm is imported already: no second start-up)."""
    import huggingface_hub.constants

    from raresift.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for key, value in _no_weights_env(tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    images = _photos(tmp_path / "images", 2)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
    capsys.readouterr()
    rc = main(["embed", str(tmp_path / "p"), "--model", "timm:resnet10t"])
    out = capsys.readouterr()
    _assert_one_line_no_weights("timm:resnet10t", rc, out.out, out.err,
                                "python -c \"import timm; timm.create_model('resnet10t', pretrained=True)\"")
    with Project.open(tmp_path / "p") as project:
        assert project.embedding_info() is None


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(RaresiftError, match=r"^open_clip models needs the optional extra: pip install 'raresift\[clip\]'$"):
        load_model("open_clip:ViT-B-32")
    with pytest.raises(RaresiftError, match=r"^timm models needs the optional extra: pip install 'raresift\[timm\]'$"):
        load_model("timm:convnext_tiny")


def test_a_next_round_on_an_open_clip_project_starts_from_any_words(clip, tmp_path):
    _open_clip, name, _weights = clip
    images = _photos(tmp_path / "images", 12)
    with Project.create(tmp_path / "p", images=images) as project:
        project.add_images()
        project.embed(model=name, tiles=0, batch_size=4)
        # words no ImageNet concept knows: the text tower embeds them
        batch = project.next(4, query="a handwritten shopping list", seed=0)
        assert [b["strategy"] for b in batch] == ["coldstart-text"] * 4
        text = text_embedding(name, "a handwritten shopping list")
        cos = tm.image_text_cosine(project.vectors(), text)
        pool = np.flatnonzero(project.splits() == "pool")
        best = pool[np.argsort(-cos[pool], kind="stable")[:4]] + 1
        assert sorted(b["image_id"] for b in batch) == sorted(best.tolist())
        with pytest.raises(InputError, match="empty"):
            project.next(2, query="  ")
