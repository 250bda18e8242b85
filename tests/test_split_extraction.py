"""Extraction from a split classifier (attacker.split_extraction): a class inversion makes images the model gives
their class, the data-free attack's synthetic images are made once and shared with the attack that trains on them,
and `splitleak extract` filters against the training split and the test split alike."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from splitleak.attacker import split_extraction
from splitleak.attacker.attacks import build
from splitleak.attacker.attacks.datafree import DivideAndConquerInversion, synthetic_images
from splitleak.attacker.extraction import extract
from splitleak.cli import main as cli
from splitleak.core import manifest


def predict(m: manifest.Manifest, images: np.ndarray) -> np.ndarray:
    parts = m.split(m.default_split)
    head, tail = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (parts.head, parts.tail))
    activation = head.run(None, {"image": m.preprocess(images)})[0]
    return tail.run(None, {tail.get_inputs()[0].name: activation})[0].argmax(1)


def test_a_class_inversion_gives_images_the_model_calls_by_their_class(shipped_model_dir):
    m = manifest.load(shipped_model_dir)
    images, classes = split_extraction.invert_classes(m, m.default_split, per_class=2, steps=60)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert classes.tolist() == [c for c in range(10) for _ in range(2)]
    # What a tail's host gets from the weights it holds: images the deployed ONNX model names as asked.
    assert np.mean(predict(m, images) == classes) >= 0.9


@pytest.mark.slow
def test_the_synthetic_images_are_made_once_and_are_those_the_attack_trains_on(tiny_model_dir):
    m = manifest.load(tiny_model_dir)
    knobs = {"synthetic_images": 8, "synthesis_steps": 3, "epochs": 1, "batch_size": 8}
    first = synthetic_images(m, "stem", DivideAndConquerInversion.Knobs(**knobs))
    assert first.shape == (8, 3, 32, 32)
    again = synthetic_images(m, "stem", DivideAndConquerInversion.Knobs(**knobs))
    assert torch.equal(first, again)  # from the cache, not synthesised anew (synthesis draws new noise each time)
    attack = build("datafree", manifest=m, split="stem", **knobs)
    assert torch.equal(synthetic_images(m, "stem", attack.knobs), first)
    pixels = split_extraction.to_uint8(first, m)
    assert pixels.shape == (8, 32, 32, 3) and pixels.dtype == np.uint8


def test_a_copy_of_a_training_image_is_flagged_against_the_training_split_only(shipped_model_dir):
    m = manifest.load(shipped_model_dir)
    train, test = split_extraction.references(m, m.dataset, seed=0)
    assert len(train.images) == len(test.images) == 400  # the sample's test split, and as many training images
    copies = train.images[:5]
    against_train = split_extraction.summary(extract(copies, train.images), train, train.labels[:5])
    against_test = split_extraction.summary(extract(copies, test.images), test, train.labels[:5])
    assert against_train["flagged_samples"] == against_train["extracted"] == 5
    assert against_train["nearest_is_same_class"] == 1.0
    assert against_test["flagged_samples"] == 0


def test_extract_writes_counts_for_the_training_split_and_the_control(tmp_path, capsys):
    out = tmp_path / "classes"
    assert cli(["extract", "--source", "classes", "--per-class", "1", "--steps", "5", "--out", str(out)]) == 0
    report = json.loads((out / "extraction.json").read_text())
    assert report["samples"] == 10 and report["source"] == "classes"
    for side in ("train", "test"):
        assert report[side]["references"] == 400
        assert 0 <= report[side]["flagged_samples"] <= 10
        assert (out / f"closest-{side}.png").stat().st_size > 0
    assert np.load(out / "samples.npy").shape == (10, 32, 32, 3)
