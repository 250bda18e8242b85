"""What every attack shares: the `Attack` shape, and what an attacker does with a head pulled out of the app.

An attack is built once with keyword-only knobs, among them the knowledge it is given (the manifest and split point
it targets; auxiliary images where it has some). It checks them and does all of its training in the constructor, so
a built attack is ready: `invert` maps intercepted activations to reconstructed images, and nothing else is public.
Trained weights are cached under `splitleak.core.data.cache_dir()`, keyed by the head's sha256 and the knobs.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from splitleak.core import data
from splitleak.core.manifest import Manifest, sha256


class Attack(ABC):
    name: ClassVar[str]  # the name the registry and `splitleak attack --attack` know it by
    knowledge: ClassVar[str]  # one sentence: what the attacker knows

    def __init__(self, *, manifest: Manifest, split: str) -> None:
        self.manifest = manifest
        self.split = manifest.split(split)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the model's input, which is what reconstructions look like."""
        c, h, w = self.manifest.input_shape
        return h, w, c

    def invert(self, activations: np.ndarray) -> np.ndarray:
        """Batch-first activations, as intercepted -> reconstructions, float32 (N, H, W, C) in [0, 1]."""
        activations = np.asarray(activations, np.float32)
        if activations.shape[1:] != self.split.activation_shape:
            raise ValueError(
                f"{self.name} was built for activations of shape {self.split.activation_shape} at "
                f"{self.manifest.served_name(self.split.name)}, not {activations.shape[1:]}"
            )
        if len(activations) == 0:
            return np.zeros((0, *self.image_shape), np.float32)
        reconstructions = self._invert(activations)
        return np.clip(reconstructions, 0.0, 1.0).astype(np.float32, copy=False)

    @abstractmethod
    def _invert(self, activations: np.ndarray) -> np.ndarray:
        """float32 (N, *activation_shape) -> float32 (N, H, W, C), roughly in [0, 1]."""


def check_positive(**knobs: float) -> None:
    for name, value in knobs.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")


def model_input(manifest: Manifest, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C), or float in [0, 1] -> normalised float32 (N, C, H, W), as the head takes it."""
    if images.dtype == np.uint8:
        return manifest.preprocess(images)
    x = images.astype(np.float32).transpose(0, 3, 1, 2)
    return np.ascontiguousarray((x - manifest.mean[:, None, None]) / manifest.std[:, None, None])


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def query(head: ort.InferenceSession, manifest: Manifest, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The head as a black box: images (uint8 or [0, 1] float, NHWC) in, activations out. Nothing else is seen."""
    return np.concatenate(
        [
            head.run(["activation"], {"image": model_input(manifest, images[i : i + batch_size])})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def cache_path(attack: str, manifest: Manifest, split: str, knobs: dict, auxiliary: np.ndarray | None = None) -> Path:
    """Where `attack` keeps what it trained for this head, these knobs and this auxiliary data."""
    key = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode())
    if auxiliary is not None:
        key.update(str(auxiliary.shape).encode())
        key.update(np.ascontiguousarray(auxiliary).data)
    head = sha256(manifest.split(split).head)[:16]
    path = data.cache_dir() / "attacks" / f"{attack}-{manifest.name}-{split}-{head}-{key.hexdigest()[:16]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
