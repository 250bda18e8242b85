"""Shared fixtures: a tiny model trained and exported once per session, and a real cloud process on loopback.

Every test reads its data from the small sample committed in tests/data (see its SOURCE.md), never from ../shared or
the user's $SPLITLEAK_DATA, so that a fresh clone, CI and a laptop run the same tests on the same images. Set here,
before any test module is imported, and inherited by every process a test starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parent / "data"
os.environ["SPLITLEAK_DATA"] = str(SAMPLE)

EXPORTED_SPLITS = ("layer1", "layer2")  # attacked_model_dir's decoders: the default split, and one to switch to
TINY_TRAIN_IMAGES = 1000  # the sample's whole CIFAR-10 train split; tiny_checkpoint and its fine-tunings train on it


def pytest_collection_modifyitems(items) -> None:
    """A test that needs tiny_checkpoint (directly or through tiny_model_dir, cloud, attacked_model_dir: fixturenames
    holds them all) waits for training, so it is slow by definition; the quick loop (-m "not slow") must never train,
    so such a test without the slow marker is an error at collection."""
    unmarked = [
        item.nodeid
        for item in items
        if "tiny_checkpoint" in item.fixturenames and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "these wait for the tiny model to train: mark them @pytest.mark.slow, or use shipped_model_dir and "
            "shipped_cloud:\n" + "\n".join(unmarked)
        )


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Tests train and export into a cache of their own, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPLITLEAK_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(isolated_cache) -> dict:
    """ResNet-20 trained for 4 epochs on the sample's 1,000 CIFAR-10 images: about 10 s, about a third accurate.

    Four epochs of 1,000 are as many steps as the two of 2,000 the suite trained on before the sample; with two, the
    data-free attack's inverse did as well trained on noise as on the images it synthesises from the head
    (test_attacks_datafree_shadow), so its test could not tell the two apart."""
    from splitleak.model.train import TrainConfig, train

    config = TrainConfig(model="resnet20", dataset="cifar10", epochs=4, limit=TINY_TRAIN_IMAGES, lr=0.1)
    return train(config, progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    from splitleak.model.export import export_checkpoint

    out = tmp_path_factory.mktemp("tiny-resnet20")
    export_checkpoint(tiny_checkpoint, out)
    return out


@pytest.fixture
def cloud(tiny_model_dir):
    """A real `splitleak cloud` process serving the tiny model; yields its port."""
    from splitleak.core.process import start_cloud, stop

    proc, port = start_cloud([tiny_model_dir])
    yield port
    stop(proc)


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    """The model that ships in splitleak/models (the same ResNet-20 architecture and split points as the tiny one),
    for tests that need an exported model but not one trained by this session's code."""
    from splitleak.core import manifest

    return manifest.DEFAULT_MODEL_DIR


@pytest.fixture(scope="module")
def shipped_cloud(shipped_model_dir):
    """A real `splitleak cloud` process serving the shipped model, one per test module; yields its port."""
    from splitleak.core.process import start_cloud, stop

    proc, port = start_cloud([shipped_model_dir])
    yield port
    stop(proc)


@pytest.fixture(scope="session")
def attacked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a decoder for two of its split points, exported by `splitleak attacker train-decoder`."""
    from splitleak import cli

    out = tmp_path_factory.mktemp("attacked") / "resnet20-cifar10"
    shutil.copytree(tiny_model_dir, out)
    splits = [arg for split in EXPORTED_SPLITS for arg in ("--split", split)]
    knobs = ["--aux-limit", "500", "--epochs", "2", "--width", "32", "--lr", "3e-3", "--held-out", "100"]
    assert cli.main(["attacker", "train-decoder", "--model-dir", str(out), *splits, *knobs]) == 0
    return out
