"""`splitleak extract`: does what an attacker can generate from a split model copy the model's training images?

Carlini et al.'s generate-and-filter test (USENIX Security 2023; attacker.extraction) asks it of a generator. Here it
is asked of the two things an attacker on the split channel can generate from a classifier:

- `datafree`: the images the data-free attack synthesises from the head's batch-norm statistics (DeepInversion, step
  1 of attacker.attacks.datafree), the very images its inverse networks train on. Batch norms store each channel's
  mean and variance over the whole training set, an average over 50,000 images: the question is whether that average
  gives any single image back.
- `classes`: a class inversion (Fredrikson, Jha and Ristenpart, CCS 2015, "Model Inversion Attacks that Exploit
  Confidence Information"): for each class, images descended on until the model is sure of that class, from noise,
  with random shifts and flips, total-variation and l2 priors, and (by default) DeepInversion's prior that they match
  the statistics in every batch norm of the model (Yin et al., CVPR 2020), without which a deep network's class
  inversions are patterns that fool it rather than pictures. On the faces model each class is one person, so the
  question is the paper's: does inverting "person 7" give back a photo of person 7 from the training set? It takes
  gradients through the head (in the app, white box) and the tail, which the party that hosts the tail holds; a tap
  with no weights would have to estimate them from queries.

Each generated image is filtered against the training split and, as the control, against the test split, which the
model never saw: images are flagged when their nearest reference image is much nearer than the rest of its
neighbourhood (l2 ratio below delta). To compare like with like, the training references are a random subset of the
training split as large as the test split. A flag against the training images means something only where the control
flags fewer; the counts are printed and kept in JSON, with a grid of the closest pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitleak.attacker.attacks.base import to_torch
from splitleak.attacker.attacks.datafree import DivideAndConquerInversion, deep_inversion, synthetic_images
from splitleak.attacker.extraction import Extraction, extract, grid
from splitleak.core import data, manifest

SOURCES = ("datafree", "classes")


def to_uint8(normalised: torch.Tensor, m: manifest.Manifest) -> np.ndarray:
    """Normalised images (N, C, H, W) -> uint8 (N, H, W, C), as the model's input normalisation undoes."""
    mean = torch.from_numpy(m.mean)[:, None, None]
    std = torch.from_numpy(m.std)[:, None, None]
    pixels = (normalised * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def invert_classes(
    m: manifest.Manifest,
    split: str,
    *,
    per_class: int = 1,
    steps: int = 500,
    statistics: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (K * per_class, H, W, C), their classes): for every class, `per_class` images that the head and
    tail at `split` give that class, from uniform noise. With `statistics`, the images also match the batch norms'
    statistics of the whole model (DeepInversion's prior, Yin et al. 2020); without, only total variation and an l2
    prior hold them (Fredrikson et al.'s inversion, which on a deep network gives patterns that fool it)."""
    parts = m.split(split)
    model = nn.Sequential(to_torch(parts.head), to_torch(parts.tail)).requires_grad_(False)
    mean = torch.from_numpy(m.mean)[:, None, None]
    std = torch.from_numpy(m.std)[:, None, None]
    torch.manual_seed(seed)
    classes = torch.arange(len(m.classes)).repeat_interleave(per_class)
    normalised = deep_inversion(
        model, mean, std, m.input_shape, len(classes), steps, progress, targets=classes, statistics=statistics
    )
    return to_uint8(normalised, m), classes.numpy()


def references(m: manifest.Manifest, dataset: str, seed: int) -> tuple[data.Dataset, data.Dataset]:
    """(training references, test references), both at the model's input size and in its classes' order, the training
    ones a random subset as large as the test split."""
    test = data.load(dataset, "test")
    train = data.load(dataset, "train")
    train = train.take(np.sort(np.random.default_rng(seed).permutation(len(train))[: len(test)]))
    size, channels = m.input_shape[1], m.input_shape[0]
    return tuple(
        data.Dataset(ds.name, data.resize(ds.images, size, channels), ds.labels_as(m.classes)[0], m.classes)
        for ds in (train, test)
    )


def summary(found: Extraction, reference: data.Dataset, classes: np.ndarray | None) -> dict:
    """The counts for one reference set: flagged samples, the distinct images they copy, how near the filter came,
    and (for class inversions) how often a sample's nearest image is of the class it was inverted for."""
    out = {
        "references": len(reference.images),
        "flagged_samples": int(found.flagged.sum()),
        "extracted": len(found.extracted()),
        "ratio_min": float(found.ratio.min()),
        "ratio_median": float(np.median(found.ratio)),
        "distance_median": float(np.median(found.distance)),
    }
    if classes is not None:
        same = reference.labels[found.nearest] == classes
        out["nearest_is_same_class"] = float(same.mean())
        out["chance_same_class"] = float(np.mean([np.mean(reference.labels == c) for c in classes]))
    return out


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=SOURCES, required=True, help="what to generate (see above)")
    parser.add_argument("--model-dir", type=Path, help="an exported model (default: the shipped CIFAR-10 ResNet-20)")
    parser.add_argument("--split", help="split point (default: the model's default; datafree: its head's statistics)")
    parser.add_argument("--dataset", help="the model's data set (default: the one its manifest names)")
    parser.add_argument("--synthetic-images", type=int, default=256, help="datafree: images to synthesise")
    parser.add_argument("--synthesis-steps", type=int, default=300, help="datafree: steps of synthesis")
    parser.add_argument("--per-class", type=int, default=4, help="classes: images per class")
    parser.add_argument("--steps", type=int, default=500, help="classes: steps of descent")
    parser.add_argument(
        "--no-statistics",
        action="store_true",
        help="classes: no batch-norm prior, only total variation and l2 (Fredrikson et al.'s plain inversion)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the JSON and the grids go (default: the cache)")
    return parser


def main(args: argparse.Namespace) -> int:
    m = manifest.load(args.model_dir or manifest.DEFAULT_MODEL_DIR)
    split = args.split or m.default_split
    dataset = args.dataset or m.dataset
    if args.source == "datafree":
        knobs = DivideAndConquerInversion.Knobs(
            synthetic_images=args.synthetic_images, synthesis_steps=args.synthesis_steps, seed=args.seed
        )
        samples, classes = to_uint8(synthetic_images(m, split, knobs, progress=True), m), None
        recipe = {"synthetic_images": args.synthetic_images, "synthesis_steps": args.synthesis_steps}
    else:
        samples, classes = invert_classes(
            m, split, per_class=args.per_class, steps=args.steps, statistics=not args.no_statistics, seed=args.seed,
            progress=True,
        )  # fmt: skip
        recipe = {"per_class": args.per_class, "steps": args.steps, "statistics": not args.no_statistics}
    train, test = references(m, dataset, args.seed)
    kind = args.source if args.source == "datafree" or not args.no_statistics else "classes-plain"
    out = args.out or data.cache_dir() / "extraction" / f"{m.name}-{split}-{kind}"
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": m.name, "split": split, "source": args.source, "samples": len(samples), **recipe}
    for name, reference in (("train", train), ("test", test)):
        found = extract(samples, reference.images)
        report[name] = summary(found, reference, classes)
        grid(samples, reference.images, found, out / f"closest-{name}.png", reference_name=name)
    np.save(out / "samples.npy", samples)
    (out / "extraction.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {out / 'extraction.json'}, the samples and the closest pairs against each split")
    return 0
