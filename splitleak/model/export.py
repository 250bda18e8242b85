"""Export a trained model as head and tail ONNX files for every split point (`splitleak export`).

Both halves take a dynamic batch dimension. The head's input is `image` (normalised float32, NCHW) and its output
`activation`; the tail takes `activation` and returns `logits`. See splitleak.core.manifest for the folder's layout.

Given training images, each split is also calibrated for the run-time defences (splitleak.core.defences) on the exported
ONNX files themselves, so the numbers describe exactly what ships: the activation's reference std, and a channel
ranking from zeroing one channel at a time and measuring how far the tail's prediction moves (the mean KL divergence
from the intact prediction). Zeroing every channel runs the tail C times; 128 images keep that to seconds.

A checkpoint trained with a training-time defence (`splitleak train --defence`) exports under its variant's name
(e.g. `resnet20-cifar10-nopeek1.0-layer1`), every split point as usual, with a top-level `training_defence` in the
manifest: {"name", "strength", "split", "from", "epochs"}. Undefended models have no such key. A checkpoint trained with
DP-SGD (splitleak.model.private) writes its `privacy` record as a top-level `training_privacy` (the epsilon its
accountant reported, delta, clip, noise multiplier, steps), and a group-norm model says `"norm": "group"`: its halves
hold GroupNorm where the others hold BatchNormalization, and so give the data-free attack no statistics to match.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from splitleak.core import data, manifest
from splitleak.model import zoo
from splitleak.model.checkpoint import (
    Checkpoint,
    TrainConfig,
    cached_checkpoint,
    load_checkpoint,
    load_model,
    to_tensor,
)

OPSET = 18
CALIBRATION_IMAGES = 128


def export_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    # The TorchScript exporter, deliberately (hence no deprecation warning): one self-contained file per half,
    # and onnx2torch reads it back for the white-box attacks. No constant folding, so BatchNormalization nodes stay
    # in the file as separate nodes, as in a model an app ships: ONNX Runtime fuses them into the convolutions when
    # it loads the file (no cost at run time), and the statistics they hold are what the data-free attack reads.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=False,
            dynamo=False,
        )


def calibrate(head: Path, tail: Path, images: np.ndarray) -> dict:
    """What the defences need to know about one split, from normalised float32 images (N, C, H, W)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    run_head, run_tail = (
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in (head, tail)
    )
    activation = run_head.run(["activation"], {"image": images})[0]  # (N, C, ...)

    def log_probs(a: np.ndarray) -> np.ndarray:
        logits = run_tail.run(["logits"], {"activation": a})[0].astype(np.float64)
        return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)

    intact = log_probs(activation)
    divergence = []
    for c in range(activation.shape[1]):
        kept = activation[:, c].copy()
        activation[:, c] = 0
        divergence.append(float(np.mean(np.sum(np.exp(intact) * (intact - log_probs(activation)), axis=1))))
        activation[:, c] = kept
    return {
        "reference_std": float(activation.std()),
        "channel_ranking": np.argsort(-np.array(divergence), kind="stable").tolist(),
        "channel_kl": [round(d, 6) for d in divergence],
    }


