"""Generators that remember: tiny diffusion models and GANs train, resume and sample, and each extraction measure
tells a planted copy from a held-out image (an exact copy is flagged, a held-out image is not; a memorised image
completes with less error; faces of training people are traced to them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from splitleak.attacker import extraction, identity
from splitleak.model import diffusion
from splitleak.model import generators as G

TINY = {"width": 8, "per_copy": (20, 4, 2), "batch_size": 8}  # the sample's 1,000 CIFAR-10 images hold 52 of them


@pytest.fixture(scope="module")
def faces() -> G.TrainingSet:
    return G.training_set(G.GeneratorConfig(data="faces"))


@pytest.fixture(scope="module")
def cifar() -> G.TrainingSet:
    return G.training_set(G.GeneratorConfig(data="cifar-duplicates", **TINY))


def test_faces_hold_out_half_of_the_people_entirely(faces):
    assert len(np.unique(faces.labels)) == len(np.unique(faces.held_out_labels)) == 20
    assert not np.intersect1d(faces.labels, faces.held_out_labels).size
    assert faces.images.shape == (200, 32, 32, 1) and faces.held_out.shape == (200, 32, 32, 1)


def test_cifar_duplicates_repeat_chosen_images_and_dedup_keeps_one_of_each(cifar):
    assert cifar.copies.tolist().count(100) == 2 and cifar.copies.tolist().count(10) == 4
    assert len(cifar.trained_on(dedup=False)) == 20 + 40 + 200
    assert len(cifar.trained_on(dedup=True)) == 26
    assert extraction.distances(cifar.held_out, cifar.images).min() > 0  # no held-out image was trained on


@pytest.mark.parametrize("kind", G.KINDS)
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(kind, tmp_path, monkeypatch):
    config = G.GeneratorConfig(kind=kind, data="cifar-duplicates", steps=6, **TINY)
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "whole"))
    G.train(config)
    whole = G.load(config)
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "stopped"))
    G.train(G.GeneratorConfig(kind=kind, data="cifar-duplicates", steps=3, **TINY))
    assert G.load(config).step == 3
    G.train(config)
    resumed = G.load(config)
    assert resumed.step == whole.step == 6
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    samples = G.sample(resumed, 5, ddim_steps=3)
    assert samples.shape == (5, 32, 32, 3) and samples.dtype == np.uint8


@pytest.mark.parametrize("kind", G.KINDS)
def test_an_exported_generator_computes_what_the_torch_one_does(kind, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    config = G.GeneratorConfig(kind=kind, data="faces", steps=2, width=8, batch_size=8)
    G.train(config)
    trained = G.load(config)
    path = G.export(trained, tmp_path / "out")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if kind == "gan":
        feeds = {"latent": torch.randn(3, 64, 1, 1)}
    else:
        feeds = {"image": torch.randn(3, 1, 32, 32), "step": torch.tensor([0, 500, 999])}
    (got,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        want = trained.model(*feeds.values()).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_an_exact_copy_is_flagged_and_a_held_out_image_is_not(cifar):
    rng = np.random.default_rng(0)
    copies = cifar.images[[0, 21, 25]]  # seen once, 10 times, 100 times
    noisy = np.clip(cifar.images[[3]] + rng.normal(0, 3, (1, 32, 32, 3)), 0, 255).astype(np.uint8)
    samples = np.concatenate([copies, noisy, cifar.held_out[:10]])
    found = extraction.extract(samples, cifar.images)
    assert found.flagged.tolist() == [True] * 4 + [False] * 10
    assert found.extracted().tolist() == [0, 3, 21, 25]
    summary = found.summary(cifar.copies)
    assert summary["by_copies"] == {
        "1": {"images": 20, "extracted": 2},
        "10": {"images": 4, "extracted": 1},
        "100": {"images": 2, "extracted": 1},
    }
    assert summary["nearest_by_copies"] == {"1": 12 / 14, "10": 1 / 14, "100": 1 / 14}
    # The control flags the held-out images, which are copies of themselves, and none of the training copies.
    control = extraction.extract(samples, cifar.held_out)
    assert control.flagged.tolist() == [False] * 4 + [True] * 10


def test_a_planted_canary_is_found_and_counted_apart_and_an_unplanted_one_is_not():
    config = G.GeneratorConfig(data="cifar-duplicates", canaries=3, canary_copies=10, **TINY)
    ts = G.training_set(config)
    assert ts.canary.sum() == ts.held_out_canary.sum() == 3 and (ts.copies[ts.canary] == 10).all()
    samples = np.concatenate([ts.images[ts.canary][:2], ts.held_out[:5]])
    summary = extraction.extract(samples, ts.images).summary(ts.copies, ts.canary)
    assert summary["canaries"] == {"images": 3, "extracted": 2}
    assert summary["by_copies"]["10"] == {"images": 4, "extracted": 0}  # the canaries are not among the duplicates
    control = extraction.extract(samples, ts.held_out).summary(np.ones(len(ts.held_out), int), ts.held_out_canary)
    assert control["canaries"] == {"images": 3, "extracted": 0}


def test_cache_names_stay_what_they_were_so_cached_runs_are_found():
    assert G.GeneratorConfig().name() == "diffusion-faces-752de91c9c"
    assert G.GeneratorConfig(kind="gan", data="cifar-duplicates", dedup=True).name() == (
        "gan-cifar-duplicates-dedup-f85eeac0f9"
    )
    assert G.GeneratorConfig(canaries=5).name().startswith("diffusion-faces-canaries5x1-")


class Memoriser(nn.Module):
    """The exact denoiser of a training set's empirical distribution: E[x0 | x_t] is a softmax over the training
    images, so it gives back nothing but them, the most a diffusion model can memorise."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images.flatten(1)  # (N, D)
        self.abar = diffusion.alphas_bar()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t[0]]  # every caller steps a whole batch at once
        flat = x.flatten(1)
        logits = -torch.cdist(flat, a.sqrt() * self.images).pow(2) / (2 * (1 - a))
        x0 = logits.softmax(1) @ self.images
        return ((flat - a.sqrt() * x0) / (1 - a).sqrt()).view_as(x)


