"""What every attack shares: the `Attack` shape, and what an attacker does with a head pulled out of the app.

An attack is built once with keyword-only arguments: the knowledge it is given (the manifest and split point it
targets; auxiliary images, their labels and the defence, where it declares that it takes them) and its knobs. What an
attack takes is declared on its class, never read off its constructor: `needs_auxiliary`, `needs_labels`, `adaptive`
and `exportable`, and `Knobs`, a frozen dataclass whose fields are its knobs with their types and defaults. The
command line (`splitleak attack`, `splitleak attacker train-decoder`) and the sweep read these; `Attack` checks what
it is given against them once, and the attack does all of its training in the constructor, so a built
attack is ready: `invert` maps intercepted activations to reconstructed images, and nothing else is public.
Trained weights are cached under `splitleak.core.data.cache_dir()`, keyed by the head's sha256 and the knobs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnxruntime as ort

from splitleak.core import data, defences
from splitleak.core.manifest import Manifest, sha256

if TYPE_CHECKING:
    from torch import nn


class Attack(ABC):
    name: ClassVar[str]  # the name the registry and `splitleak attack --attack` know it by
    knowledge: ClassVar[str]  # one sentence: what the attacker knows
    needs_auxiliary: ClassVar[bool] = False  # images of the victim's kind (a train split), to query or train on
    needs_labels: ClassVar[bool] = False  # and their labels, as the model's class indices (with needs_auxiliary)
    adaptive: ClassVar[bool] = False  # told the defence and its strength, it models them
    exportable: ClassVar[bool] = False  # `network()` is the whole inverse, which train-decoder exports to ONNX

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        """The attack's knobs, one field each with its type and default (an attack without knobs keeps this)."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        split: str,
        auxiliary: np.ndarray | None = None,
        auxiliary_labels: np.ndarray | None = None,
        defence: str = "none",
        strength: float | None = None,
        progress: bool = False,
        **knobs: Any,
    ) -> None:
        self.manifest = manifest
        self.split = manifest.split(split)
        self.knobs = self.check_knobs(knobs)
        self.progress = progress  # a progress bar on stderr while it trains, where it trains
        if defence != "none" and not self.adaptive:
            raise ValueError(f"{self.name} does not model a defence; the adaptive attacks do")
        self.defence = defences.build(defence, strength=strength, split=self.split)
        self.auxiliary = self._check_auxiliary(auxiliary)
        self.auxiliary_labels = self._check_labels(auxiliary_labels)

    @classmethod
    def knob_types(cls) -> dict[str, type]:
        return typing.get_type_hints(cls.Knobs)

    @classmethod
    def knob_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls.Knobs)}

    @classmethod
    def check_knobs(cls, knobs: Mapping[str, Any]) -> Knobs:
        """`knobs` as this attack's Knobs; ValueError, naming the knobs it has, for one it has not or of another type.
        The values stay as given (an int for a float knob stays an int), so caches keyed by them stay the same."""
        types = cls.knob_types()
        unknown = sorted(set(knobs) - set(types))
        if unknown:
            named = ", ".join(map(repr, unknown))
            raise ValueError(f"{cls.name} has no knob {named}; its knobs: {', '.join(types) or 'none'}")
        for name, value in knobs.items():
            if not is_a(value, types[name]):
                kind = getattr(types[name], "__name__", types[name])
                raise ValueError(f"{cls.name}'s knob {name} is a {kind}, not {value!r}")
        return cls.Knobs(**knobs)

    def _check_auxiliary(self, auxiliary: np.ndarray | None) -> np.ndarray | None:
        if not self.needs_auxiliary:
            if auxiliary is not None:
                raise ValueError(f"{self.name} takes no auxiliary images: {self.knowledge}")
            return None
        if auxiliary is None or len(auxiliary) == 0:
            raise ValueError(f"{self.name} needs auxiliary images: {self.knowledge}")
        if auxiliary.dtype != np.uint8 or auxiliary.shape[1:] != self.image_shape:
            raise ValueError(
                f"auxiliary images must be uint8 {self.image_shape} (N, H, W, C) like the model's input, not "
                f"{auxiliary.dtype} {auxiliary.shape[1:]}"
            )
        return auxiliary

    def _check_labels(self, labels: np.ndarray | None) -> np.ndarray | None:
        if not self.needs_labels:
            if labels is not None:
                raise ValueError(f"{self.name} takes no auxiliary_labels: {self.knowledge}")
            return None
        classes = len(self.manifest.classes)
        labels = np.asarray(labels if labels is not None else [])
        if labels.shape != (len(self.auxiliary),) or not ((labels >= 0) & (labels < classes)).all():
            raise ValueError(f"{self.name} needs auxiliary_labels: a class index in [0, {classes}) per auxiliary image")
        return labels

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

    def network(self) -> nn.Module:
        """With `exportable`: the inverse as one torch module, float32 (N, *activation_shape) -> (N, C, H, W) in
        pixels of [0, 1] (not yet clipped), computing what `invert` does; `splitleak attacker train-decoder` exports
        it for the live attacker."""
        raise NotImplementedError(f"{self.name} is not one network that could be exported")

    @abstractmethod
    def _invert(self, activations: np.ndarray) -> np.ndarray:
        """float32 (N, *activation_shape) -> float32 (N, H, W, C), roughly in [0, 1]."""


def adaptive_knobs(attack: Attack) -> tuple[dict, dict]:
    """(the knobs an adaptive attack's undefended training depends on, those its own depends on), for cache keys:
    it trains undefended first, then `adapt_epochs` more against the defence, which only the second depends on."""
    undefended = {name: value for name, value in dataclasses.asdict(attack.knobs).items() if name != "adapt_epochs"}
    if attack.defence.name == "none":
        return undefended, undefended
    d = attack.defence
    return undefended, dict(undefended, defence=d.name, strength=d.strength, adapt_epochs=attack.knobs.adapt_epochs)


def is_a(value: Any, kind: type) -> bool:
    """Whether `value` may be a knob of type `kind`: an int serves as a float, but a bool as neither."""
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_positive(knobs: Any, *names: str) -> None:
    for name in names:
        value = getattr(knobs, name)
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")


def check_not_negative(knobs: Any, *names: str) -> None:
    for name in names:
        value = getattr(knobs, name)
        if value < 0:
            raise ValueError(f"{name} must be at least 0, not {value!r}")


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


def to_torch(path: Path) -> nn.Module:
    """The ONNX file at `path` as a torch module (onnx2torch), in eval mode, for the attacks that need gradients.

    Handed the loaded model, not its path: given a path, onnx2torch writes a temporary file beside it (for shape
    inference), which would fail in a read-only install and write into the model folder otherwise."""
    import onnx
    import onnx2torch

    return onnx2torch.convert(onnx.load(str(path))).eval()
