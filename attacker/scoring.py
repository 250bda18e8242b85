"""How much the reconstructions leak: how close they are to the originals, what the cloud sees in them, whose face.

All scores compare float images in [0, 1] (uint8 originals are divided by 255), so PSNR and SSIM take
`data_range=1.0`; an image never goes back through uint8 before it is scored.

- PSNR and SSIM per image, with scikit-image (`peak_signal_noise_ratio`, `structural_similarity` with its default
  7x7 window over each channel); their mean and standard deviation over the frames.
- `recognisable`: the share of frames with SSIM of at least 0.3, the threshold below which He, Zhang and Lee ("Model
  inversion attacks against collaborative inference", ACSAC 2019, Section 4.2) regard a reconstruction as
  unrecognisable.
- `label_leakage`: the share of frames on which the cloud's own classifier (head and tail ONNX files of the same
  split, run with ONNX Runtime) gives the reconstruction the label it gives the original.
- `identity_leakage` (face data): the share of reconstructions whose nearest neighbour in a gallery of other photos
  of the same people (the data set's train split) is the right person. Nearest in pixel space (Euclidean distance
  at the model's input size), the simplest face identifier there is, and a fair one on aligned faces like AT&T's,
  where it names the person in most test photos; `identity_baseline` is that rate for the originals themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from splitleak.core import data
from splitleak.core.facts import RECOGNISABLE_SSIM
from splitleak.core.manifest import Manifest


def as_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 in [0, 1]; float images pass through as float32."""
    return images.astype(np.float32) / 255 if images.dtype == np.uint8 else images.astype(np.float32, copy=False)


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """PSNR in dB per image, data range 1.0; inf where the two are identical."""
    originals, reconstructions = as_float(originals), as_float(reconstructions)
    with np.errstate(divide="ignore"):
        return np.array(
            [peak_signal_noise_ratio(o, r, data_range=1.0) for o, r in zip(originals, reconstructions, strict=True)]
        )


