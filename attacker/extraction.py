"""Training data extraction from a generator (Carlini et al., USENIX Security 2023, "Extracting Training Data from
Diffusion Models"): generate and filter, and membership by inpainting and by the denoising loss.

Generate and filter (section 5.1): a generated image x^ is a copy of training image x when its l2 distance to x is
small against its distances to its other neighbours,

    l(x^, x; S) = l2(x^, x) / (alpha * mean_{y in S} l2(x^, y))  <  delta,

with S the n training images nearest x^ and l2 the root mean squared pixel difference in [0, 1]. The paper takes
alpha = 0.5 and n = 50; delta = 0.5 (the nearest image at most a quarter of the neighbourhood's mean distance) is
this project's choice. What counts is the number of distinct training images some sample copies, by how often each
was duplicated; the same filter against held-out images no model saw is the control, and flags only what chance does.

Membership (sections 5.2 and 5.3): half of an image is masked and the diffusion model completes it (DDIM with the
known half put back at every step); a training image's completion lies closer to the original than a held-out one's.
Beside it, the loss-threshold score: the noise-prediction error at a few low steps. Both are judged with
attacker.membership's ROC, TPR at low FPR and bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitleak.attacker.membership import judge
from splitleak.model import diffusion
from splitleak.model.generators import TrainingSet, to_unit

ALPHA = 0.5  # Carlini et al.'s alpha
NEIGHBOURS = 50  # their n
DELTA = 0.5  # flagged below this; ours
RESAMPLE = 5  # RePaint's resampling per DDIM step, when completing a masked image
LOSS_STEPS = (25, 50, 100, 200)  # the denoising-loss score's steps: low ones, where memorisation shows (section 5.2)


@dataclass(frozen=True)
class Extraction:
    """Generated images against a set of reference images."""

    nearest: np.ndarray  # (S,) the index of each sample's nearest reference image
    distance: np.ndarray  # (S,) the l2 distance to it (RMS in [0, 1])
    ratio: np.ndarray  # (S,) l(x^, x; S)
    flagged: np.ndarray  # (S,) bool: ratio < delta

    def extracted(self) -> np.ndarray:
        """The distinct reference images some sample copies, sorted."""
        return np.unique(self.nearest[self.flagged])

    def summary(self, copies: np.ndarray, canary: np.ndarray | None = None) -> dict:
        """The counts to report: samples flagged, and distinct images extracted by duplicate count (`copies`: how
        often each reference image was in the training set); canaries (`canary`, a mask) are counted apart."""
        hit = np.zeros(len(copies), bool)
        hit[self.extracted()] = True
        canary = np.zeros(len(copies), bool) if canary is None else canary
        canaries = (
            {"canaries": {"images": int(canary.sum()), "extracted": int(hit[canary].sum())}} if canary.any() else {}
        )
        all_copies = np.where(canary, -1, copies)
        hit, copies = hit[~canary], copies[~canary]
        return canaries | {
            "flagged_samples": int(self.flagged.sum()),
            "extracted": int(hit.sum()),
            # How near the filter came, for a model that copies nothing outright: the lowest ratio, and the median
            # distance from a sample to its nearest image (lower against the training set than the control's: the
            # samples lean towards what the model saw).
            "ratio_min": float(self.ratio.min()),
            "distance_median": float(np.median(self.distance)),
            # Where the samples lean: the share whose nearest image has each duplicate count (canaries apart). A
            # model that spreads its samples over the distinct images gives each count its share of the images; one
            # that follows its training examples, its share of the copies.
            "nearest_by_copies": {
                str(int(c)): float(np.mean(all_copies[self.nearest] == c)) for c in np.unique(all_copies[~canary])
            },
            "by_copies": {
                str(int(c)): {"images": int((copies == c).sum()), "extracted": int(hit[copies == c].sum())}
                for c in np.unique(copies)
            },
        }


def distances(samples: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(S, R) RMS pixel differences in [0, 1] between uint8 images (S, H, W, C) and (R, H, W, C)."""
    a = samples.reshape(len(samples), -1).astype(np.float64) / 255
    b = references.reshape(len(references), -1).astype(np.float64) / 255
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0) / a.shape[1])


def extract(
    samples: np.ndarray,
    references: np.ndarray,
    *,
    alpha: float = ALPHA,
    neighbours: int = NEIGHBOURS,
    delta: float = DELTA,
) -> Extraction:
    """Which samples the filter flags as copies of which of `references` (distinct images: a duplicate among them
    would be its own copy's neighbour at distance 0)."""
    d = distances(samples, references)
    n = min(neighbours, len(references))
    nearest_n = np.sort(d, 1)[:, :n]
    ratio = nearest_n[:, 0] / (alpha * np.maximum(nearest_n.mean(1), 1e-12))
    return Extraction(d.argmin(1), nearest_n[:, 0], ratio, ratio < delta)


@torch.no_grad()
def completion_error(
    model: nn.Module, images: np.ndarray, *, ddim_steps: int, seed: int, resample: int = RESAMPLE
) -> np.ndarray:
    """(N,) the mean squared error, over the masked bottom half, of the diffusion model's completion of each image
    from its top half."""
    x0 = to_unit(images)
    mask = torch.ones_like(x0[:1])
    mask[..., x0.shape[-2] // 2 :, :] = 0  # known: the top half
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    done = diffusion.ddim(model, noise, steps=ddim_steps, known=x0, mask=mask, resample=resample, generator=generator)
    return ((done - x0) ** 2 * (1 - mask)).flatten(1).sum(1).div((1 - mask).sum()).numpy()


def membership(
    model: nn.Module, ts: TrainingSet, *, members: int, ddim_steps: int, seed: int = 0, resamples: int = 200
) -> dict[str, dict]:
    """Inpainting and denoising-loss membership on `members` training images against as many held-out ones:
    {score name: attacker.membership.Result as a dict}."""
    rng = np.random.default_rng(seed)
    n = min(members, len(ts.images), len(ts.held_out))
    images = np.concatenate(
        [ts.images[rng.choice(len(ts.images), n, replace=False)], ts.held_out[rng.choice(len(ts.held_out), n, False)]]
    )
    is_member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    scores = {
        "inpainting": -completion_error(model, images, ddim_steps=ddim_steps, seed=seed),
        "denoising loss": -diffusion.denoising_loss(model, to_unit(images), steps=LOSS_STEPS, seed=seed).numpy(),
    }
    return {name: asdict(judge(name, s, is_member, resamples=resamples, seed=seed)) for name, s in scores.items()}


def grid(
    samples: np.ndarray,
    references: np.ndarray,
    found: Extraction,
    out: Path,
    *,
    pairs: int = 8,
    reference_name: str = "training",
) -> None:
    """A PNG of the `pairs` samples most like a reference image (lowest ratio), each above its nearest reference image,
    with the ratio and the distance under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(found.ratio)[:pairs]
    fig, axes = plt.subplots(2, len(order), figsize=(1.1 * len(order), 2.6), squeeze=False)
    grey = samples.shape[-1] == 1
    for col, i in enumerate(order):
        for row, image in enumerate((samples[i], references[found.nearest[i]])):
            ax = axes[row, col]
            ax.imshow(image.squeeze(-1) if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[1, col].set_xlabel(f"{found.ratio[i]:.2f}\n{found.distance[i]:.3f}", fontsize=7)
    axes[0, 0].set_ylabel("generated", fontsize=7)
    axes[1, 0].set_ylabel(f"nearest\n{reference_name}", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(out, dpi=100)
    plt.close(fig)
