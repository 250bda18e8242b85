"""Training-time defences: distance correlation is computed right, NoPeek lowers it, adversarial training defeats a
fresh decoder, and a defended variant exports with its `training_defence` and loads."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN_IMAGES

from splitleak import cli
from splitleak.core import data, manifest
from splitleak.model import train, zoo
from splitleak.model.checkpoint import Checkpoint, TrainConfig, checkpoint_path, load_model, to_tensor, variant_name
from splitleak.model.inverse import build_decoder
from splitleak.model.objectives import activation_dcor, distance_correlation

SPLIT = "layer1"


def textbook_dcor(x: np.ndarray, y: np.ndarray) -> float:
    """Székely, Rizzo and Bakirov (2007), Definition 4, written out with loops over every pair (k, l)."""
    n = len(x)
    a = np.array([[np.linalg.norm(x[k] - x[l]) for l in range(n)] for k in range(n)])  # noqa: E741
    b = np.array([[np.linalg.norm(y[k] - y[l]) for l in range(n)] for k in range(n)])  # noqa: E741
    big_a = np.array([[a[k, l] - a[k].mean() - a[:, l].mean() + a.mean() for l in range(n)] for k in range(n)])  # noqa: E741
    big_b = np.array([[b[k, l] - b[k].mean() - b[:, l].mean() + b.mean() for l in range(n)] for k in range(n)])  # noqa: E741
    dcov2 = (big_a * big_b).sum() / n**2
    dvar2_x, dvar2_y = (big_a * big_a).sum() / n**2, (big_b * big_b).sum() / n**2
    return float(np.sqrt(dcov2 / np.sqrt(dvar2_x * dvar2_y)))


def test_distance_correlation_of_a_variable_with_a_linear_function_of_itself_is_one():
    x = torch.randn(64, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert distance_correlation(x, -2.5 * x + 7).item() == pytest.approx(1.0, abs=1e-6)
    # A rotation and a scale keep every distance's ratio, so dCor stays 1 across different dimensions too.
    rotation = torch.linalg.qr(torch.randn(48, 48, dtype=torch.float64))[0]
    assert distance_correlation(x, 3 * x.flatten(1) @ rotation).item() == pytest.approx(1.0, abs=1e-6)


def test_distance_correlation_of_independent_samples_is_near_zero_for_large_n():
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(2000, 1, generator=g, dtype=torch.float64),
        torch.randn(2000, 1, generator=g, dtype=torch.float64),
    )
    assert distance_correlation(x, y).item() < 0.06
    # ...and not for a dependence that Pearson's correlation misses entirely.
    assert distance_correlation(x, x**2).item() > 0.4


def test_distance_correlation_matches_the_textbook_double_sum_for_random_shapes():
    rng = np.random.default_rng(0)
    for n, dx, dy in ((5, 1, 1), (17, 3, 8), (40, 12, 2)):
        x, y = rng.standard_normal((n, dx)), rng.standard_normal((n, dy))
        y[:, 0] += x[:, 0] ** 3  # some dependence, so the value is away from both ends
        got = distance_correlation(torch.from_numpy(x), torch.from_numpy(y)).item()
        assert got == pytest.approx(textbook_dcor(x, y), rel=1e-6)


def test_distance_correlation_has_a_finite_gradient_on_duplicated_samples():
    x = (
        torch.randn(8, 3, 2, 2).repeat(2, 1, 1, 1).requires_grad_()
    )  # every sample twice: zero distances off the diagonal
    distance_correlation(x, torch.relu(x) + 0.1 * x).backward()
    assert torch.isfinite(x.grad).all()


def fine_tune(defence: str, strength: float, epochs: int = 2) -> Checkpoint:
    """Fine-tune the suite's tiny ResNet-20 (conftest.tiny_checkpoint) with a training-time defence at layer1.

    Two epochs of the sample's 1,000 images: as many steps as the one epoch of 2,000 these tests were written for."""
    config = TrainConfig(
        model="resnet20",
        dataset="cifar10",
        epochs=epochs,
        limit=TINY_TRAIN_IMAGES,  # the same images as tiny_checkpoint, whose weights it starts from
        lr=train.FINE_TUNE_LR,
        defence=defence,
        strength=strength,
        split=SPLIT,
        from_checkpoint=True,
    )
    return train.train(config, progress=False)


@pytest.fixture(scope="module")
def nopeek_checkpoint(tiny_checkpoint) -> Checkpoint:
    return fine_tune("nopeek", 1.0)


