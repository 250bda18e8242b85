"""Data sets load by name as numpy arrays; the embedded ones need neither network nor data root."""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import SAMPLE
from PIL import Image

from splitleak.core import data, manifest


def test_embedded_photos_and_faces_load_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITLEAK_DATA", str(tmp_path / "nowhere"))
    photos = data.load("embedded")
    assert photos.images.shape == (45, 32, 32, 3) and photos.images.dtype == np.uint8
    assert photos.classes[photos.labels[0]] == "cat"  # scikit-image's chelsea
    faces = data.load("embedded-faces")
    assert faces.images.shape == (200, 25, 25, 1) and set(faces.labels) == {0, 1}
    assert data.default_dataset() == "embedded"


def test_npz_sets_load_by_name_from_the_data_root_with_their_classes():
    cifar = data.load("cifar10", "test")  # the suite's sample (tests/data): 40 of each class
    assert cifar.images.shape == (400, 32, 32, 3) and cifar.images.dtype == np.uint8
    assert cifar.classes[0] == "airplane" and np.bincount(cifar.labels).tolist() == [40] * 10
    assert data.load("mnist", "test").images.shape == (200, 28, 28, 1)
    faces = data.load("att_faces", "train")
    assert faces.images.shape == (280, 112, 92, 1) and len(faces.classes) == 40 and faces.classes[0] == "s1"


def test_the_committed_sample_is_what_its_source_md_lists():
    # tests/data/SOURCE.md says where each file came from and how it was drawn; a file changed without it is caught.
    listed = dict(re.findall(r"^- `(\w+/\w+\.npz)`: `([0-9a-f]{64})`$", (SAMPLE / "SOURCE.md").read_text(), re.M))
    files = sorted(SAMPLE.rglob("*.npz"))
    found = {p.relative_to(SAMPLE).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert found == listed
    assert sum((SAMPLE / path).stat().st_size for path in found) < 10e6  # small enough to commit


def test_an_image_folder_loads_one_class_per_sub_folder(tmp_path):
    for cls, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 40), colour).save(tmp_path / cls / f"{i}.png")
    ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.classes == ("blue", "red") and ds.images.shape == (6, 40, 40, 3)
    assert (ds.images[ds.labels == 1][..., 0] == 255).all()


def test_a_missing_data_set_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLITLEAK_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="set SPLITLEAK_DATA"):
        data.load("cifar100")


def test_resize_crops_to_a_square_and_converts_channels():
    images = np.zeros((2, 40, 60, 3), np.uint8)
    images[:, :, 10:50] = 200  # the centre square
    out = data.resize(images, 16, 1)
    assert out.shape == (2, 16, 16, 1) and (out == 200).all()


@pytest.mark.slow
def test_train_and_export_from_the_command_line_on_greyscale_digits(tmp_path):
    run = [sys.executable, "-m", "splitleak.cli"]
    trained = subprocess.run(
        [*run, "train", "--model", "resnet20", "--dataset", "mnist", "--epochs", "1", "--limit", "600", "--no-flip"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr
    assert "resnet20 on mnist: test accuracy" in trained.stdout
    exported = subprocess.run(
        [*run, "export", "--model", "resnet20", "--dataset", "mnist", "--limit", "600", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    m = manifest.load(tmp_path)
    assert (
        m.input_shape == (1, 28, 28)
        and m.classes[0].startswith("0")
        and list(m.splits) == ["stem", "layer1", "layer2", "layer3"]
    )


def test_labels_map_to_a_models_classes_by_name_whatever_their_order():
    ds = data.Dataset("toy", np.zeros((4, 2, 2, 3), np.uint8), np.array([0, 1, 2, -1]), ("cat", "dog", "zebra"))
    labels, unmapped = ds.labels_as(("dog", "bird", "cat"))
    assert labels.tolist() == [2, 0, -1, -1]
    assert unmapped == ["zebra"]


def test_the_device_labels_an_image_folder_by_class_name_and_warns_of_the_rest(shipped_cloud, tmp_path):
    # Sub-folders sort as "cat", "ship", "zebra": not the model's order, and "zebra" is not a CIFAR-10 class at all.
    test = data.load("cifar10", "test")
    for name in ("ship", "cat"):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i, image in enumerate(test.images[test.labels == test.classes.index(name)][:3]):
            Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / "photos" / "zebra").mkdir()
    Image.fromarray(test.images[0]).save(tmp_path / "photos" / "zebra" / "0.png")
    out = tmp_path / "run.json"
    done = subprocess.run(
        [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{shipped_cloud}"]
        + ["--dataset", f"imagefolder:{tmp_path / 'photos'}", "--limit", "7", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "classes zebra are not resnet20-cifar10's" in done.stderr
    frames = json.loads(out.read_text())["frames"]
    cifar = list(test.classes)
    labels = sorted(f["label"] for f in frames)
    assert labels == sorted([-1] + [cifar.index("cat")] * 3 + [cifar.index("ship")] * 3)


def test_frame_ids_name_test_images_first_then_train_images_and_a_mix_draws_half_of_each():
    test, train = data.load("cifar10", "test"), data.load("cifar10", "train")
    ids = data.frame_ids("cifar10", "train", [0, 7])
    assert ids.tolist() == [len(test), len(test) + 7]
    got = data.frames("cifar10", np.r_[3, ids])
    np.testing.assert_array_equal(got.images, np.stack([test.images[3], train.images[0], train.images[7]]))
    assert got.labels.tolist() == [test.labels[3], train.labels[0], train.labels[7]]
    mix = data.draw_frames("cifar10", "mix", 101, seed=4)
    assert len(set(mix.tolist())) == 101 and data.is_train_frame("cifar10", mix).sum() == 50
    assert data.is_train_frame("cifar10", mix[:20]).any() and not data.is_train_frame("cifar10", mix[:20]).all()
    assert data.draw_frames("cifar10", "mix", 101, seed=4).tolist() == mix.tolist()  # --seed draws the same frames
    assert data.is_train_frame("cifar10", data.draw_frames("cifar10", "train", 30)).all()
    # The test frames are drawn as the device drew them before it could stream training images.
    assert data.draw_frames("cifar10", "test", 30).tolist() == np.random.default_rng(0).permutation(400)[:30].tolist()


def test_a_frame_id_past_both_splits_or_a_train_frame_of_a_set_without_one_is_refused():
    with pytest.raises(ValueError, match=r"name no image of cifar10: its ids run from 0 to 1399 \(400 test"):
        data.frames("cifar10", np.array([5, 1400]))
    with pytest.raises(ValueError, match="embedded has no train split"):
        data.draw_frames("embedded", "mix", 10)


def test_the_device_refuses_training_frames_from_a_set_that_has_none_before_it_connects(capsys):
    from splitleak import cli

    assert cli.main(["device", "--dataset", "embedded", "--frames", "mix", "--cloud", "127.0.0.1:9"]) == 2
    assert "embedded has no train split apart from its test split" in capsys.readouterr().err
