"""The data-free (DCI) and query-free (shadow head) attacks invert real activations of a real tiny model.

Measured on the tiny ResNet-20 of conftest (4 epochs on the sample's 1,000 CIFAR-10 images), split at the stem, 64
test frames of the sample; each floor sits between what the attack gets and what it gets when its distinctive step
does nothing:

- datafree with the knobs below: 20.9 to 21.4 dB from run to run, SSIM ~0.82; its inverse trained on uniform noise
  instead of images synthesised from the head's batch-norm statistics (one synthesis step): ~19.8 dB, ~0.81, so on
  this model only the PSNR floor separates them; the data set's mean colour: ~12 dB, ~0.13.
- shadow on 500 auxiliary images for 4 epochs: ~19.9 dB, SSIM ~0.78; rMLE against an untrained shadow head, which
  still finds where the edges are: ~17.0 dB, ~0.67.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from splitleak import cli
from splitleak.attacker import live
from splitleak.attacker.attacks import build
from splitleak.attacker.attacks.base import query, session
from splitleak.attacker.attacks.datafree import blocks_of
from splitleak.attacker.scoring import psnr, ssim
from splitleak.core import data, defences, manifest
from splitleak.model import export, zoo


@pytest.fixture(scope="module")
def victim() -> np.ndarray:
    """64 CIFAR-10 test frames, drawn at random as the device draws them."""
    test = data.load("cifar10", "test")
    return test.images[np.random.default_rng(0).permutation(len(test))[:64]]


@pytest.fixture(scope="module")
def model_dir_with_batch_norm(tiny_model_dir):
    """The tiny model as `splitleak export` writes it: without constant folding, so its heads keep the
    BatchNormalization nodes whose statistics the data-free attack reads (splitleak.model.export.export_onnx)."""
    return tiny_model_dir


def intercept(model_dir, split: str, images: np.ndarray) -> np.ndarray:
    m = manifest.load(model_dir)
    return query(session(m.split(split).head), m, images)


@pytest.mark.slow
def test_datafree_cuts_a_resnet_head_into_its_residual_blocks_and_chains_them_back(model_dir_with_batch_norm):
    import onnx2torch

    head = onnx2torch.convert(str(manifest.load(model_dir_with_batch_norm).split("layer2").head)).eval()
    x = torch.randn(2, 3, 32, 32)

    blocks = blocks_of(head)

    assert len(blocks) == 1 + 3 + 3  # the stem, then layer1's and layer2's basic blocks
    chained = x
    for block in blocks:
        chained = block(chained)
    torch.testing.assert_close(chained, head(x))


@pytest.mark.slow
def test_datafree_at_the_stem_reconstructs_test_frames_from_no_data_at_all(model_dir_with_batch_norm, victim):
    m = manifest.load(model_dir_with_batch_norm)
    knobs = dict(manifest=m, split="stem", synthetic_images=64, synthesis_steps=100, epochs=30, width=32)
    activations = intercept(model_dir_with_batch_norm, "stem", victim)

    reconstructions = build("datafree", **knobs).invert(activations)

    assert reconstructions.shape == (64, 32, 32, 3) and reconstructions.dtype == np.float32
    assert np.mean(psnr(victim, reconstructions)) > 20.4
    assert np.mean(ssim(victim, reconstructions)) > 0.78
    start = time.perf_counter()
    again = build("datafree", **knobs)  # trained inverses come back from the cache
    assert time.perf_counter() - start < 5
    np.testing.assert_array_equal(again.invert(activations), reconstructions)


@pytest.mark.slow
def test_datafree_exported_for_the_live_attacker_inverts_as_it_does_in_torch(
    model_dir_with_batch_norm, victim, tmp_path
):
    """`splitleak attacker train-decoder --attack datafree` exports the chained inverses as one ONNX file, which the
    live attacker runs with ONNX Runtime, several times faster than PyTorch (bench/bench_attacks.py)."""
    m = manifest.load(model_dir_with_batch_norm)
    knobs = dict(synthetic_images=64, synthesis_steps=100, epochs=30, width=32)  # the test above's: from the cache
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in knobs.items()]
    export = ["attacker", "train-decoder", "--model-dir", str(model_dir_with_batch_norm), "--attack", "datafree"]
    assert cli.main([*export, "--split", "stem", "--held-out", "8", "--out", str(tmp_path), *flags]) == 0
    activations = intercept(model_dir_with_batch_norm, "stem", victim)

    exported = live.load_attacks(m, tmp_path)["datafree"]["stem"]

    expected = build("datafree", manifest=m, split="stem", **knobs).invert(activations)
    np.testing.assert_allclose(exported.invert(activations), expected, atol=1e-4)
    assert float(exported.metadata["psnr"]) > 20


def test_datafree_refuses_a_head_without_batch_norm(tmp_path):
    model = zoo.build("hecnn")
    export.export(
        model,
        tmp_path,
        name="hecnn-untrained",
        model_name="hecnn",
        dataset="cifar10",
        classes=[str(i) for i in range(10)],
        input_shape=(3, 32, 32),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        split_points=("conv11",),
        default_split="conv11",
    )

    with pytest.raises(ValueError, match="no BatchNormalization nodes"):
        build("datafree", manifest=manifest.load(tmp_path), split="conv11")


@pytest.fixture(scope="module")
def auxiliary() -> tuple[np.ndarray, np.ndarray]:
    train = data.load("cifar10", "train")
    indices = np.random.default_rng(1).permutation(len(train))[:500]
    return train.images[indices], train.labels[indices]


@pytest.mark.slow
def test_shadow_at_the_stem_beats_rmle_against_an_untrained_shadow_head(tiny_model_dir, victim, auxiliary):
    images, labels = auxiliary
    m = manifest.load(tiny_model_dir)
    attack = build("shadow", manifest=m, split="stem", auxiliary=images, auxiliary_labels=labels, epochs=4, steps=200)

    reconstructions = attack.invert(intercept(tiny_model_dir, "stem", victim))

    assert reconstructions.shape == (64, 32, 32, 3) and reconstructions.dtype == np.float32
    assert np.mean(psnr(victim, reconstructions)) > 18.5
    assert np.mean(ssim(victim, reconstructions)) > 0.71


def test_shadow_refuses_auxiliary_images_without_a_label_each(shipped_model_dir, auxiliary):
    images, labels = auxiliary
    with pytest.raises(ValueError, match="auxiliary_labels"):
        build(
            "shadow",
            manifest=manifest.load(shipped_model_dir),
            split="stem",
            auxiliary=images,
            auxiliary_labels=labels[:-1],
        )


@pytest.mark.slow
def test_datafree_that_knows_the_noise_beats_datafree_that_does_not(model_dir_with_batch_norm, victim):
    m = manifest.load(model_dir_with_batch_norm)
    knobs = dict(manifest=m, split="stem", synthetic_images=64, synthesis_steps=100, epochs=30, width=32)
    noise = defences.build("gaussian", strength=2.0, split=m.split("stem"))
    tensors, _ = noise.apply(intercept(model_dir_with_batch_norm, "stem", victim), np.random.default_rng(5))

    plain = build("datafree", **knobs).invert(tensors["activation"])
    aware = build("datafree", **knobs, defence="gaussian", strength=2.0).invert(tensors["activation"])

    assert np.mean(psnr(victim, aware)) > np.mean(psnr(victim, plain)) + 1
