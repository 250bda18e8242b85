"""A small denoising diffusion model: a U-Net that predicts the noise, DDPM training, DDIM sampling and inpainting.

DDPM (Ho et al., NeurIPS 2020, "Denoising Diffusion Probabilistic Models"): images x0 in [-1, 1] are noised as
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps over T = 1000 steps of a linear beta schedule (1e-4 to 0.02), and the
network learns eps from (x_t, t) under a plain mean squared error (the paper's L_simple, eq. 14). Sampling is DDIM's
deterministic update (Song et al., ICLR 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma = 0) on a
subsequence of the T steps, which is what makes sampling hundreds of images affordable on a CPU.

Inpainting, as Carlini et al. (USENIX Security 2023, section 5.3) use it to extract a training image from a fragment:
every DDIM step, the known pixels are put back as the forward process would have noised them at that step (the
replacement method of RePaint, Lugmayr et al. 2022, without its resampling), so only the masked part is generated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 1000  # T, the forward process's length


def alphas_bar(steps: int = STEPS) -> torch.Tensor:
    """(T,) abar_t = prod_{s<=t} (1 - beta_s) for DDPM's linear schedule."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, steps, dtype=torch.float64), 0).float()


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of the step (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class UNet(nn.Module):
    """eps_theta(x_t, t) for 32x32 images: three resolutions (32, 16, 8) of `width` x (1, 2, 2) channels, one residual
    block per level on the way down and two on the way up, skip connections between them; no attention (at this
    size it costs more CPU time than it gives)."""

    def __init__(self, channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.tdim = width * 4
        self.time = nn.Sequential(nn.Linear(width, self.tdim), nn.SiLU(), nn.Linear(self.tdim, self.tdim))
        widths = (width, width * 2, width * 2)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        cin = width
        for i, w in enumerate(widths):
            self.down.append(ResBlock(cin, w, self.tdim))
            self.pool.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            cin = w
        self.middle = ResBlock(cin, cin, self.tdim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up.append(nn.ModuleList([ResBlock(cin + w, w, self.tdim), ResBlock(w, w, self.tdim)]))
            self.upsample.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
            cin = w
        self.out = nn.Sequential(nn.GroupNorm(8, cin), nn.SiLU(), nn.Conv2d(cin, channels, 3, padding=1))
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time(time_embedding(t, self.width))
        h = self.stem(x)
        skips = []
        for block, pool in zip(self.down, self.pool, strict=True):
            h = block(h, temb)
            skips.append(h)  # (B, w, 32 / 2^i, 32 / 2^i)
            h = pool(h)
        h = self.middle(h, temb)
        for (first, second), upsample in zip(self.up, self.upsample, strict=True):
            h = second(first(torch.cat([h, skips.pop()], 1), temb), temb)
            h = upsample(h)
        return self.out(h)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    a = abar[t][:, None, None, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def training_loss(model: nn.Module, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """L_simple on a batch x0 (B, C, H, W) in [-1, 1]: a uniform step and Gaussian noise per image."""
    abar = alphas_bar()
    t = torch.randint(0, STEPS, (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return F.mse_loss(model(noised(x0, t, eps, abar), t), eps)


@torch.no_grad()
def denoising_loss(model: nn.Module, x0: torch.Tensor, *, steps: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(N,) the noise-prediction error on each image, averaged over the given steps, with the same noise for every
    image set: Carlini et al.'s loss-threshold membership score (section 5.2; low steps separate members best)."""
    abar = alphas_bar()
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(len(x0))
    for step in steps:
        eps = torch.randn(x0.shape[1:], generator=generator).expand_as(x0)
        t = torch.full((len(x0),), step, dtype=torch.long)
        total += (model(noised(x0, t, eps, abar), t) - eps).pow(2).flatten(1).mean(1)
    return total / len(steps)


@torch.no_grad()
def ddim(
    model: nn.Module,
    x: torch.Tensor,
    *,
    steps: int = 50,
    known: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    resample: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run DDIM (eta = 0) from pure noise x (B, C, H, W) to images in [-1, 1] over `steps` evenly spaced steps.

    With `known` (B, C, H, W) and `mask` (1 where a pixel is known; broadcastable), the known pixels are replaced by
    their forward-noised values at every step (inpainting), and each step is taken `resample` times, noised back to
    its start in between (RePaint's resampling): without it the generated half commits to an image early, from noise
    alone, and the known half, noised afresh every step, cannot pull it back (even the exact denoiser of a training set
    completes most of its own images wrongly). `generator` draws that noise."""
    abar = alphas_bar()
    ts = torch.linspace(STEPS - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        for r in range(resample if known is not None else 1):
            if r:  # back from the step's end to its start: q(x_t | x_prev)
                x = (a_t / a_prev).sqrt() * x + (1 - a_t / a_prev).sqrt() * torch.randn(x.shape, generator=generator)
            if known is not None:
                eps_known = torch.randn(known.shape, generator=generator)
                x = mask * noised(known, torch.full((len(x),), t), eps_known, abar) + (1 - mask) * x
            eps = model(x, torch.full((len(x),), t, dtype=torch.long))
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            x_next = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        x = x_next
    if known is not None:
        x = mask * known + (1 - mask) * x
    return x.clamp(-1, 1)
