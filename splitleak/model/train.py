"""Train a zoo model on a data set and cache the checkpoint (`splitleak train`).

The recipe is the usual fast CIFAR one: SGD with Nesterov momentum under a one-cycle learning rate (Smith and Topin,
"Super-convergence", 2019), random crops with 4-pixel padding and horizontal flips, light label smoothing. It is what
lets ResNet-20 pass 85% on CIFAR-10 in a few epochs on a laptop CPU.

Every run minimises one objective (splitleak.model.objectives): `none`, the plain cross-entropy, or with `--defence`
a training-time defence at one split point (NoPeek or adversarial training), which trains a defended variant from
scratch or, with `--from-checkpoint`, fine-tunes the cached undefended checkpoint of the same model and data at a tenth
of the learning rate. splitleak.model.checkpoint says what the checkpoint holds and where it is cached.

Two more variants change the recipe itself, for the study of what a model remembers of its training set
(docs/membership.md): `--dp-epsilon EPS` trains with DP-SGD (splitleak.model.private; with `--norm group`, which it
needs), and `--no-augment` trains on the images as they are, with neither crops nor flips, which lets the model
memorise them more.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from splitleak.core import data
from splitleak.model import objectives, private, zoo
from splitleak.model.checkpoint import (
    Checkpoint,
    TrainConfig,
    cached_checkpoint,
    checkpoint_path,
    load_model,
    recipe_suffix,
    save_checkpoint,
    to_tensor,
    variant_name,
)

FINE_TUNE_LR = 0.02  # the peak learning rate when fine-tuning: a tenth of training's, so the task is kept


@dataclass(frozen=True)
class TrainingData:
    """A data set's train and test splits as the model takes them, and the normalisation that made them."""

    x_train: torch.Tensor  # (N, C, H, W) normalised float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32


def load_splits(config: TrainConfig) -> tuple[data.Dataset, data.Dataset]:
    """The train and test splits of `config.dataset`, cut to `config.limit` and resized to `config.size`."""
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
    return train_set, test_set


