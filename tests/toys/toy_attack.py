"""An attack from outside splitleak, as a user adds one without forking: brightness read off the activation as a
weighted sum of its channels, stretched to the image's size and to the full range of grey. It trains on nothing and
sees no data: two probes of the head (pulled out of the app), a black frame and a white one, give each channel its
weight, how far brightness moves that channel's mean. It is one network, so `splitleak attacker train-decoder
--attack toy-mean` exports it for the live demo. One file, one registry line; name the module in SPLITLEAK_ATTACKS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from splitleak.attacker.attacks import register_attack
from splitleak.attacker.attacks.base import Attack, check_positive, query, session


class WeightedChannelMean(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], weights: torch.Tensor, gamma: float) -> None:
        super().__init__()
        self.image_shape, self.gamma = image_shape, gamma
        self.register_buffer("weights", weights[None, :, None, None])  # (1, C, 1, 1)

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        c, h, w = self.image_shape
        brightness = (activation * self.weights).sum(1, keepdim=True)  # (N, 1, h, w)
        x = F.interpolate(brightness, size=(h, w), mode="bilinear")  # (N, 1, H, W)
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
        black, white = query(session(self.split.head), self.manifest, probes)  # (C, ...) each
        weights = (white - black).reshape(len(white), -1).mean(1)  # (C,)
        weights = torch.from_numpy(weights / max(np.abs(weights).sum(), 1e-12)).float()
        self._network = WeightedChannelMean(self.manifest.input_shape, weights, self.knobs.gamma)

    def network(self) -> nn.Module:
        return self._network

    @torch.inference_mode()
    def _invert(self, activations):
        return self._network(torch.from_numpy(activations)).permute(0, 2, 3, 1).numpy()


register_attack(ChannelMean)
