"""A DCGAN for 32x32 images (Radford et al., ICLR 2016, "Unsupervised Representation Learning with Deep
Convolutional Generative Adversarial Networks"): transposed convolutions up from a latent vector, strided convolutions
down to one logit, batch norm in both but on the discriminator's first layer, Adam with beta1 = 0.5 as the paper's
section 4 sets it (its learning rate, 2e-4, is the caller's: splitleak.model.generators trains at 5e-4). Trained with
the non-saturating loss (the generator maximises log D(G(z))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LATENT = 64  # z's size


def generator(channels: int = 1, width: int = 64) -> nn.Sequential:
    """z (B, LATENT, 1, 1) -> image (B, channels, 32, 32) in [-1, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(LATENT, width * 4, 4, 1, 0, bias=False),  # (B, 4w, 4, 4)
        nn.BatchNorm2d(width * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False),  # (B, 2w, 8, 8)
        nn.BatchNorm2d(width * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(width * 2, width, 4, 2, 1, bias=False),  # (B, w, 16, 16)
        nn.BatchNorm2d(width),
        nn.ReLU(True),
        nn.ConvTranspose2d(width, channels, 4, 2, 1),  # (B, C, 32, 32)
        nn.Tanh(),
    )


def discriminator(channels: int = 1, width: int = 64) -> nn.Sequential:
    """image (B, channels, 32, 32) -> logit (B,)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 4, 2, 1),  # (B, w, 16, 16)
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),  # (B, 2w, 8, 8)
        nn.BatchNorm2d(width * 2),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(width * 2, width * 4, 4, 2, 1, bias=False),  # (B, 4w, 4, 4)
        nn.BatchNorm2d(width * 4),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(width * 4, 1, 4, 1, 0),  # (B, 1, 1, 1)
        nn.Flatten(0),
    )


def train_step(
    g: nn.Module,
    d: nn.Module,
    g_opt: torch.optim.Optimizer,
    d_opt: torch.optim.Optimizer,
    real: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, float]:
    """One discriminator and one generator update on a batch of real images in [-1, 1]."""
    z = torch.randn(len(real), LATENT, 1, 1, generator=generator)
    fake = g(z)
    real_logit, fake_logit = d(real), d(fake.detach())
    d_loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()  # -log D(x) - log(1 - D(G(z)))
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()
    g_loss = F.softplus(-d(fake)).mean()  # -log D(G(z))
    g_opt.zero_grad(set_to_none=True)
    g_loss.backward()
    g_opt.step()
    return {"d_loss": d_loss.item(), "g_loss": g_loss.item()}


@torch.no_grad()
def sample(g: nn.Module, count: int, generator: torch.Generator) -> torch.Tensor:
    g.eval()
    return g(torch.randn(count, LATENT, 1, 1, generator=generator))
