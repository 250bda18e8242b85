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
defence is no secret) and models it. A defence that zeroes part of the activation (dropout, channel dropout, top-k
pruning: splitleak.core.defences) leaves the other elements as they were, dropout scaled by 1 / (1 - p): the distance
then counts only the elements that arrived non-zero, against the head's output scaled the same way, so the optimiser
is not asked to make the image produce zeros where the defence, not the image, put them. Against noise the plain
squared distance is already the maximum-likelihood fit for Gaussian noise, and quantised activations arrive restored
to within one step, so the same loss serves.
"""

from __future__ import annotations

import numpy as np
import onnx2torch
import torch

from splitleak.attacker.attacks.base import Attack, check_positive
from splitleak.core import defences
from splitleak.core.manifest import Manifest


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Eq. 3b with beta = 1, averaged over pixels and channels: (N, C, H, W) -> (N,)."""
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    return (dy.square() + dx.square() + 1e-8).sqrt().flatten(1).mean(1)  # 1e-8: a gradient where the image is flat


class RegularizedMLE(Attack):
    name = "rmle"
    knowledge = "The head's architecture and weights (its ONNX file, pulled out of the app): white box."

    def __init__(
        self,
        *,
        manifest: Manifest,
        split: str,
        steps: int = 5000,
        lr: float = 0.01,
        tv_weight: float = 0.0,
        batch_size: int = 64,
        defence: str = "none",
        strength: float | None = None,
    ) -> None:
        super().__init__(manifest=manifest, split=split)
        check_positive(steps=steps, lr=lr, batch_size=batch_size)
        if tv_weight < 0:
            raise ValueError(f"tv_weight must be at least 0, not {tv_weight!r}")
        self.steps, self.lr, self.tv_weight, self.batch_size = steps, lr, tv_weight, batch_size
        self.defence = defences.build(defence, strength=strength, split=self.split)
        self.head = onnx2torch.convert(str(self.split.head)).eval()
        self.head.requires_grad_(False)
        self.mean = torch.from_numpy(manifest.mean)[:, None, None]
        self.std = torch.from_numpy(manifest.std)[:, None, None]

    def _invert(self, activations: np.ndarray) -> np.ndarray:
        # Each image's loss is its own mean (summed over the batch), so a frame's reconstruction does not depend on
        # which frames share its batch: batch_size trades memory for speed only.
        return np.concatenate(
            [
                self._reconstruct(torch.from_numpy(activations[i : i + self.batch_size]))
                for i in range(0, len(activations), self.batch_size)
            ]
        )

    def _reconstruct(self, target: torch.Tensor) -> np.ndarray:
        c, h, w = self.manifest.input_shape
        x = torch.full((len(target), c, h, w), 0.5, requires_grad=True)  # (N, C, H, W) in [0, 1]: constant grey
        optimizer = torch.optim.Adam([x], lr=self.lr, amsgrad=True)
        # What dropout (channel dropout too) and top-k zero is the defence's doing, not the image's.
        zeroing = isinstance(self.defence, defences.Dropout | defences.TopK)
        weight = (target != 0).float() if zeroing else torch.ones_like(target)
        weight = weight / weight.flatten(1).sum(1).clamp(min=1).view(-1, *[1] * (target.dim() - 1))
        scale = 1 / (1 - self.defence.strength) if isinstance(self.defence, defences.Dropout) else 1.0
        for _ in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            predicted = self.head((x - self.mean) / self.std) * scale
            distance = ((predicted - target).square() * weight).flatten(1).sum(1)
            loss = (distance + self.tv_weight * total_variation(x)).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
        return x.detach().permute(0, 2, 3, 1).numpy()
