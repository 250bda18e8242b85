"""Train a zoo model on a data set and cache the checkpoint (`splitleak train`).

The recipe is the usual fast CIFAR one: SGD with Nesterov momentum under a one-cycle learning rate (Smith and Topin,
"Super-convergence", 2019), random crops with 4-pixel padding and horizontal flips, light label smoothing. It is what
lets ResNet-20 pass 85% on CIFAR-10 in a few epochs on a laptop CPU.

With `--defence` it trains a defended variant instead (splitleak.model.objectives: NoPeek or adversarial training at one
split point), from scratch or, with `--from-checkpoint`, fine-tuning the cached undefended checkpoint of the same
model and data at a tenth of the learning rate. Its checkpoint is cached beside the undefended one under the variant's
name (e.g. `resnet20-cifar10-nopeek1.0-layer1`) and carries the `training_defence` record the export writes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from splitleak.core import data
from splitleak.model import objectives, zoo

FINE_TUNE_LR = 0.02  # the peak learning rate when fine-tuning: a tenth of training's, so the task is kept


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


def variant_name(config: TrainConfig) -> str:
    """The exported model's name: MODEL-DATASET, and for a defended variant -DEFENCE{STRENGTH}-SPLIT."""
    name = f"{config.model}-{config.dataset}"
    return name + (f"-{config.defence}{float(config.strength)}-{config.split}" if config.defence else "")


def checkpoint_path(config: TrainConfig) -> Path:
    name = f"{config.model}-{config.dataset.replace(':', '_').replace('/', '_')}"
    name += (f"-limit{config.limit}" if config.limit else "") + (f"-size{config.size}" if config.size else "")
    name += f"-{config.defence}{float(config.strength)}-{config.split}" if config.defence else ""
    return data.cache_dir() / "checkpoints" / f"{name}.pt"