@torch.no_grad()
def export(
    model: torch.nn.Sequential,
    out_dir: Path,
    *,
    name: str,
    model_name: str,
    dataset: str,
    classes: list[str],
    input_shape: tuple[int, int, int],
    mean: list[float],
    std: list[float],
    split_points: tuple[str, ...],
    default_split: str,
    test_accuracy: float | None = None,
    calibration_images: np.ndarray | None = None,
    calibration_source: str | None = None,
    training_defence: dict | None = None,
    training_privacy: dict | None = None,
    norm: str = "batch",
) -> dict:
    """Write SPLIT.head.onnx and SPLIT.tail.onnx for each split point and manifest.json; returns the manifest.

    `calibration_images` (normalised float32, NCHW), from `calibration_source`, calibrate every split for the
    defences; without them the manifest has no calibration and the defences that need it refuse this model.
    `training_defence` is the record of a training-time defence (splitleak.model.objectives), `training_privacy` that
    of DP-SGD (splitleak.model.private), each written as is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(2, *input_shape)
    splits = {}
    for split_point in split_points:
        head, tail = zoo.split(model, split_point)
        activation = head(example)
        files = {"head": f"{split_point}.head.onnx", "tail": f"{split_point}.tail.onnx"}
        export_onnx(head, example, out_dir / files["head"], "image", "activation")
        export_onnx(tail, activation, out_dir / files["tail"], "activation", "logits")
        splits[split_point] = {
            **files,
            "activation": {"name": "activation", "shape": list(activation.shape[1:]), "datatype": "FP32"},
            "sha256": {part: manifest.sha256(out_dir / f) for part, f in files.items()},
        }
        if calibration_images is not None:
            splits[split_point]["calibration"] = calibrate(
                out_dir / files["head"], out_dir / files["tail"], calibration_images
            )
    doc = {
        "name": name,
        "model": model_name,
        "dataset": dataset,
        "classes": list(classes),
        "test_accuracy": test_accuracy,
        "default_split": default_split,
        "input": {
            "name": "image",
            "shape": list(input_shape),
            "datatype": "FP32",
            "layout": "NCHW",
            "mean": [float(m) for m in mean],
            "std": [float(s) for s in std],
            "note": "x = (pixel / 255 - mean) / std, per channel",
        },
        "output": {"name": "logits", "shape": [len(classes)], "datatype": "FP32"},
        "calibration": None
        if calibration_images is None
        else {"source": calibration_source, "images": len(calibration_images)},
        "splits": splits,
    }
    if training_defence is not None:
        doc["training_defence"] = training_defence
    if training_privacy is not None:
        doc["training_privacy"] = training_privacy
    if norm != "batch":
        doc["norm"] = norm
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def export_checkpoint(checkpoint: Checkpoint, out_dir: Path, *, calibration_images: int = CALIBRATION_IMAGES) -> dict:
    """Export a checkpoint, calibrated on `calibration_images` of its training split when that split can be loaded."""
    config = checkpoint.config
    entry = zoo.ZOO[config.model]
    images, source = None, None
    if calibration_images > 0:
        try:
            train = data.load(config.dataset, "train")
        except FileNotFoundError:
            train = None
        if train is not None:
            # Seeded, and drawn across the whole split because the shared data sets are stored grouped by class.
            pick = np.random.default_rng(0).permutation(len(train))[:calibration_images]
            # At the model's input size, as `splitleak train --size` trained it and the device sends it.
            resized = data.resize(train.images[pick], checkpoint.input_size, checkpoint.channels)
            images = to_tensor(resized, checkpoint.mean, checkpoint.std).numpy()
            source = f"{config.dataset} (train)"
    return export(
        load_model(checkpoint),
        out_dir,
        name=checkpoint.name,
        model_name=config.model,
        dataset=config.dataset,
        classes=list(checkpoint.classes),
        input_shape=(checkpoint.channels, checkpoint.input_size, checkpoint.input_size),
        mean=checkpoint.mean.tolist(),
        std=checkpoint.std.tolist(),
        split_points=entry.split_points,
        default_split=entry.default_split,
        test_accuracy=checkpoint.test_accuracy,
        calibration_images=images,
        calibration_source=source,
        training_defence=checkpoint.training_defence,
        training_privacy=checkpoint.privacy,
        norm=config.norm,
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(zoo.ZOO))
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="default: the one `splitleak train` cached for model and data; a defended variant's path is the one "
        "`splitleak train --defence` printed",
    )
    parser.add_argument("--limit", type=int, help="the --limit the checkpoint was trained with, if any")
    parser.add_argument("--out", type=Path, help="default: CACHE/models/NAME (MODEL-DATASET, or the variant's name)")
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help="training images that calibrate the defences (reference std, channel ranking); 0: none",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    if args.checkpoint is None:
        checkpoint = cached_checkpoint(TrainConfig(model=args.model, dataset=args.dataset, limit=args.limit))
    else:
        checkpoint = load_checkpoint(args.checkpoint)
    out = args.out or data.cache_dir() / "models" / checkpoint.name
    doc = export_checkpoint(checkpoint, out, calibration_images=args.calibration_images)
    print(f"exported {doc['name']} ({', '.join(doc['splits'])}) to {out}")
    if "training_defence" in doc:
        print(f"training-time defence: {json.dumps(doc['training_defence'])}")
    if "training_privacy" in doc:
        print(f"trained with DP-SGD: {json.dumps(doc['training_privacy'])}")
    if doc["calibration"] is None:
        print("not calibrated for defences (no training images): noise and topk will refuse this model")
    else:
        print(f"calibrated for defences on {doc['calibration']['images']} images of {doc['calibration']['source']}")
    return 0
