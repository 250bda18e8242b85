"""Training objectives: the task's loss, and training-time defences that make a model's activation at one split point
leak less. Each is picked by name; called on a batch (x, labels), it returns (loss, its own term for the log).

- `none`: no defence, the label-smoothed cross-entropy of the model's prediction; what `splitleak train` trains with.

`splitleak train --defence NAME --strength S --split SPLIT [--from-checkpoint]` trains with one of the defences
instead; `splitleak export --checkpoint PATH` then writes the defended variant with a `training_defence` record in its
manifest (name, strength, split, from, epochs). Both change the head's weights, so unlike the run-time defences
(splitleak.core.defences) they ship as a model of their own, and cost nothing at run time.

- `nopeek`: Vepakomma, Singh, Gupta and Raskar, "NoPeek: Information leakage reduction to share activations in
  distributed deep learning" (ICDMW 2020), Eq. 1: loss = CE(tail(head(x)), y) + alpha * dCor(x, head(x)) over each
  batch, with dCor the sample distance correlation of Székely, Rizzo and Bakirov, "Measuring and testing dependence by
  correlation of distances" (Ann. Statist. 2007), Definition 4 with the double-centred distance matrices of Eq. 2.8.
- `adversarial`: adversarial training against an inverse network, as in Li et al., "DeepObfuscator" (2019) and the
  adversarial defence He et al. evaluate: each step first trains a decoder g (activation -> image, MSE, the same
  network the `decoder` attack trains) for DECODER_STEPS Adam steps on the head as it stands, then trains head and
  tail together on loss = CE(tail(head(x)), y) - lambda * MSE(g(head(x)), x). The head learns to defeat the decoder
  while the tail keeps the task. The decoder stays behind: an attacker trains a fresh one (the sweep does), which is
  the fair test; the training decoder's own MSE says little (see DECODER_STEPS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitleak.model import zoo
from splitleak.model.inverse import build_decoder

DECODER_WIDTH = 64  # the `decoder` attack's default, so the head trains against as strong a decoder as it will meet
DECODER_LR = 1e-3
# Decoder steps per model step. With one, the head outruns the decoder: on the tests' tiny ResNet-20 it drove that
# decoder's MSE to a blank guess's (0.06) at lambda 20 and 100 while a fresh decoder inverted it as well as the
# undefended head (0.008). With three, lambda 5 raised a fresh decoder's MSE from 0.0083 to 0.0112 at equal accuracy.
DECODER_STEPS = 3


def pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of z (n, d) -> (n, n), with a gradient that stays finite on the diagonal."""
    squared = z.pow(2).sum(1)
    d2 = squared[:, None] + squared[None, :] - 2 * z @ z.T  # (n, n); d*n^2 work instead of n^2 * d memory
    # sqrt has an infinite slope at 0: the clamp keeps it finite and the mask zeroes the diagonal, gradient included.
    off_diagonal = 1 - torch.eye(len(z), dtype=z.dtype, device=z.device)
    return d2.clamp_min(1e-12).sqrt() * off_diagonal


def double_centred(d: torch.Tensor) -> torch.Tensor:
    """A_kl = a_kl - mean_k - mean_l + grand mean (Székely et al. 2007, Eq. 2.8)."""
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation dCor_n(x, y) of two batches of n samples (n, ...), each flattened per sample.

    In [0, 1]: 1 when y is a similarity transform of x (e.g. y = a x + b), near 0 for independent samples as n grows.
    dCor^2 = dCov^2(x, y) / sqrt(dVar^2(x) dVar^2(y)), with dCov^2(x, y) = mean(A * B) (Székely et al., Definition 4).
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"distance correlation needs two batches of the same size, at least 2: {len(x)}, {len(y)}")
    a, b = (double_centred(pairwise_distances(t.flatten(1))) for t in (x, y))
    dcov2, dvar2_x, dvar2_y = (a * b).mean(), (a * a).mean(), (b * b).mean()
    dcor2 = dcov2 / (dvar2_x * dvar2_y).sqrt().clamp_min(1e-12)
    return dcor2.clamp_min(1e-12).sqrt()