def load_checkpoint(config: TrainConfig) -> dict:
    """The checkpoint `splitleak train` cached for `config`."""
    path = checkpoint_path(config)
    if not path.exists():
        limit = f" --limit {config.limit}" if config.limit else ""
        raise FileNotFoundError(
            f"no checkpoint at {path}: train one with "
            f"`splitleak train --model {config.model} --dataset {config.dataset}{limit}`"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def to_tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips of a batch (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, b), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        out[flips] = out[flips].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def train(config: TrainConfig, *, progress: bool = True) -> dict:
    """Train, evaluate on the test split and save the checkpoint; returns the checkpoint dict."""
    if config.defence and config.split is None:
        config = replace(config, split=zoo.ZOO[config.model].default_split)
    if config.from_checkpoint and not config.defence:
        raise ValueError("fine-tuning from the checkpoint needs a defence: it would overwrite that very checkpoint")
    base = None
    if config.from_checkpoint:
        base = load_checkpoint(replace(config, defence=None, strength=0.0, split=None, from_checkpoint=False))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_set, test_set = data.load(config.dataset, "train"), data.load(config.dataset, "test")
    if config.limit:
        rng = np.random.default_rng(config.seed)
        train_set = train_set.take(rng.permutation(len(train_set))[: config.limit])
        test_set = test_set.take(rng.permutation(len(test_set))[: max(config.limit // 5, 100)])
    if config.size:
        # As the device does (data.resize), so that it sends what the model was trained on; the manifest and the
        # exported halves take square inputs.
        train_set, test_set = (
            replace(s, images=data.resize(s.images, config.size, s.images.shape[3])) for s in (train_set, test_set)
        )
    if base is None:
        images = train_set.images.astype(np.float32) / 255
        mean, std = images.mean((0, 1, 2)), images.std((0, 1, 2))
    else:  # the base model's normalisation, which its weights expect
        mean, std = (np.asarray(base["input"][k], np.float32) for k in ("mean", "std"))
    x_train, y_train = to_tensor(train_set.images, mean, std), torch.from_numpy(train_set.labels)
    x_test, y_test = to_tensor(test_set.images, mean, std), torch.from_numpy(test_set.labels)

    if base is None:
        model = zoo.build(config.model, num_classes=len(train_set.classes), in_channels=x_train.shape[1])
    else:
        model = load_model(base)
    if config.defence:
        objective = objectives.build(
            config.defence,
            model,
            split=config.split,
            strength=config.strength,
            label_smoothing=config.label_smoothing,
            mean=torch.from_numpy(mean),
            std=torch.from_numpy(std),
            input_shape=tuple(x_train.shape[1:]),
        )
    else:

        def objective(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            return F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing), {}

    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    # A quarter of the run warms up; tiny runs (tests) still need two warm-up steps for the schedule to exist.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=total_steps, pct_start=max(0.25, 2 / total_steps)
    )
    history = []
    if base is not None:  # where the fine-tuning starts from, measured as every epoch is
        dcor = objectives.activation_dcor(model, config.split, x_test[:1024])
        history.append(
            {"epoch": 0, "test_accuracy": evaluate(model, x_test, y_test), "seconds": 0.0, "test_dcor": dcor}
        )
        if progress:
            tqdm.write(f"before: test_accuracy {history[0]['test_accuracy']:.4f}, test_dcor {dcor:.4f}")
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        terms: dict[str, list[float]] = {}
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss, logged = objective(augment(x_train[idx], generator, config.flip), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in logged.items()})
            for k, v in logged.items():
                terms.setdefault(k, []).append(v)
        accuracy = evaluate(model, x_test, y_test)
        record = {"epoch": epoch + 1, "test_accuracy": accuracy, "seconds": time.perf_counter() - start}
        record |= {f"train_{k}": float(np.mean(v)) for k, v in terms.items()}  # the defence's term, over the epoch
        if config.split:
            record["test_dcor"] = objectives.activation_dcor(model, config.split, x_test[:1024])
        history.append(record)
        if progress:
            measured = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in {"epoch", "seconds"})
            tqdm.write(f"epoch {epoch + 1}: {measured} ({record['seconds']:.0f} s)")

    checkpoint = {
        "config": asdict(config),
        "name": variant_name(config),
        "state_dict": model.state_dict(),
        "classes": list(train_set.classes),
        "input": {
            "size": int(x_train.shape[2]),
            "channels": int(x_train.shape[1]),
            "mean": mean.tolist(),
            "std": std.tolist(),
        },
        "test_accuracy": history[-1]["test_accuracy"],
        "test_images": len(x_test),
        "history": history,
    }
    if config.defence:
        checkpoint["training_defence"] = {
            "name": config.defence,
            "strength": float(config.strength),
            "split": config.split,
            "from": None if base is None else base.get("name", variant_name(TrainConfig(**base["config"]))),
            "epochs": config.epochs,
        }
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    checkpoint["path"] = str(path)
    return checkpoint


def load_model(checkpoint: dict) -> torch.nn.Sequential:
    config = checkpoint["config"]
    model = zoo.build(
        config["model"], num_classes=len(checkpoint["classes"]), in_channels=checkpoint["input"]["channels"]
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    parser.add_argument("--model", default=defaults.model, choices=sorted(zoo.ZOO))
    parser.add_argument("--dataset", default=defaults.dataset, help="a data set name (see splitleak.core.data)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--lr",
        type=float,
        help=f"peak learning rate of the one-cycle schedule (default {defaults.lr}; {FINE_TUNE_LR} to fine-tune)",
    )
    parser.add_argument("--limit", type=int, default=None, help="train on this many images only")
    parser.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE (centre crop) first")
    parser.add_argument("--no-flip", action="store_true", help="no horizontal flips (for digits)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    defence = parser.add_argument_group("training-time defence (splitleak.model.objectives)")
    defence.add_argument("--defence", choices=sorted(objectives.DEFENCES), help="train a defended variant")
    defence.add_argument("--strength", type=float, help="the defence's weight in the loss (alpha, lambda)")
    defence.add_argument("--split", help="the split point it protects (default: the model's default split)")
    defence.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="fine-tune the cached undefended checkpoint of --model and --dataset (and --limit) instead of starting "
        "afresh; --epochs then counts the fine-tuning epochs",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.defence is None and (args.strength is not None or args.split or args.from_checkpoint):
        raise ValueError("--strength, --split and --from-checkpoint go with --defence")
    if args.defence is not None and args.strength is None:
        raise ValueError(f"--defence {args.defence} needs --strength")
    if args.split is not None and args.split not in zoo.ZOO[args.model].split_points:
        raise ValueError(
            f"{args.model} has no split point {args.split!r}: {', '.join(zoo.ZOO[args.model].split_points)}"
        )
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else FINE_TUNE_LR if args.from_checkpoint else TrainConfig.lr,
        limit=args.limit,
        size=args.size,
        flip=not args.no_flip,
        seed=args.seed,
        defence=args.defence,
        strength=args.strength or 0.0,
        split=args.split or (zoo.ZOO[args.model].default_split if args.defence else None),
        from_checkpoint=args.from_checkpoint,
    )


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        checkpoint = train(config)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"splitleak train: {e}") from None
    history = checkpoint["history"]
    trained = checkpoint["name"] if config.defence else config.model  # "resnet20", or the variant's own name
    print(
        f"{trained} on {config.dataset}: test accuracy {checkpoint['test_accuracy']:.4f} "
        f"on {checkpoint['test_images']} images after {config.epochs} epochs ({history[-1]['seconds'] / 60:.1f} min)"
    )
    if config.defence:
        dcor = f"distance correlation of input and activation at {config.split}"
        if config.from_checkpoint:
            print(f"before: test accuracy {history[0]['test_accuracy']:.4f}, {dcor} {history[0]['test_dcor']:.4f}")
        print(f"after: test accuracy {history[-1]['test_accuracy']:.4f}, {dcor} {history[-1]['test_dcor']:.4f}")
    print(f"checkpoint: {checkpoint['path']}")
    if config.defence:
        print(f"export it: splitleak export --checkpoint {checkpoint['path']}")
    return 0