def channel_mean_std(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images (N, H, W, C) in [0, 1], as float32 (C,)."""
    # Summed in float64: a float32 running sum of CIFAR-10's 51.2 million values per channel stops growing at 2**24,
    # which is how every channel's mean in the shipped manifest came to be 0.32768 (2**24 / 51.2e6).
    mean = images.mean((0, 1, 2), dtype=np.float64) / 255
    std = images.std((0, 1, 2), dtype=np.float64) / 255
    return mean.astype(np.float32), std.astype(np.float32)


def prepare_data(config: TrainConfig, base: Checkpoint | None) -> TrainingData:
    """The splits, labelled throughout, normalised by the training images' channel statistics, or by the base model's
    when fine-tuning."""
    train_set, test_set = load_splits(config)
    for split, dataset in (("train", train_set), ("test", test_set)):
        if unlabelled := int((dataset.labels < 0).sum()):
            raise ValueError(
                f"{dataset.name} ({split}) has {unlabelled} of {len(dataset)} images without a label, and training "
                "needs every label: give a labelled --dataset (cifar10, mnist, embedded-faces, ...)"
            )
    if base is None:
        mean, std = channel_mean_std(train_set.images)
    else:  # the base model's normalisation, which its weights expect
        mean, std = base.mean, base.std
    return training_data(train_set, test_set, mean, std)


def training_data(train_set: data.Dataset, test_set: data.Dataset, mean: np.ndarray, std: np.ndarray) -> TrainingData:
    """Two splits as the model takes them, normalised by `mean` and `std`."""
    return TrainingData(
        x_train=to_tensor(train_set.images, mean, std),
        y_train=torch.from_numpy(train_set.labels),
        x_test=to_tensor(test_set.images, mean, std),
        y_test=torch.from_numpy(test_set.labels),
        classes=tuple(train_set.classes),
        mean=mean,
        std=std,
    )


@dataclass
class Training:
    """What one run trains with. Under DP-SGD, `trained` is wrapped by Opacus (per-example gradients), the optimizer
    clips and noises, and `private_batches` draws the Poisson-sampled batches; `model` is the plain model inside."""

    model: torch.nn.Sequential
    trained: torch.nn.Module  # what the objective calls: the model, or Opacus' wrapper of it
    objective: objectives.Objective
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    private_batches: Iterable[tuple[torch.Tensor]] | None = None  # DP-SGD: batches of training indices
    privacy: object | None = None  # DP-SGD: Opacus' PrivacyEngine, whose accountant says what was spent

    def batches(self, train_size: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch's batches of training indices: a random order cut in batches, or DP-SGD's Poisson samples."""
        if self.private_batches is not None:
            return [idx for (idx,) in self.private_batches]
        return list(torch.randperm(train_size, generator=generator).split(batch_size))

    def privacy_record(self, config: TrainConfig) -> dict | None:
        return None if self.privacy is None else private.spent(config, self.privacy, self.optimizer)


def build_training(config: TrainConfig, prepared: TrainingData, base: Checkpoint | None) -> Training:
    """The model (fresh, or the base checkpoint's to fine-tune), its objective, the optimiser and the schedule, made
    private when the config asks for DP-SGD."""
    private.check(config)
    torch.manual_seed(config.seed)
    if base is None:
        model = zoo.build(
            config.model, config.norm, num_classes=len(prepared.classes), in_channels=prepared.x_train.shape[1]
        )
    else:
        model = load_model(base)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    schedule = one_cycle(optimizer, config.lr, config.epochs * -(-len(prepared.x_train) // config.batch_size))
    trained, loader, engine = model, None, None
    if config.dp_epsilon is not None:
        trained, optimizer, loader, engine = private.make_private(config, model, optimizer, len(prepared.x_train))
    objective = objectives.build(
        config.defence or "none",
        trained,
        split=config.split,
        strength=config.strength,
        label_smoothing=config.label_smoothing,
        mean=torch.from_numpy(prepared.mean),
        std=torch.from_numpy(prepared.std),
        input_shape=tuple(prepared.x_train.shape[1:]),
    )
    return Training(model, trained, objective, optimizer, schedule, loader, engine)


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """Warm up to `lr` over a quarter of the run, then anneal (Smith and Topin 2019)."""
    # OneCycleLR divides by each phase's length, so it needs two warm-up steps and one to anneal. A run of fewer steps
    # (`--limit 100`: one batch) takes the first steps of a three-step cycle; a longer one gets exactly its own.
    cycle = max(steps, 3)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=cycle, pct_start=max(0.25, 2 / cycle))


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random 4-pixel-padded crops and horizontal flips of a batch (B, C, H, W)."""
    b, _, h, w = x.shape
    if b == 0:  # Poisson sampling can draw an empty batch
        return x
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy, dx = torch.randint(0, 9, (2, b), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        out[flips] = out[flips].flip(-1)
    return out


def batch_of(
    prepared: TrainingData, idx: torch.Tensor, generator: torch.Generator, config: TrainConfig
) -> torch.Tensor:
    """The training images at `idx` as the model is fed them: augmented, unless the recipe says `augment=False`."""
    x = prepared.x_train[idx]
    return augment(x, generator, config.flip) if config.augment else x


def train_one_epoch(
    training: Training,
    prepared: TrainingData,
    generator: torch.Generator,
    epoch: int,
    config: TrainConfig,
    *,
    progress: bool,
) -> dict[str, float]:
    """One pass over the training images in a random order (or DP-SGD's Poisson batches), augmented unless the
    recipe says not; returns the mean of each term the objective logs (a defence's; plain cross-entropy logs none)."""
    training.trained.train()
    batches = training.batches(len(prepared.x_train), config.batch_size, generator)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
    terms: dict[str, list[float]] = {}
    for idx in bar:
        loss, logged = training.objective(batch_of(prepared, idx, generator, config), prepared.y_train[idx])
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        training.schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in logged.items()})
        for k, v in logged.items():
            terms.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in terms.items()}


def fit(config: TrainConfig, prepared: TrainingData, *, progress: bool) -> torch.nn.Module:
    """A fresh model of `config` trained on `prepared` for its epochs, and nothing else: no log, no checkpoint (shadow
    models, canary runs)."""
    training = build_training(config, prepared, None)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        train_one_epoch(training, prepared, generator, epoch, config, progress=progress)
    return training.model


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def measured(record: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in {"epoch", "seconds"})


def train(config: TrainConfig, *, progress: bool = True) -> Checkpoint:
    """Train, evaluate on the test split after every epoch and cache the checkpoint (checkpoint_path); returns it."""
    if config.defence and config.split is None:
        config = replace(config, split=zoo.ZOO[config.model].default_split)
    if config.from_checkpoint and not config.defence:
        raise ValueError("fine-tuning from the checkpoint needs a defence: it would overwrite that very checkpoint")
    base = None
    if config.from_checkpoint:
        base = cached_checkpoint(replace(config, defence=None, strength=0.0, split=None, from_checkpoint=False))
    prepared = prepare_data(config, base)
    training = build_training(config, prepared, base)
    model = training.model
    generator = torch.Generator().manual_seed(config.seed)
    x_dcor = prepared.x_test[:1024]  # the images on which every record measures the split's distance correlation

    history = []
    if base is not None:  # where the fine-tuning starts from, measured as every epoch is
        dcor = objectives.activation_dcor(model, config.split, x_dcor)
        accuracy = evaluate(model, prepared.x_test, prepared.y_test)
        history.append({"epoch": 0, "test_accuracy": accuracy, "seconds": 0.0, "test_dcor": dcor})
        if progress:
            tqdm.write(f"before: {measured(history[0])}")
    start = time.perf_counter()
    for epoch in range(config.epochs):
        terms = train_one_epoch(training, prepared, generator, epoch, config, progress=progress)
        accuracy = evaluate(model, prepared.x_test, prepared.y_test)
        record = {"epoch": epoch + 1, "test_accuracy": accuracy, "seconds": time.perf_counter() - start}
        record |= {f"train_{k}": v for k, v in terms.items()}  # the defence's term, over the epoch
        if config.split:
            record["test_dcor"] = objectives.activation_dcor(model, config.split, x_dcor)
        history.append(record)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: {measured(record)} ({record['seconds']:.0f} s)")

    trained = make_checkpoint(config, model, prepared, history, base, training.privacy_record(config))
    save_checkpoint(trained, checkpoint_path(config))
    return trained


def make_checkpoint(
    config: TrainConfig,
    model: torch.nn.Sequential,
    prepared: TrainingData,
    history: list[dict[str, float]],
    base: Checkpoint | None,
    privacy: dict | None = None,
) -> Checkpoint:
    training_defence = None
    if config.defence:
        training_defence = {
            "name": config.defence,
            "strength": float(config.strength),
            "split": config.split,
            "from": None if base is None else base.name,
            "epochs": config.epochs,
        }
    return Checkpoint(
        config=config,
        name=variant_name(config),
        state_dict=model.state_dict(),
        classes=prepared.classes,
        input_size=int(prepared.x_train.shape[2]),
        channels=int(prepared.x_train.shape[1]),
        mean=prepared.mean,
        std=prepared.std,
        test_accuracy=history[-1]["test_accuracy"],
        test_images=len(prepared.x_test),
        history=history,
        training_defence=training_defence,
        privacy=privacy,
    )


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
    parser.add_argument("--no-augment", action="store_true", help="no random crops or flips: memorises more")
    parser.add_argument(
        "--norm",
        choices=zoo.NORMS,
        help="batch or group norm (default: batch; group with --dp-epsilon, which needs it)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    dp = parser.add_argument_group("DP-SGD (splitleak.model.private)")
    dp.add_argument("--dp-epsilon", type=float, help="train with DP-SGD to this privacy budget epsilon (> 0)")
    dp.add_argument("--dp-delta", type=float, help=f"its delta (default {defaults.dp_delta:g})")
    dp.add_argument(
        "--dp-clip", type=float, help=f"the per-example gradient norm DP-SGD clips to (default {defaults.dp_clip})"
    )
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
    if args.dp_epsilon is None and (args.dp_delta is not None or args.dp_clip is not None):
        raise ValueError("--dp-delta and --dp-clip go with --dp-epsilon")
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
        norm=args.norm or ("group" if args.dp_epsilon is not None else TrainConfig.norm),
        augment=not args.no_augment,
        dp_epsilon=args.dp_epsilon,
        dp_delta=TrainConfig.dp_delta if args.dp_delta is None else args.dp_delta,
        dp_clip=TrainConfig.dp_clip if args.dp_clip is None else args.dp_clip,
    )


def main(args: argparse.Namespace) -> int:
    trained = train(config_from_args(args))  # a bad argument or data set: splitleak.cli turns it into one line
    config, history = trained.config, trained.history
    path = checkpoint_path(config)
    name = trained.name if recipe_suffix(config) else config.model  # "resnet20", or the variant's own name
    print(
        f"{name} on {config.dataset}: test accuracy {trained.test_accuracy:.4f} "
        f"on {trained.test_images} images after {config.epochs} epochs ({history[-1]['seconds'] / 60:.1f} min)"
    )
    if config.defence:
        dcor = f"distance correlation of input and activation at {config.split}"
        if config.from_checkpoint:
            print(f"before: test accuracy {history[0]['test_accuracy']:.4f}, {dcor} {history[0]['test_dcor']:.4f}")
        print(f"after: test accuracy {history[-1]['test_accuracy']:.4f}, {dcor} {history[-1]['test_dcor']:.4f}")
    if trained.privacy is not None:
        p = trained.privacy
        print(
            f"DP-SGD: epsilon {p['epsilon']:.3f} at delta {p['delta']:g} ({p['accountant']} accountant, {p['steps']} "
            f"steps, noise multiplier {p['noise_multiplier']:.3f}, clip {p['max_grad_norm']})"
        )
    print(f"checkpoint: {path}")
    if recipe_suffix(config):
        print(f"export it: splitleak export --checkpoint {path}")
    return 0