@torch.no_grad()
def activation_dcor(model: nn.Sequential, split: str, x: torch.Tensor, batch_size: int = 256) -> float:
    """Mean dCor between input and activation at `split` over batches of `batch_size` of x (the model in eval mode)."""
    head = zoo.split(model.eval(), split)[0]
    batches = [x[i : i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    return float(torch.stack([distance_correlation(b, head(b)) for b in batches]).mean())


class Objective:
    """The task's loss, label-smoothed cross-entropy: training without a defence (`none`). Every objective takes the
    same knobs: the `split` point a defence protects (None for `none`) and the `strength` of its term in the loss,
    `mean` and `std` (C,) that turn normalised inputs back into images, and the `input_shape` (C, H, W)."""

    def __init__(
        self,
        model: nn.Sequential,
        *,
        split: str | None,
        strength: float,
        label_smoothing: float,
        mean: torch.Tensor,
        std: torch.Tensor,
        input_shape: tuple[int, int, int],
    ) -> None:
        if strength < 0:
            raise ValueError(f"a training-time defence's strength is a weight in the loss, >= 0, not {strength}")
        self.model = model
        self.split = split
        self.strength = strength
        self.label_smoothing = label_smoothing
        self.mean, self.std = mean[:, None, None], std[:, None, None]
        self.input_shape = input_shape

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return self.task_loss(self.model(x), labels), {}


class SplitObjective(Objective):
    """A defence at one split point: the task's loss of the model split there, to which the defence adds its term."""

    def __init__(self, model: nn.Sequential, **knobs) -> None:
        super().__init__(model, **knobs)
        self.head, self.tail = zoo.split(model, self.split)


class NoPeek(SplitObjective):
    """loss = CE + alpha * dCor(x, head(x)) (Vepakomma et al. 2020, Eq. 1)."""

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        activation = self.head(x)
        dcor = distance_correlation(x, activation)
        return self.task_loss(self.tail(activation), labels) + self.strength * dcor, {"dcor": dcor.item()}


class AdversarialTraining(SplitObjective):
    """DECODER_STEPS decoder steps on the head as it stands, then loss = CE - lambda * MSE(decoder(head(x)), image)."""

    def __init__(self, model: nn.Sequential, **knobs) -> None:
        super().__init__(model, **knobs)
        channels, height, width = self.input_shape
        activation_shape = tuple(self.head(torch.zeros(2, *self.input_shape)).shape[1:])
        self.decoder = build_decoder(activation_shape, (height, width, channels), DECODER_WIDTH)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=DECODER_LR)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        images = (x * self.std + self.mean).clamp(0, 1)  # (B, C, H, W) in [0, 1], what the decoder reconstructs
        activation = self.head(x)
        self.decoder.train()
        for _ in range(DECODER_STEPS):
            decoder_loss = F.mse_loss(self.decoder(activation.detach()), images)
            self.optimizer.zero_grad(set_to_none=True)
            decoder_loss.backward()
            self.optimizer.step()
        # The decoder's gradients from this term are dropped by its next zero_grad; only the model's optimizer steps.
        reconstruction_error = F.mse_loss(self.decoder(activation), images)
        loss = self.task_loss(self.tail(activation), labels) - self.strength * reconstruction_error
        return loss, {"decoder_mse": reconstruction_error.item()}


OBJECTIVES = {"none": Objective, "nopeek": NoPeek, "adversarial": AdversarialTraining}
DEFENCES = tuple(name for name in OBJECTIVES if name != "none")  # what `splitleak train --defence` offers


def build(name: str, model: nn.Sequential, **knobs) -> Objective:
    """The objective `name` with Objective's knobs: called on a batch (x, labels), it returns (loss, the defence's term
    for the log)."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown training objective {name!r}; there are {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](model, **knobs)
