"""Identity leakage from a face generator (Webster et al. 2021, "This Person (Probably) Exists: Identity Membership
Attacks Against GAN Generated Faces"): whose face is a generated face?

Each face, generated or real, is described by the shipped faces classifier's penultimate features (resnet20-att_faces:
the global average of its last stage, the 64 numbers its final linear layer reads), taken from its ONNX head at the
layer3 split so that no torch model is needed. A generated face is given to the real person whose mean feature
direction is nearest (cosine). If the generator leaks identity, more of its faces go to the people it trained on than
to the held-out ones, beyond the share of real faces that belong to training people (chance); the share comes with a
Wilson 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from splitleak.core import data, manifest
from splitleak.model.generators import TrainingSet

SPLIT = "layer3"  # its head ends at the last stage, before the pooling and the classifier


@dataclass(frozen=True)
class Leakage:
    faces: int  # generated faces judged
    matched_training: float  # the share nearest a training person
    interval: tuple[float, float]  # its Wilson 95% interval
    chance: float  # the share of real faces that belong to training people
    people_matched: int  # distinct training people some generated face is given to
    people: int  # training people


def features(images: np.ndarray, model_dir: Path | None = None) -> np.ndarray:
    """(N, D) unit-length penultimate features of uint8 grey faces (N, H, W, 1), resized to the classifier's input."""
    import onnxruntime as ort

    m = manifest.load(model_dir or manifest.FACES_MODEL_DIR)
    head = ort.InferenceSession(str(m.split(SPLIT).head), providers=["CPUExecutionProvider"])
    x = m.preprocess(data.resize(images, m.input_shape[1], m.input_shape[0]))
    out = np.concatenate([head.run(None, {"image": x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    f = out.mean((2, 3))  # (N, 64): the global average pool the tail starts with
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def nearest_people(generated: np.ndarray, gallery: np.ndarray, people: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each generated feature's nearest person by cosine to the people's mean directions: (names, the people)."""
    names = np.unique(people)
    centres = np.stack([gallery[people == p].mean(0) for p in names])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return names[(generated @ centres.T).argmax(1)], names


def leakage(generated: np.ndarray, ts: TrainingSet, *, model_dir: Path | None = None) -> Leakage:
    """The share of `generated` faces nearest a person `ts` trained on, against those it held out."""
    people = np.concatenate([ts.labels, ts.held_out_labels])
    real = people >= 0  # not the canaries, who are no one
    people = people[real]
    both = features(np.concatenate([np.concatenate([ts.images, ts.held_out])[real], generated]), model_dir)
    gallery = both[: len(people)]
    matched, _ = nearest_people(both[len(people) :], gallery, people)
    training_people = np.unique(ts.labels[ts.labels >= 0])
    hits = int(np.isin(matched, training_people).sum())
    ci = binomtest(hits, len(generated)).proportion_ci(0.95, method="wilson")
    return Leakage(
        faces=len(generated),
        matched_training=hits / len(generated),
        interval=(float(ci.low), float(ci.high)),
        chance=float(np.isin(people, training_people).mean()),
        people_matched=len(np.intersect1d(matched, training_people)),
        people=len(training_people),
    )