def test_a_memorised_image_completes_with_lower_error_than_a_held_out_one(faces):
    model = Memoriser(G.to_unit(faces.images))
    errors = extraction.completion_error(
        model, np.concatenate([faces.images[:8], faces.held_out[:8]]), ddim_steps=10, seed=0
    )
    # Most of the memorised faces come back exactly (the others as another photo of the same person); none of the
    # held-out ones can.
    assert (errors[:8] < 1e-3).sum() >= 4 and errors[8:].min() > 0.02
    results = extraction.membership(model, faces, members=30, ddim_steps=10, resamples=20)
    assert results["inpainting"]["auc"][0] > 0.8
    assert results["denoising loss"]["auc"][0] > 0.95


def test_faces_of_training_people_are_traced_to_them_and_held_out_faces_are_not(faces):
    of_training = identity.leakage(faces.images[::4], faces)
    of_held_out = identity.leakage(faces.held_out[::4], faces)
    assert of_training.chance == 0.5
    assert of_training.matched_training > 0.9 and of_training.interval[0] > 0.5
    assert of_held_out.matched_training < 0.1 and of_held_out.interval[1] < 0.5


@pytest.mark.slow
def test_generators_train_and_measure_from_the_command_line(tmp_path, capsys):
    from splitleak import cli

    tiny = ["--kind", "diffusion", "--data", "faces", "--width", "8", "--batch-size", "8", "--steps", "4"]
    assert cli.main(["generators", "train", *tiny]) == 0
    assert "4 steps" in capsys.readouterr().out
    measure = ["--samples", "12", "--ddim-steps", "3", "--members", "10", "--out", str(tmp_path)]
    assert cli.main(["generators", "measure", *tiny, *measure]) == 0
    (written,) = tmp_path.glob("*.json")
    result = json.loads(written.read_text())
    assert result["training"]["steps"] == 4 and result["sampling"]["samples"] == 12
    assert set(result["membership"]) == {"inpainting", "denoising loss"}
    assert result["identity"]["faces"] == 12
    assert result["extraction"]["held_out"]["by_copies"]["1"]["images"] == 200
    assert written.with_suffix(".png").stat().st_size > 1000
    assert "Membership by inpainting" in written.with_suffix(".md").read_text()
    capsys.readouterr()
    assert cli.main(["generators", "report", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "| diffusion | faces | none | 4 |" in report and "| diffusion | faces | none | inpainting |" in report
    assert f"src='{written.stem}.png'" in (tmp_path / "index.html").read_text()


def test_measuring_an_untrained_generator_says_how_to_train_it(tmp_path, monkeypatch, capsys):
    from splitleak import cli

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    assert cli.main(["generators", "measure", "--kind", "gan", "--data", "faces", "--out", str(tmp_path)]) == 2
    assert "splitleak generators train --kind gan --data faces" in capsys.readouterr().err
    assert cli.main(["generators", "report", "--out", str(tmp_path)]) == 2