@pytest.fixture(scope="module")
def undefended_checkpoint(tiny_checkpoint) -> Checkpoint:
    """The same fine-tuning with the defence's weight at zero: its gradients are exactly the task's."""
    return fine_tune("nopeek", 0.0)


@pytest.fixture(scope="module")
def test_images(tiny_checkpoint) -> torch.Tensor:
    test = data.load("cifar10", "test")
    pick = np.random.default_rng(1).permutation(len(test))[:512]
    return to_tensor(test.images[pick], tiny_checkpoint.mean, tiny_checkpoint.std)


@pytest.mark.slow
def test_nopeek_lowers_distance_correlation_against_the_undefended_model_trained_the_same_way(
    nopeek_checkpoint, undefended_checkpoint, test_images
):
    dcor = {
        name: activation_dcor(load_model(c), SPLIT, test_images)
        for name, c in (("nopeek", nopeek_checkpoint), ("undefended", undefended_checkpoint))
    }
    assert dcor["nopeek"] < dcor["undefended"] - 0.1, dcor
    # The task survives: a penalty this strong still leaves the tiny model well above chance (10%).
    assert nopeek_checkpoint.test_accuracy > 0.2


def fresh_decoder_mse(checkpoint: Checkpoint, test_images: torch.Tensor, epochs: int = 3) -> float:
    """The attacker's decoder, trained afresh on the head's activations of training images; its test MSE."""
    head = zoo.split(load_model(checkpoint), SPLIT)[0]
    x = to_tensor(data.load("cifar10", "train").images[:1000], checkpoint.mean, checkpoint.std)
    mean, std = torch.from_numpy(checkpoint.mean)[:, None, None], torch.from_numpy(checkpoint.std)[:, None, None]
    torch.manual_seed(0)
    with torch.no_grad():
        activation, test_activation = head(x), head(test_images)
    decoder = build_decoder(tuple(activation.shape[1:]), (32, 32, 3), 32)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 50):
            loss = F.mse_loss(decoder(activation[i : i + 50]), x[i : i + 50] * std + mean)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return F.mse_loss(decoder.eval()(test_activation), test_images * std + mean).item()


@pytest.mark.slow
def test_adversarial_training_raises_a_fresh_decoders_reconstruction_error(tiny_checkpoint, test_images):
    # Four epochs each on the sample's 1,000 images (as many steps as two on 2,000): 1.54x with two torch threads.
    # With two on 2,000, the effect had been 1.35x with one torch thread and 1.12x with two.
    defended, undefended = fine_tune("adversarial", 5.0, epochs=4), fine_tune("nopeek", 0.0, epochs=4)
    mse = {
        name: fresh_decoder_mse(c, test_images[:256])
        for name, c in (("adversarial", defended), ("undefended", undefended))
    }
    assert mse["adversarial"] > 1.2 * mse["undefended"], mse
    assert defended.test_accuracy > 0.2


@pytest.mark.slow
def test_an_exported_variant_carries_its_training_defence_and_loads(nopeek_checkpoint, tiny_model_dir):
    path = checkpoint_path(nopeek_checkpoint.config)
    out = path.parent.parent / "models" / "resnet20-cifar10-nopeek1.0-layer1"
    assert cli.main(["export", "--checkpoint", str(path), "--calibration-images", "16"]) == 0
    variant = manifest.load(out)
    assert variant.name == "resnet20-cifar10-nopeek1.0-layer1"
    assert variant.training_defence == {
        "name": "nopeek",
        "strength": 1.0,
        "split": SPLIT,
        "from": "resnet20-cifar10",
        "epochs": 2,
    }
    assert list(variant.splits) == list(zoo.ZOO["resnet20"].split_points)
    # Ordinary models, the shipped one included, have no such record and load as before.
    assert manifest.load(tiny_model_dir).training_defence is None
    assert "training_defence" not in json.loads((tiny_model_dir / "manifest.json").read_text())
    assert manifest.load().training_defence is None


def test_training_flags_make_a_defended_config_and_refuse_half_of_one():
    parser = train.get_args_parser()
    args = parser.parse_args(["--defence", "nopeek", "--strength", "0.5", "--from-checkpoint", "--epochs", "2"])
    config = train.config_from_args(args)
    assert (config.defence, config.strength, config.split, config.lr) == ("nopeek", 0.5, "layer1", train.FINE_TUNE_LR)
    assert variant_name(config) == "resnet20-cifar10-nopeek0.5-layer1"
    for bad in (
        ["--strength", "1"],
        ["--defence", "nopeek"],
        ["--defence", "adversarial", "--strength", "1", "--split", "x"],
    ):
        with pytest.raises(ValueError):
            train.config_from_args(parser.parse_args(bad))
