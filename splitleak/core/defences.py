"""Run-time defences: transforms the device applies to the activation before it leaves, and how the cloud undoes
the ones that only change the activation's form. numpy only, so the device (no torch) imports it.

Each defence is built with its strength and has one method, `apply(activation, rng) -> (tensors, parameters)`: the
named tensors to send in place of the activation (always `activation`, sometimes more) and the request parameters
that describe their form. Noise and dropout have no inverse, which is the point; quantisation and pruning change only
the form in which the activation travels, and `restore` turns any form back into the float32 activation the tail
takes, whichever defence produced it, so the cloud never needs to know the defence.

What a defence offers is declared on its class, never guessed: `strengths` (what a strength measures, the values it
takes, its default, and the stretch the demo's slider shows), which `build`, the device's --help, the sweep and the
demo read; and `received` (what an attacker who knows the defence can say of what arrives), which rMLE models. A
defence from outside the repository is a module with its class and `register_defence` (splitleak.core.plugins).

| name | strength | what travels | after |
|---|---|---|---|
| `none` | - | FP32 activation | |
| `gaussian`, `laplace` | noise std / the split's reference std | FP32 | He et al. 2020; Titcombe et al. 2021 |
| `dropout` | fraction of elements zeroed | FP32 | He et al. 2020 |
| `channel-dropout` | fraction of channels zeroed | FP32 | Tompson et al. 2015 |
| `fp16` | - | FP16 | |
| `quantise`, `quantise-channel` | bits per element, 1 to 8 (fewer is stronger) | UINT8 levels | Jacob et al. 2018 |
| `topk` | fraction of channels pruned (DISCO's R) | FP32, k of C channels | Singh et al. 2021 |

- Noise: He, Zhang and Lee, "Attacking and protecting data privacy in edge-cloud collaborative inference systems"
  (IEEE IoT Journal, 2020), and Titcombe et al., "Practical defences against model inversion attacks for split
  neural networks" (ICLR 2021 DPML workshop), add noise to the intermediate features with an absolute scale. Here the
  scale is relative to a reference std per split, measured by `splitleak export` on training images and kept in the
  manifest, because activations at different depths have very different magnitudes: strength 0.5 is the same
  signal-to-noise ratio at every split, and it is one fixed number per split, so it hides nothing about the frame.
  Laplacian noise is drawn with scale b = sigma / sqrt(2), so at one strength both noises add the same power.
- Dropout: He et al. 2020 found dropout at the cut layer beats noise on the accuracy-SSIM curve. Survivors are
  scaled by 1/(1 - p) (inverted dropout, Srivastava et al., JMLR 2014) so that every element keeps its expected value
  and the tail's BatchNorm statistics still fit; the scale costs no privacy, as an adaptive attacker knows p anyway.
  `channel-dropout` zeros whole feature maps (SpatialDropout: Tompson et al., CVPR 2015), the random channel masking.
- Quantisation: the affine scheme x = scale * (level - zero_point) of Jacob et al., "Quantization and training of
  neural networks for efficient integer-arithmetic-only inference" (CVPR 2018), eq. 1, with 0 exactly representable
  (ReLU zeros stay zeros). The range is each frame's own (per tensor, or per channel: `scale` and `zero_point` of
  shape (B, 1) or (B, C)), because a fixed range would clip. Levels are unsigned, so one UINT8 form covers signed and
  non-negative activations alike. Below 8 bits the levels are packed: a row-major, most-significant-bit-first stream
  per frame, the last byte zero-padded, so 4 bits cost half a byte.
- Pruning: DISCO (Singh et al., "DISCO: Dynamic and invariant sensitive channel obfuscation for deep neural
  networks", CVPR 2021) learns a pruning network that scores channels per input, trained against a reconstruction
  adversary, and keeps the top k. Here the ranking is static and task-only: `splitleak export` zeros each channel in
  turn on calibration images and ranks channels by how far the tail's prediction moves (mean KL divergence), and the
  device keeps the k most important. Pruned channels are not sent: a compact (B, k, ...) tensor travels with the kept
  indices (`channels`, INT32 (B, k)), and `restore` puts them back in place with zeros elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np

from splitleak.core.manifest import Split
from splitleak.core.plugins import Registry

Tensors = dict[str, np.ndarray]
Parameters = dict[str, int | float | str]

INPUTS = ("activation", "scale", "zero_point", "channels")  # every tensor a defended request may carry
DATATYPES = ("FP32", "FP16", "UINT8")  # what `activation` may travel as


class RestoreError(ValueError):
    """A request's tensors are in no form `restore` knows: the cloud answers INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Slider:
    """The demo's slider for a defence's strength: the stretch of its range worth showing, not all of it."""

    low: float
    high: float
    step: float
    start: float  # where the slider stands when the page switches to the defence


