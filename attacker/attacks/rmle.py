"""`rmle`: white-box regularised maximum likelihood estimation of the input.

He, Zhang and Lee, "Model inversion attacks against collaborative inference" (ACSAC 2019), Section 4.1, Eq. 3 and
Algorithm 1: find the image whose activation matches the intercepted one v,

    x* = argmin_x ||head(x) - v||_2^2 + lambda * TV(x)
    TV(x) = sum_ij (|x[i+1, j] - x[i, j]|^2 + |x[i, j+1] - x[i, j]|^2)^(beta / 2)

by Adam (AMSGrad, as in the authors' code) from a constant grey image (0.5 in every channel), beta = 1 as in the
paper. Two scalings differ from the equation as printed, so that one `tv_weight` suits images of any size and channel
count: the distance is the mean over the activation's elements (as in the authors' code) and TV the mean over pixels
and channels. x lives in image space, pixels in [0, 1], projected back there after every step, and is normalised with
the manifest's mean and std on its way into the head. The paper takes step size 1e-2 and 500 steps at shallow split
points, 1e-3 and 5000 at deep ones.

The attacker converts the head's ONNX file, pulled out of the app, to torch with onnx2torch to get gradients.

Against a defended device the attacker is told the defence and its strength (`defence`, `strength`; a phone app's
defence is no secret) and models it as the defence's class declares (`received`, splitleak.core.defences). Where the
defence zeroes part of the activation and leaves the rest as it was times a known scale (MASKED: dropout, channel
dropout, top-k pruning), the distance counts only the elements that arrived non-zero, against the head's output scaled
the same way, so the optimiser is not asked to make the image produce zeros where the defence, not the image, put
them. Where what arrives is the activation give or take noise or rounding (NEAR), the plain squared distance is
already the maximum-likelihood fit for Gaussian noise, and quantised activations arrive restored to within one step,
so the same loss serves. A defence that declares neither is refused: rMLE would model it wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splitleak.attacker.attacks.base import Attack, check_not_negative, check_positive, to_torch
from splitleak.core import defences


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Eq. 3b with beta = 1, averaged over pixels and channels: (N, C, H, W) -> (N,)."""
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    return (dy.square() + dx.square() + 1e-8).sqrt().flatten(1).mean(1)  # 1e-8: a gradient where the image is flat


class RegularizedMLE(Attack):
    name = "rmle"
    knowledge = "The head's architecture and weights (its ONNX file, pulled out of the app): white box."
    adaptive = True

    @dataclass(frozen=True)
    class Knobs:
        steps: int = 5000
        lr: float = 0.01
        tv_weight: float = 0.0
        batch_size: int = 64

        def __post_init__(self) -> None:
            check_positive(self, "steps", "lr", "batch_size")
            check_not_negative(self, "tv_weight")

    def __init__(self, **given) -> None:
        super().__init__(**given)
        if self.defence.received is None:
            raise ValueError(
                f"rmle cannot model the {self.defence.name} defence: its class declares no `received` form "
                "(splitleak.core.defences.Received)"
            )
        self.head = to_torch(self.split.head)
        self.head.requires_grad_(False)
        self.mean = torch.from_numpy(self.manifest.mean)[:, None, None]
        self.std = torch.from_numpy(self.manifest.std)[:, None, None]

    def _invert(self, activations: np.ndarray) -> np.ndarray:
        # Each image's loss is its own mean (summed over the batch), so a frame's reconstruction does not depend on
        # which frames share its batch: batch_size trades memory for speed only.
        return np.concatenate(
            [
                self._reconstruct(torch.from_numpy(activations[i : i + self.knobs.batch_size]))
                for i in range(0, len(activations), self.knobs.batch_size)
            ]
        )

    def _reconstruct(self, target: torch.Tensor) -> np.ndarray:
        c, h, w = self.manifest.input_shape
        x = torch.full((len(target), c, h, w), 0.5, requires_grad=True)  # (N, C, H, W) in [0, 1]: constant grey
        optimizer = torch.optim.Adam([x], lr=self.knobs.lr, amsgrad=True)
        # What a masking defence zeroed is its doing, not the image's.
        masked = self.defence.received is defences.Received.MASKED
        weight = (target != 0).float() if masked else torch.ones_like(target)
        weight = weight / weight.flatten(1).sum(1).clamp(min=1).view(-1, *[1] * (target.dim() - 1))
        scale = self.defence.kept_scale if masked else 1.0
        for _ in range(self.knobs.steps):
            optimizer.zero_grad(set_to_none=True)
            predicted = self.head((x - self.mean) / self.std) * scale
            distance = ((predicted - target).square() * weight).flatten(1).sum(1)
            loss = (distance + self.knobs.tv_weight * total_variation(x)).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        return x.detach().permute(0, 2, 3, 1).numpy()
