"""What the page is sent, as plain JSON: the choices it offers, and each frame with what the attacker made of it.

Pictures travel as raw bytes in base64 with their shape (`{"shape": [H, W, C], "data": ...}`): the page draws them
on a canvas pixel for pixel, so nothing is compressed here, and at a few kilobytes a frame nothing needs to be.
"""

from __future__ import annotations

import base64
import dataclasses

import numpy as np

from splitleak.attacker import live
from splitleak.core import data, defences, link
from splitleak.core.facts import RECOGNISABLE_SSIM
from splitleak.core.manifest import Manifest
from splitleak.core.records import STAGES, FrameRecord

HEAT_MAPS = 4  # activation channels shown


def array(values: np.ndarray) -> dict:
    return {"shape": list(values.shape), "data": base64.b64encode(np.ascontiguousarray(values).tobytes()).decode()}


def image(picture: np.ndarray) -> dict:
    """uint8 (H, W, C), or float in [0, 1]."""
    if picture.dtype != np.uint8:
        picture = np.round(np.clip(picture, 0, 1) * 255).astype(np.uint8)
    return array(picture)


def config(
    m: Manifest,
    *,
    dataset: str,
    attacks: dict[str, dict[str, live.ExportedInverse]],
    gallery: data.Dataset | None,
    identity_note: str | None = None,
    wire: str | None = None,
    start: dict,
) -> dict:
    """What does not change while the demo runs: the choices the page offers, and what each means.

    With a `gallery`, the page names who is in each frame; without one, `identity_note` says why it cannot. `wire`
    says who can read the channel, when TLS is on."""
    return {
        "model": m.name,
        "dataset": dataset,
        "classes": list(m.classes),
        "splits": {
            name: {"shape": list(split.activation_shape), "bytes": split.activation_bytes}
            for name, split in m.splits.items()
        },
        "links": {name: profile.describe() for name, profile in link.PROFILES.items()},
        # Each defence's slider is what its class declares (splitleak.core.defences.Strengths); None: no slider.
        "defences": {
            name: {
                "means": cls.strengths.describe(),
                "default": cls.strengths.default,
                "slider": None if cls.strengths.slider is None else dataclasses.asdict(cls.strengths.slider),
            }
            for name, cls in defences.DEFENCES.items()
        },
        "attacks": {
            name: {
                "knowledge": next(iter(by_split.values())).metadata["knowledge"],
                "held_out": {
                    split: {"psnr": float(inverse.metadata["psnr"]), "ssim": float(inverse.metadata["ssim"])}
                    for split, inverse in by_split.items()
                },
            }
            for name, by_split in attacks.items()
        },
        "stages": [stage for stage in STAGES if stage != "total"],
        "recognisable_ssim": RECOGNISABLE_SSIM,
        "wire": wire,
        "people": None if gallery is None else people(gallery),
        "identity_note": identity_note,
        "start": start,
    }


def people(gallery: data.Dataset) -> list[dict]:
    """One photo of each person in the gallery, in label order, to show whom the attacker takes a frame for."""
    first = {int(label): i for i, label in reversed(list(enumerate(gallery.labels)))}
    return [{"name": name, "photo": image(gallery.images[first[k]])} for k, name in enumerate(gallery.classes)]


def busiest_channels(activation: np.ndarray) -> np.ndarray:
    """The HEAT_MAPS channels of (C, h, w) that vary most, in channel order."""
    spread = activation.reshape(len(activation), -1).var(1)
    return np.sort(np.argsort(-spread, kind="stable")[:HEAT_MAPS])


def frame(got: live.Interception, classes: tuple[str, ...], channels: np.ndarray) -> dict:
    """One intercepted frame, its activation's `channels` as heat maps, and every attack's reconstruction."""
    maps = got.activation[channels]  # (k, h, w)
    low, high = maps.min((1, 2), keepdims=True), maps.max((1, 2), keepdims=True)
    maps = np.round(255 * (maps - low) / np.maximum(high - low, 1e-12)).astype(np.uint8)
    return {
        "device_send_ns": int(got.parameters.get("device_send_ns", got.captured_ns)),
        "frame_id": got.frame_id,
        "split": got.split,
        "defence": got.parameters.get("defence", "none"),
        "strength": got.parameters.get("defence_strength", 0.0),
        "original": None if got.original is None else image(got.original),
        "identity": got.identity,
        "activation": {"shape": list(got.activation.shape), "channels": channels.tolist(), "maps": array(maps)},
        "attacks": {
            name: {
                "image": image(result["reconstruction"]),
                "psnr": result["psnr"],
                "ssim": result["ssim"],
                "label": classes[result["label"]],
                "identity": result["identity"],
            }
            for name, result in got.attacks.items()
        },
        "ssim": {name: result["ssim"] for name, result in got.attacks.items()},
        "record": None,
    }


def join(view: dict, record: FrameRecord, classes: tuple[str, ...]) -> dict:
    """The frame with the device's record of it, as the device writes it (the page shows its stage times, bytes and
    link), but with the cloud's answer and the truth as class names."""
    prediction = classes[record.prediction] if record.prediction is not None else None
    label = classes[record.label] if record.label >= 0 else None
    joined = dict(view, record=record.to_json() | {"prediction": prediction, "label": label})
    joined["attacks"] = {name: dict(a, same=a["label"] == prediction) for name, a in view["attacks"].items()}
    return joined