@dataclass(frozen=True)
class Strengths:
    """What a defence's strength measures and which values it takes, declared once per defence: `build` checks every
    strength against it, and the device's --help, the sweep and the demo's slider read it."""

    means: str  # what a strength measures, in words; `describe` adds the range
    low: float = 0.0
    high: float = 0.0  # math.inf: no upper bound
    below_high: bool = False  # [low, high) rather than [low, high]: dropout's 1 would zero everything
    whole: bool = False  # whole numbers only (bits)
    default: float | None = None  # what `build` takes when given no strength; None: the user must give one
    slider: Slider | None = None  # None: nothing to choose, the strength being unused

    def __post_init__(self) -> None:
        for value in (self.default, *((self.slider.low, self.slider.high, self.slider.start) if self.slider else ())):
            if value is not None and not self.allows(value):
                raise ValueError(f"{value:g} is outside the strengths it is declared among: {self.describe()}")

    def allows(self, strength: float) -> bool:
        below = strength < self.high if self.below_high else strength <= self.high
        return self.low <= strength and below and (not self.whole or float(strength).is_integer())

    def describe(self) -> str:
        if self.low == self.high:
            return f"{self.means} ({self.low:g})"
        if math.isinf(self.high):
            return f"{self.means} (>= {self.low:g})"
        if self.whole:
            return f"{self.means}, a whole number from {self.low:g} to {self.high:g}"
        return f"{self.means}, in [{self.low:g}, {self.high:g}{')' if self.below_high else ']'}"


class Received(Enum):
    """What arrives of a defended activation, as an attacker who knows the defence models it (rMLE's distance,
    splitleak.attacker.attacks.rmle)."""

    NEAR = "near"  # the activation give or take noise or rounding: the plain squared distance already fits it
    MASKED = "masked"  # elements the defence zeroed, and the rest as they were times `kept_scale`


class Defence(ABC):
    name: ClassVar[str]  # the name `build` and `splitleak device --defence` know it by
    strengths: ClassVar[Strengths]  # what `strength` measures and which values it takes
    received: ClassVar[Received | None] = None  # None: no form an attack can model (rMLE refuses it)

    def __init__(self, *, strength: float, split: Split) -> None:
        self.strength = float(strength)
        self.split = split
        if not self.strengths.allows(self.strength):
            raise ValueError(
                f"{self.name}: strength {self.strength:g} is out of range; it is {self.strengths.describe()}"
            )

    @property
    def kept_scale(self) -> float:
        """With `received` MASKED: what the elements that were not zeroed are multiplied by."""
        return 1.0

    @abstractmethod
    def apply(self, activation: np.ndarray, rng: np.random.Generator) -> tuple[Tensors, Parameters]:
        """float32 (B, *activation_shape) -> (the tensors to send, the request parameters describing their form)."""

    def _calibration(self, field: str):
        value = getattr(self.split, field)
        if value is None:
            raise ValueError(
                f"{self.name} needs the {field} of split {self.split.name!r}, which "
                f"{self.split.head.parent / 'manifest.json'} lacks (exported before defences were calibrated, or "
                "without its training data): re-export the model with `splitleak export` where the data set is at hand"
            )
        return value


