"""The checkpoint `splitleak train` caches and `splitleak export` reads: what it holds, where it lives, how it loads.

On disk a checkpoint is the dict that `torch.save` writes, as it always was, so checkpoints cached by earlier versions
still load (those before training-time defences have no `name` and fewer config fields; their defaults fill in):

    {"config": TrainConfig as a dict, "name": str, "state_dict": ..., "classes": [str],
     "input": {"size", "channels", "mean", "std"}, "test_accuracy": float, "test_images": int,
     "history": [{"epoch", "test_accuracy", "seconds", ...}], "training_defence": {...} (defended variants only)}

In memory it is a `Checkpoint`. A variant trained with a training-time defence (splitleak.model.objectives) is cached
beside the undefended one under its own name (e.g. `resnet20-cifar10-nopeek1.0-layer1`) and carries the
`training_defence` record {"name", "strength", "split", "from", "epochs"} that the export writes into the manifest.
A variant trained with DP-SGD (splitleak.model.private) carries a `privacy` record instead, with the epsilon the
accountant reports at the end of training; group norm (`-gn`) and training without augmentation (`-noaug`) are named
too, so each variant has a checkpoint of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitleak.core import data
from splitleak.model import zoo


@dataclass(frozen=True)
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "cifar10"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    limit: int | None = None  # train on the first N images only (tests)
    size: int | None = None  # centre-crop and resize every image to size x size first (non-square sets: faces)
    flip: bool = True  # horizontal flips; off for data where left and right differ in meaning (digits)
    seed: int = 0
    defence: str | None = None  # a training-time defence (splitleak.model.objectives.DEFENCES)
    strength: float = 0.0  # its weight in the loss (NoPeek's alpha, adversarial training's lambda)
    split: str | None = None  # the split point it protects; None: the model's default
    from_checkpoint: bool = False  # fine-tune the cached undefended checkpoint of the same model and data
    norm: str = "batch"  # "batch", or "group": group norm in place of batch norm (zoo.NORMS), which DP-SGD needs
    augment: bool = True  # random crops and flips; off, the model sees each training image as it is and memorises more
    dp_epsilon: float | None = None  # train with DP-SGD to this (epsilon, dp_delta) budget (splitleak.model.private)
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # the per-example gradient norm DP-SGD clips to


# Fields added after shadow models and canary runs were first cached under a hash of the config: left out of that
# hash while they keep their defaults (recipe_record), so those caches keep their keys.
LATER_FIELDS = ("norm", "augment", "dp_epsilon", "dp_delta", "dp_clip")


def recipe_record(config: TrainConfig) -> dict:
    """The config as a dict, without the LATER_FIELDS at their defaults: what cache keys hash."""
    defaults = TrainConfig()
    return {k: v for k, v in asdict(config).items() if k not in LATER_FIELDS or v != getattr(defaults, k)}


@dataclass(frozen=True, eq=False)
class Checkpoint:
    config: TrainConfig
    name: str  # the exported model's name (variant_name)
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    input_size: int  # the side of the square input
    channels: int
    mean: np.ndarray  # (C,) float32: the model takes (pixel / 255 - mean) / std
    std: np.ndarray  # (C,) float32
    test_accuracy: float
    test_images: int
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch
    training_defence: dict | None = None
    # DP-SGD's {"epsilon", "target_epsilon", "delta", "max_grad_norm", "noise_multiplier", "sample_rate", "steps",
    # "accountant"}: epsilon is what the accountant reports for the steps taken
    privacy: dict | None = None


def recipe_suffix(config: TrainConfig) -> str:
    """What sets a variant's recipe apart from the plain one: -gn, -noaug, -dpEPS[-clipC][-deltaD], -DEFENCE..."""
    suffix = "-gn" if config.norm == "group" else ""
    suffix += "" if config.augment else "-noaug"
    if config.dp_epsilon is not None:
        defaults = TrainConfig()
        suffix += f"-dp{float(config.dp_epsilon)}"
        suffix += f"-clip{float(config.dp_clip)}" if config.dp_clip != defaults.dp_clip else ""
        suffix += f"-delta{float(config.dp_delta):g}" if config.dp_delta != defaults.dp_delta else ""
    return suffix + (f"-{config.defence}{float(config.strength)}-{config.split}" if config.defence else "")


def variant_name(config: TrainConfig) -> str:
    """The exported model's name: MODEL-DATASET, and for a variant its recipe_suffix (e.g. -gn-dp8.0,
    -nopeek1.0-layer1)."""
    return f"{config.model}-{config.dataset}" + recipe_suffix(config)


def checkpoint_path(config: TrainConfig) -> Path:
    name = f"{config.model}-{config.dataset.replace(':', '_').replace('/', '_')}"
    name += (f"-limit{config.limit}" if config.limit else "") + (f"-size{config.size}" if config.size else "")
    return data.cache_dir() / "checkpoints" / f"{name}{recipe_suffix(config)}.pt"


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    raw = {
        "config": asdict(checkpoint.config),
        "name": checkpoint.name,
        "state_dict": checkpoint.state_dict,
        "classes": list(checkpoint.classes),
        "input": {
            "size": checkpoint.input_size,
            "channels": checkpoint.channels,
            "mean": checkpoint.mean.tolist(),
            "std": checkpoint.std.tolist(),
        },
        "test_accuracy": checkpoint.test_accuracy,
        "test_images": checkpoint.test_images,
        "history": checkpoint.history,
    }
    if checkpoint.training_defence is not None:
        raw["training_defence"] = checkpoint.training_defence
    if checkpoint.privacy is not None:
        raw["privacy"] = checkpoint.privacy
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, path)


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Not weights_only: the dict holds the history's and the config's plain Python values beside the tensors.
    raw = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig(**raw["config"])
    inp = raw["input"]
    return Checkpoint(
        config=config,
        name=raw.get("name", variant_name(config)),
        state_dict=raw["state_dict"],
        classes=tuple(raw["classes"]),
        input_size=inp["size"],
        channels=inp["channels"],
        mean=np.asarray(inp["mean"], np.float32),
        std=np.asarray(inp["std"], np.float32),
        test_accuracy=raw["test_accuracy"],
        test_images=raw.get("test_images", 0),
        history=raw.get("history", []),
        training_defence=raw.get("training_defence"),
        privacy=raw.get("privacy"),
    )


def cached_checkpoint(config: TrainConfig) -> Checkpoint:
    """The checkpoint `splitleak train` cached for `config`."""
    path = checkpoint_path(config)
    if not path.exists():
        limit = f" --limit {config.limit}" if config.limit else ""
        raise FileNotFoundError(
            f"no checkpoint at {path}: train one with "
            f"`splitleak train --model {config.model} --dataset {config.dataset}{limit}`"
        )
    return load_checkpoint(path)


def load_model(checkpoint: Checkpoint) -> nn.Sequential:
    config = checkpoint.config
    model = zoo.build(config.model, config.norm, num_classes=len(checkpoint.classes), in_channels=checkpoint.channels)
    model.load_state_dict(checkpoint.state_dict)
    return model.eval()


def to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W), as the checkpoint's `mean` and `std` say."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]