def ssim(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """SSIM per image, data range 1.0, averaged over channels for colour images."""
    originals, reconstructions = as_float(originals), as_float(reconstructions)
    channels = originals.shape[-1]
    return np.array(
        [
            structural_similarity(o, r, data_range=1.0, channel_axis=-1)
            if channels > 1
            else structural_similarity(o[..., 0], r[..., 0], data_range=1.0)
            for o, r in zip(originals, reconstructions, strict=True)
        ]
    )


def classify(manifest: Manifest, split: str, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The cloud's label for each image (uint8 or [0, 1] float, NHWC): head then tail, as served."""
    # Imported here: the attacks package loads torch, which scoring alone (the live attacker) does without.
    from splitleak.attacker.attacks.base import model_input, session

    s = manifest.split(split)
    head, tail = session(s.head), session(s.tail)
    labels = []
    for i in range(0, len(images), batch_size):
        activation = head.run(["activation"], {"image": model_input(manifest, images[i : i + batch_size])})[0]
        labels.append(tail.run(["logits"], {"activation": activation})[0].argmax(1))
    return np.concatenate(labels)


def identify(images: np.ndarray, gallery: data.Dataset) -> np.ndarray:
    """The identity (gallery label) of each image's nearest gallery photo in pixel space, at the images' size."""
    h, w, c = images.shape[1:]
    if h != w:
        raise ValueError(f"images must be square, as the model's input is, not {h}x{w}")
    reference = as_float(data.resize(gallery.images, h, c)).reshape(len(gallery), -1)  # (G, D)
    queries = as_float(images).reshape(len(images), -1)  # (N, D)
    distance = (queries**2).sum(1)[:, None] - 2 * queries @ reference.T + (reference**2).sum(1)[None, :]  # (N, G)
    return gallery.labels[distance.argmin(1)]


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    with np.errstate(invalid="ignore"):
        return float(np.mean(values)), float(np.std(values))


def score(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    *,
    manifest: Manifest,
    split: str,
    labels: np.ndarray | None = None,
    identities: np.ndarray | None = None,
    gallery: data.Dataset | None = None,
) -> dict:
    """Score reconstructions of `originals` (uint8 or [0, 1] float, NHWC, same shape).

    `labels`: the true classes of the originals, -1 where unknown, to report the cloud's accuracy on both.
    `identities` and `gallery`: who is in each original, and other photos of the same people, for identity leakage.
    Returns {"per_image": {name: array (N,)}, "summary": {name: number}}.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} differ in shape")
    per_image: dict[str, np.ndarray] = {
        "psnr": psnr(originals, reconstructions),
        "ssim": ssim(originals, reconstructions),
    }
    label_original, label_reconstruction = (
        classify(manifest, split, originals),
        classify(manifest, split, reconstructions),
    )
    per_image["label_original"], per_image["label_reconstruction"] = label_original, label_reconstruction
    summary: dict = {"frames": len(originals)}
    summary["psnr_mean"], summary["psnr_std"] = _mean_std(per_image["psnr"])
    summary["ssim_mean"], summary["ssim_std"] = _mean_std(per_image["ssim"])
    summary["recognisable"] = float(np.mean(per_image["ssim"] >= RECOGNISABLE_SSIM))
    summary["label_leakage"] = float(np.mean(label_reconstruction == label_original))
    if labels is not None and (labels >= 0).any():
        known = labels >= 0
        summary["accuracy_original"] = float(np.mean(label_original[known] == labels[known]))
        summary["accuracy_reconstruction"] = float(np.mean(label_reconstruction[known] == labels[known]))
    if identities is not None and gallery is not None:
        per_image["identity"] = identify(reconstructions, gallery)
        summary["identity_leakage"] = float(np.mean(per_image["identity"] == identities))
        summary["identity_baseline"] = float(np.mean(identify(originals, gallery) == identities))
        summary["identity_chance"] = 1 / len(np.unique(gallery.labels))
    return {"per_image": per_image, "summary": summary}


def _finite(value):
    """JSON has no inf or nan: they are written as null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(
    out_dir: str | Path,
    originals: np.ndarray,
    reconstructions: np.ndarray,
    per_image_scores: dict[str, np.ndarray],
    summary: dict,
    *,
    columns: int = 8,
    max_images: int = 32,
) -> dict[str, Path]:
    """Write `reconstructions.png` (each row of originals over its row of reconstructions, with PSNR and SSIM under
    each reconstruction; the first `max_images` frames) and `summary.json` (the summary and every frame's scores)."""
    from matplotlib.figure import Figure  # the figure alone, without pyplot: no display, no global backend

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    originals, reconstructions = as_float(originals[:max_images]), as_float(reconstructions[:max_images])
    n = len(originals)
    columns = max(1, min(columns, n))
    pairs = max(1, -(-n // columns))
    figure = Figure(figsize=(1.3 * columns, 2.9 * pairs), layout="constrained")
    axes = figure.subplots(2 * pairs, columns, squeeze=False)
    grey = originals.shape[-1] == 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(n):
        row, col = 2 * (i // columns), i % columns
        for ax, image in ((axes[row, col], originals[i]), (axes[row + 1, col], reconstructions[i])):
            ax.imshow(image[..., 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=1)
        axes[row + 1, col].set_xlabel(
            f"{per_image_scores['psnr'][i]:.1f} dB\nSSIM {per_image_scores['ssim'][i]:.2f}", fontsize=7
        )
    for row in range(pairs):
        axes[2 * row, 0].set_ylabel("original", fontsize=8)
        axes[2 * row + 1, 0].set_ylabel("reconstruction", fontsize=8)
    paths = {"grid": out_dir / "reconstructions.png", "summary": out_dir / "summary.json"}
    figure.savefig(paths["grid"], dpi=100)
    frames = {name: np.asarray(values).tolist() for name, values in per_image_scores.items()}
    paths["summary"].write_text(json.dumps(_finite({"summary": summary, "per_image": frames}), indent=1) + "\n")
    return paths


def format_summary(summary: dict) -> str:
    lines = [
        f"frames: {summary['frames']}",
        f"PSNR: {summary['psnr_mean']:.2f} ± {summary['psnr_std']:.2f} dB",
        f"SSIM: {summary['ssim_mean']:.3f} ± {summary['ssim_std']:.3f}",
        f"recognisable (SSIM >= {RECOGNISABLE_SSIM}): {summary['recognisable']:.1%}",
        f"label leakage (cloud labels the reconstruction as the original): {summary['label_leakage']:.1%}",
    ]
    if "accuracy_original" in summary:
        lines.append(
            f"cloud accuracy: {summary['accuracy_original']:.1%} on originals, "
            f"{summary['accuracy_reconstruction']:.1%} on reconstructions"
        )
    if "identity_leakage" in summary:
        lines.append(
            f"identity leakage (nearest gallery face is the right person): {summary['identity_leakage']:.1%} "
            f"(originals {summary['identity_baseline']:.1%}, chance {summary['identity_chance']:.1%})"
        )
    return "\n".join(lines)