UNUSED = Strengths("unused", default=0.0)


class NoDefence(Defence):
    name = "none"
    strengths = UNUSED
    received = Received.NEAR

    def apply(self, activation, rng):
        return {"activation": activation}, {}


class GaussianNoise(Defence):
    name = "gaussian"
    strengths = Strengths(
        "the noise std as a multiple of the split's reference std", high=math.inf, slider=Slider(0, 2, 0.05, 0.5)
    )
    received = Received.NEAR  # the squared distance is the maximum-likelihood fit under Gaussian noise

    def __init__(self, *, strength: float, split: Split) -> None:
        super().__init__(strength=strength, split=split)
        self.sigma = self.strength * self._calibration("reference_std")

    def apply(self, activation, rng):
        noise = self._noise(rng, activation.shape).astype(np.float32)
        return {"activation": activation + noise}, {}

    def _noise(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.normal(0.0, self.sigma, shape)


class LaplaceNoise(GaussianNoise):
    name = "laplace"

    def _noise(self, rng, shape):
        return rng.laplace(0.0, self.sigma / math.sqrt(2), shape)  # a Laplace(b) has std b * sqrt(2)


class Dropout(Defence):
    name = "dropout"
    strengths = Strengths(
        "the fraction of elements zeroed", high=1, below_high=True, slider=Slider(0, 0.95, 0.05, 0.25)
    )
    received = Received.MASKED

    @property
    def kept_scale(self) -> float:
        return 1 / (1 - self.strength)

    def apply(self, activation, rng):
        keep = rng.random(self._mask_shape(activation.shape)) >= self.strength
        return {"activation": np.where(keep, activation / np.float32(1 - self.strength), np.float32(0))}, {}

    def _mask_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


class ChannelDropout(Dropout):
    name = "channel-dropout"
    strengths = dataclasses.replace(Dropout.strengths, means="the fraction of channels zeroed")

    def _mask_shape(self, shape):
        return (*shape[:2], *(1,) * (len(shape) - 2))  # one draw per (frame, channel)


class HalfPrecision(Defence):
    name = "fp16"
    strengths = UNUSED
    received = Received.NEAR  # rounded to within half a unit in the last place

    def apply(self, activation, rng):
        return {"activation": activation.astype(np.float16)}, {}


class Quantise(Defence):
    name = "quantise"
    strengths = Strengths("the bits per element", low=1, high=8, whole=True, default=8.0, slider=Slider(1, 8, 1, 8))
    received = Received.NEAR  # restored to within one step
    per_channel = False

    def __init__(self, *, strength: float, split: Split) -> None:
        super().__init__(strength=strength, split=split)
        self.bits = int(self.strength)

    def apply(self, activation, rng):
        levels, scale, zero_point = quantise(activation, bits=self.bits, per_channel=self.per_channel)
        sent = levels if self.bits == 8 else pack(levels.reshape(len(levels), -1), self.bits)
        return {"activation": sent, "scale": scale, "zero_point": zero_point}, {"bits": self.bits}


class QuantisePerChannel(Quantise):
    name = "quantise-channel"
    per_channel = True


class TopK(Defence):
    name = "topk"
    strengths = Strengths(
        "the fraction of channels pruned (at least one channel is kept)",
        high=1,
        below_high=True,
        slider=Slider(0, 0.95, 0.05, 0.25),
    )
    received = Received.MASKED  # the pruned channels arrive as zeros, the kept ones as they were

    def __init__(self, *, strength: float, split: Split) -> None:
        super().__init__(strength=strength, split=split)
        ranking = self._calibration("channel_ranking")  # most important first
        channels = split.activation_shape[0]
        self.k = max(1, channels - round(self.strength * channels))
        self.kept = np.sort(np.asarray(ranking[: self.k], np.int32))  # in channel order, as the tail has them

    def apply(self, activation, rng):
        kept = np.broadcast_to(self.kept, (len(activation), self.k))
        return {"activation": np.ascontiguousarray(activation[:, self.kept]), "channels": kept}, {}


# A defence from outside the repository registers here with one line, `register_defence(TheDefence)`, in a module that
# SPLITLEAK_DEFENCES names (splitleak.core.plugins).
DEFENCES: Registry[type[Defence]] = Registry(
    "defence",
    Defence,
    {"name": str, "strengths": Strengths},
    (
        NoDefence,
        GaussianNoise,
        LaplaceNoise,
        Dropout,
        ChannelDropout,
        HalfPrecision,
        Quantise,
        QuantisePerChannel,
        TopK,
    ),
    variable="SPLITLEAK_DEFENCES",
)
register_defence = DEFENCES.register


def build(name: str, *, strength: float | None = None, split: Split) -> Defence:
    """The defence `name` at `strength` (its default where it has one) for activations at `split`."""
    if name not in DEFENCES:
        raise KeyError(f"unknown defence {name!r}; defences: {', '.join(DEFENCES)}")
    cls = DEFENCES[name]
    if strength is None:
        if cls.strengths.default is None:
            raise ValueError(f"{name} needs a strength: {cls.strengths.describe()}")
        strength = cls.strengths.default
    return cls(strength=strength, split=split)


def as_received(defence: Defence, activation: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`activation` sent through `defence` and restored as the cloud restores it: what a tap on the cloud sees, and
    what an attacker who knows the defence trains on."""
    tensors, form = defence.apply(activation, rng)
    return restore(tensors, form, shape=defence.split.activation_shape)


# The quantiser and its inverse.


def quantise(activation: np.ndarray, *, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 (B, C, ...) -> levels uint8 (B, C, ...), scale float32 (B, G), zero_point uint8 (B, G); G = 1 or C."""
    top = 2**bits - 1
    # float64 inside, against the float32 scale that is sent, so the levels fit the scale the cloud will use.
    shape = (*activation.shape[:2], -1) if per_channel else (len(activation), 1, -1)
    groups = activation.reshape(shape).astype(np.float64)
    # The range always holds 0, so that zero_point is a level and zeros come back exact.
    lo, hi = np.minimum(groups.min(-1), 0), np.maximum(groups.max(-1), 0)
    scale = ((hi - lo) / top).astype(np.float32)
    scale[scale == 0] = 1  # an all-zero group (or one below float32's range): any scale will do
    step = scale.astype(np.float64)
    zero_point = np.clip(np.round(-lo / step), 0, top)
    levels = np.clip(np.round(groups / step[..., None]) + zero_point[..., None], 0, top).astype(np.uint8)
    return levels.reshape(activation.shape), scale, zero_point.astype(np.uint8)


def dequantise(levels: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """levels (B, C, ...), scale and zero_point (B, 1) or (B, C) -> float32 (B, C, ...)."""
    groups = levels.reshape(*scale.shape, -1).astype(np.float32)
    return ((groups - zero_point[..., None].astype(np.float32)) * scale[..., None]).reshape(levels.shape)


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels (B, n), each < 2**bits -> (B, ceil(n * bits / 8)): a most-significant-bit-first stream per row."""
    planes = np.unpackbits(levels[..., None], axis=-1)[..., 8 - bits :]  # (B, n, bits)
    return np.packbits(planes.reshape(len(levels), -1), axis=-1)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack`: (B, ceil(count * bits / 8)) -> uint8 levels (B, count)."""
    planes = np.unpackbits(packed, axis=-1, count=count * bits).reshape(len(packed), count, bits)
    return np.packbits(planes, axis=-1)[..., 0] >> (8 - bits)


def packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def restore(tensors: Mapping[str, np.ndarray], parameters: Mapping, *, shape: tuple[int, ...]) -> np.ndarray:
    """A request's tensors -> the float32 activation (B, *shape) the tail takes; RestoreError if no form fits."""
    activation = tensors["activation"]
    batch = len(activation)
    sent_shape = shape
    channels = tensors.get("channels")
    if channels is not None:
        if channels.dtype != np.int32 or channels.ndim != 2 or len(channels) != batch:
            raise RestoreError(f"'channels' is {_describe(channels)}; expected INT32 [{batch}, k]")
        k = channels.shape[1]
        if not 1 <= k <= shape[0] or ((channels < 0) | (channels >= shape[0])).any():
            raise RestoreError(f"'channels' must name 1 to {shape[0]} channels, each in [0, {shape[0]})")
        if (np.diff(np.sort(channels, axis=1), axis=1) == 0).any():
            raise RestoreError("'channels' names a channel twice")
        sent_shape = (k, *shape[1:])

    quantised = "scale" in tensors or "zero_point" in tensors
    if activation.dtype in (np.float32, np.float16):
        if quantised:
            raise RestoreError(f"'scale' and 'zero_point' go with UINT8 levels, not {_describe(activation)}")
        if activation.shape[1:] != sent_shape:
            raise RestoreError(f"got shape {list(activation.shape)} for 'activation'")
        values = activation.astype(np.float32, copy=False)
    elif activation.dtype == np.uint8:
        values = _dequantise_request(tensors, parameters, batch, sent_shape)
    else:
        raise RestoreError(f"'activation' is {_describe(activation)}")

    if channels is None:
        return values
    full = np.zeros((batch, *shape), np.float32)
    full[np.arange(batch)[:, None], channels] = values
    return full


def _dequantise_request(tensors: Mapping[str, np.ndarray], parameters: Mapping, batch: int, shape) -> np.ndarray:
    bits = parameters.get("bits", 8)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise RestoreError(f"request parameter 'bits' is {bits!r}; expected an integer from 1 to 8")
    activation = tensors["activation"]
    count = math.prod(shape)
    expected = (batch, *shape) if bits == 8 else (batch, packed_size(count, bits))
    if activation.shape != expected:
        raise RestoreError(
            f"got shape {list(activation.shape)} for {bits}-bit UINT8 'activation'; expected {list(expected)}"
        )
    scale, zero_point = tensors.get("scale"), tensors.get("zero_point")
    if scale is None or zero_point is None:
        raise RestoreError("UINT8 'activation' needs inputs 'scale' (FP32) and 'zero_point' (UINT8)")
    groups = [[batch, 1], [batch, shape[0]]]
    if scale.dtype != np.float32 or list(scale.shape) not in groups:
        raise RestoreError(f"'scale' is {_describe(scale)}; expected FP32 {groups[0]} or {groups[1]}")
    if zero_point.dtype != np.uint8 or zero_point.shape != scale.shape:
        raise RestoreError(f"'zero_point' is {_describe(zero_point)}; expected UINT8 {list(scale.shape)} like 'scale'")
    if not (np.isfinite(scale) & (scale > 0)).all():
        raise RestoreError("'scale' must be positive and finite")
    if (zero_point >= 2**bits).any():
        raise RestoreError(f"'zero_point' must be a {bits}-bit level, below {2**bits}")
    levels = activation if bits == 8 else unpack(activation, bits, count).reshape(batch, *shape)
    return dequantise(levels, scale, zero_point)


def _describe(array: np.ndarray) -> str:
    names = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8", "int32": "INT32"}
    return f"{names.get(array.dtype.name, array.dtype.name)} {list(array.shape)}"


def forms(shape: tuple[int, ...]) -> str:
    """The defended forms `restore` accepts, in words, for the cloud's error messages."""
    c, count = shape[0], math.prod(shape)
    return (
        f"FP16 of that shape; UINT8 levels of that shape, or packed to [-1, ceil({count} * bits / 8)] with request "
        f"parameter 'bits' (1 to 7), with inputs 'scale' (FP32) and 'zero_point' (UINT8) of shape [-1, 1] or "
        f"[-1, {c}]; any of these with only k of the {c} channels and an input 'channels' (INT32 [-1, k]) naming them"
    )
