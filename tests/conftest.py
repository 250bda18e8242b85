"""Shared fixtures: a tiny model trained and exported once per session, and a real cloud process on loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from splitleak.core import data

SHARED = data.data_root()
EXPORTED_SPLITS = ("layer1", "layer2")  # attacked_model_dir's decoders: the default split, and one to switch to
needs_shared = pytest.mark.skipif(
    SHARED is None or not (SHARED / "cifar10" / "test.npz").exists(),
    reason="../shared/datasets (or $SPLITLEAK_DATA) with cifar10 is not here",
)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Tests train and export into a cache of their own, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["SPLITLEAK_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(isolated_cache) -> dict:
    """ResNet-20 trained for 2 epochs on 2,000 CIFAR-10 images: about 15 s, well above chance."""
    if SHARED is None:
        pytest.skip("needs ../shared/datasets")
    from splitleak.model.train import TrainConfig, train

    return train(TrainConfig(model="resnet20", dataset="cifar10", epochs=2, limit=2000, lr=0.1), progress=False)


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
def attacked_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a decoder for two of its split points, exported by `splitleak attacker train-decoder`."""
    from splitleak import cli

    out = tmp_path_factory.mktemp("attacked") / "resnet20-cifar10"
    shutil.copytree(tiny_model_dir, out)
    splits = [arg for split in EXPORTED_SPLITS for arg in ("--split", split)]
    knobs = ["--aux-limit", "500", "--epochs", "2", "--width", "32", "--lr", "3e-3", "--held-out", "100"]
    assert cli.main(["attacker", "train-decoder", "--model-dir", str(out), *splits, *knobs]) == 0
    return out
