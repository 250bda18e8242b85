"""Scores against reference computations, on random images and on the real tiny model and real faces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.image import imread
from scipy.ndimage import uniform_filter

from splitleak.attacker import scoring
from splitleak.core import data, manifest
from splitleak.model.checkpoint import load_model, to_tensor


def reference_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004), Eq. 13, as scikit-image computes it by default: 7x7 uniform windows, sample covariances,
    C1 = (0.01 L)^2 and C2 = (0.03 L)^2 with L = 1, averaged over the interior where the window fits, per channel."""
    values = []
    for c in range(a.shape[-1]):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        n = 49 / 48  # sample, not population, covariances

        def mean(z):
            return uniform_filter(z, 7)

        mx, my = mean(x), mean(y)
        vx, vy, cxy = n * (mean(x * x) - mx * mx), n * (mean(y * y) - my * my), n * (mean(x * y) - mx * my)
        c1, c2 = 0.01**2, 0.03**2
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[3:-3, 3:-3].mean())
    return float(np.mean(values))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 3),
    side=st.integers(7, 20),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
    noise=st.floats(0.01, 0.5),
)
def test_psnr_and_ssim_match_a_reference_computation(n, side, channels, seed, noise):
    rng = np.random.default_rng(seed)
    originals = rng.random((n, side, side, channels), dtype=np.float32)
    reconstructions = np.clip(originals + noise * rng.standard_normal(originals.shape, dtype=np.float32), 0, 1)

    np.testing.assert_allclose(
        scoring.psnr(originals, reconstructions),
        [reference_psnr(o, r) for o, r in zip(originals, reconstructions, strict=True)],
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        scoring.ssim(originals, reconstructions),
        [reference_ssim(o, r) for o, r in zip(originals, reconstructions, strict=True)],
        atol=1e-4,
    )


def test_identical_images_score_infinite_psnr_and_ssim_one_whether_uint8_or_float():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert np.all(np.isinf(scoring.psnr(images, images.astype(np.float32) / 255)))
    np.testing.assert_allclose(scoring.ssim(images, images.astype(np.float32) / 255), 1.0)


@pytest.mark.slow
def test_label_leakage_of_the_originals_is_total_and_the_accuracy_is_the_models(tiny_checkpoint, tiny_model_dir):
    test = data.load("cifar10", "test")
    indices = np.random.default_rng(0).permutation(len(test))[:200]
    images, labels = test.images[indices], test.labels[indices]
    m = manifest.load(tiny_model_dir)
    with torch.no_grad():
        predictions = load_model(tiny_checkpoint)(to_tensor(images, m.mean, m.std)).argmax(1).numpy()

    for split in ("stem", "layer3"):
        summary = scoring.score(images, images, manifest=m, split=split, labels=labels)["summary"]
        assert summary["label_leakage"] == 1.0
        assert summary["accuracy_original"] == summary["accuracy_reconstruction"] == np.mean(predictions == labels)

    noise = np.random.default_rng(0).random(images.shape, dtype=np.float32)
    summary = scoring.score(images, noise, manifest=m, split="layer1", labels=labels)["summary"]
    assert summary["label_leakage"] < 0.6 and summary["recognisable"] == 0


def test_the_nearest_gallery_face_names_the_person_in_real_photos_and_not_in_noise():
    gallery, test = data.load("att_faces", "train"), data.load("att_faces", "test")
    faces = data.resize(test.images, 112, 1)  # as the model (and so the attacker) sees them

    assert np.mean(scoring.identify(faces, gallery) == test.labels) > 0.85
    noise = np.random.default_rng(0).random(faces.shape, dtype=np.float32)
    assert np.mean(scoring.identify(noise, gallery) == test.labels) < 0.1


def test_the_report_holds_a_grid_of_originals_over_reconstructions_and_a_json_summary(tmp_path):
    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    reconstructions = rng.random((10, 32, 32, 3), dtype=np.float32)
    per_image = {"psnr": scoring.psnr(originals, reconstructions), "ssim": scoring.ssim(originals, reconstructions)}
    per_image["psnr"][0] = np.inf
    summary = {"frames": 10, "psnr_mean": float(np.mean(per_image["psnr"]))}

    paths = scoring.write_report(tmp_path, originals, reconstructions, per_image, summary, columns=5)

    grid = imread(paths["grid"])
    assert grid.shape[0] > grid.shape[1] * 0.8  # two pairs of rows of five
    written = json.loads(paths["summary"].read_text())
    assert written["summary"] == {"frames": 10, "psnr_mean": None}  # inf is not JSON
    assert written["per_image"]["ssim"] == per_image["ssim"].tolist()
