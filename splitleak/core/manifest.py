"""The manifest of an exported model: what the device and the cloud need to know, with no torch.

An exported model is a folder (written by `splitleak export`) holding, for every split point, `SPLIT.head.onnx` and
`SPLIT.tail.onnx`, and `manifest.json` describing the input (size, normalisation), the activation at each split
(shape, dtype, bytes) and the sha256 of every file, checked on load. Where `splitleak export` had the training data,
each split also holds the calibration the run-time defences need (splitleak.core.defences): `reference_std`, the std of
the activation over calibration images, and `channel_ranking`, the channels from most to least important to the
tail's prediction. A manifest without them still loads; only the defences that need them refuse it.

A model variant trained with a training-time defence (splitleak.model.objectives) also records it at the top level:
`training_defence` = {"name": "nopeek" | "adversarial", "strength": weight in the loss, "split": the split point it
protects, "from": the model it was fine-tuned from (None: trained afresh), "epochs": of that training}. Ordinary
models have none (`Manifest.training_defence` is None).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "resnet20-cifar10"
FACES_MODEL_DIR = DEFAULT_MODEL_DIR.parent / "resnet20-att_faces"  # the shipped faces classifier (40 people)


@dataclass(frozen=True)
class Split:
    name: str
    head: Path
    tail: Path
    activation_shape: tuple[int, ...]  # without the batch dimension
    activation_datatype: str  # an OIP datatype name
    reference_std: float | None = None
    channel_ranking: tuple[int, ...] | None = None  # most important first

    @property
    def activation_bytes(self) -> int:
        from splitleak.core.codec import DATATYPES

        return int(np.prod(self.activation_shape)) * DATATYPES[self.activation_datatype].itemsize


@dataclass(frozen=True)
class Manifest:
    root: Path
    name: str  # e.g. "resnet20-cifar10"; the cloud serves split S of it as the OIP model "NAME.S"
    model: str
    dataset: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: np.ndarray
    std: np.ndarray
    test_accuracy: float | None
    default_split: str
    splits: dict[str, Split]
    training_defence: dict | None = None  # {"name", "strength", "split", "from", "epochs"}; None: an ordinary model

    def split(self, name: str | None) -> Split:
        name = name or self.default_split
        if name not in self.splits:
            raise KeyError(f"{self.name} has no split point {name!r}; it has {', '.join(self.splits)}")
        return self.splits[name]

    def served_name(self, split: str) -> str:
        return f"{self.name}.{split}"

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W), as in training."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
        return np.ascontiguousarray((x - self.mean[:, None, None]) / self.std[:, None, None])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ManifestError(ValueError):
    """A model folder that is not a complete export: the message names the file and what is missing or wrong."""


def load(root: str | Path = DEFAULT_MODEL_DIR, *, verify: bool = True) -> Manifest:
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{root} is not an exported model: no manifest.json (make one with splitleak export)")
    try:
        return _parse(root, json.loads(path.read_text()), verify)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not JSON: {e}") from None
    except (KeyError, TypeError, AttributeError) as e:
        # A hand-edited or truncated manifest: name what is missing rather than fail deep in the caller.
        what = f"the key {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
        raise ManifestError(f"{path} is not a manifest splitleak export writes: {what}") from None


def _parse(root: Path, raw: dict, verify: bool) -> Manifest:
    path = root / "manifest.json"
    splits = {}
    for name, s in raw["splits"].items():
        calibration = s.get("calibration", {})
        split = Split(
            name,
            root / s["head"],
            root / s["tail"],
            tuple(s["activation"]["shape"]),
            s["activation"]["datatype"],
            calibration.get("reference_std"),
            tuple(calibration["channel_ranking"]) if "channel_ranking" in calibration else None,
        )
        for part in ("head", "tail"):
            file = getattr(split, part)
            if not file.is_file():
                raise ManifestError(f"{path} names {file.name}, which is not in {root}")
            if verify and sha256(file) != s["sha256"][part]:
                raise ManifestError(f"{file} does not match the sha256 in {path} (changed or truncated since export)")
        splits[name] = split
    inp = raw["input"]
    return Manifest(
        root,
        raw["name"],
        raw["model"],
        raw["dataset"],
        tuple(raw["classes"]),
        tuple(inp["shape"]),
        np.asarray(inp["mean"], np.float32),
        np.asarray(inp["std"], np.float32),
        raw.get("test_accuracy"),
        raw["default_split"],
        splits,
        raw.get("training_defence"),
    )
