"""An attack from outside splitleak, as a user adds one without forking: brightness read off the activation's mean
over its channels, stretched to the image's size and to the full range of grey. It trains on nothing and sees no
data: two probes of the head (pulled out of the app), a black frame and a white one, tell it which way brightness
moves the mean. It is one network, so `splitleak attacker train-decoder --attack toy-mean` exports it for the live
demo. One file, one registry line; name the module in SPLITLEAK_ATTACKS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitleak.attacker.attacks import register_attack
from splitleak.attacker.attacks.base import Attack, check_positive, query, session


class ChannelMeanNetwork(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], sign: float, gamma: float) -> None:
        super().__init__()
        self.image_shape, self.sign, self.gamma = image_shape, sign, gamma

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        x = self.sign * F.interpolate(activation.mean(1, keepdim=True), size=(h, w), mode="bilinear")  # (N, 1, H, W)
        low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        x = ((x - low) / (high - low).clamp_min(1e-6)).pow(self.gamma)
        return x.repeat(1, c, 1, 1)  # (N, C, H, W) in [0, 1]: grey


class ChannelMean(Attack):
    name = "toy-mean"
    knowledge = "The head as a black box, probed with one black and one white frame; no data."
    exportable = True

    @dataclass(frozen=True)
    class Knobs:
        gamma: float = 1.0  # the grey levels' curve: below 1 brightens

        def __post_init__(self) -> None:
            check_positive(self, "gamma")

    def __init__(self, **given) -> None:
        super().__init__(**given)
        probes = np.stack([np.zeros(self.image_shape, np.float32), np.ones(self.image_shape, np.float32)])
        black, white = query(session(self.split.head), self.manifest, probes).reshape(2, -1).mean(1)
        sign = 1.0 if white >= black else -1.0
        self._network = ChannelMeanNetwork(self.manifest.input_shape, sign, self.knobs.gamma)

    def network(self) -> nn.Module:
        return self._network

    @torch.inference_mode()
    def _invert(self, activations):
        return self._network(torch.from_numpy(activations)).permute(0, 2, 3, 1).numpy()


register_attack(ChannelMean)
