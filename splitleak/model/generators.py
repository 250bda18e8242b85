"""Generators trained to be probed for what they remember: their training sets, cached resumable training, sampling.

Two training sets, each with a control set of images the generator never saw, drawn from the same source:
- `faces`: the AT&T faces (both splits, 10 images of each of 40 people), at 32x32 grey; half of the people (chosen by
  the seed) are trained on, the other half held out entirely, so a generated face can be traced to a person who was
  or was not in the training set (Webster et al. 2021, "This Person (Probably) Exists").
- `cifar-duplicates`: CIFAR-10 training images, some seen once, some repeated 10 and some 100 times
  (`per_copy` images for each count in `copies`), as Carlini et al. (USENIX Security 2023, section 5) found duplicated
  images to be the ones a diffusion model gives back; held out: as many other CIFAR-10 training images.

Two defences change the training set, not the model: `dedup` trains on each distinct image once (the duplicate
counts are kept, to report by), `augment` flips, shifts the brightness of and adds noise to every batch.

A run is cached as CACHE/generators/NAME.pt every `save_every` steps and at the end, with the weights, the optimiser
state and the history, so a run that stops resumes from its last save; the steps are not part of NAME, so a finished
run can be trained further by asking for more steps.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitleak.core import data
from splitleak.model import diffusion, gan

KINDS = ("diffusion", "gan")
TRAINING_SETS = ("faces", "cifar-duplicates")
SIZE = 32


@dataclass(frozen=True)
class GeneratorConfig:
    kind: str = "diffusion"  # KINDS
    data: str = "faces"  # TRAINING_SETS
    steps: int = 3000  # optimiser steps (not part of the cache name: more steps resume the same run)
    batch_size: int = 32
    lr: float = 5e-4
    # The U-Net's first level, or the DCGAN's narrowest layer. Small, because on one CPU thread a step of the 16-wide
    # U-Net takes 0.26 s and of the 32-wide DCGAN 0.13 s (batch 32), which is what fits 3,000 steps in 15 minutes.
    width: int = 0  # 0: 16 for diffusion, 32 for the GAN
    dedup: bool = False
    augment: bool = False
    copies: tuple[int, ...] = (1, 10, 100)  # cifar-duplicates: how often each chosen image is repeated
    per_copy: tuple[int, ...] = (500, 50, 10)  # cifar-duplicates: how many images are repeated that often
    seed: int = 0
    canaries: int = 0  # special images planted in the training set (and as many more held out, for the control)
    canary_copies: int = 1  # how often each planted canary is repeated

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"no generator {self.kind!r}; kinds: {', '.join(KINDS)}")
        if self.data not in TRAINING_SETS:
            raise ValueError(f"no training set {self.data!r}; training sets: {', '.join(TRAINING_SETS)}")
        if len(self.copies) != len(self.per_copy):
            raise ValueError("copies and per_copy must have one entry each per duplicate count")
        if not self.width:
            object.__setattr__(self, "width", 16 if self.kind == "diffusion" else 32)

    def name(self) -> str:
        # Without canaries, their fields are left out: the name (the cache's key) stays what it was before them.
        fields = {k: v for k, v in asdict(self).items() if k != "steps"}
        if not self.canaries:
            del fields["canaries"], fields["canary_copies"]
        text = json.dumps(fields, sort_keys=True)
        suffix = ("-dedup" if self.dedup else "") + ("-augment" if self.augment else "")
        suffix += f"-canaries{self.canaries}x{self.canary_copies}" if self.canaries else ""
        return f"{self.kind}-{self.data}{suffix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class TrainingSet:
    images: np.ndarray  # (N, 32, 32, C) uint8: the distinct training images
    copies: np.ndarray  # (N,) int: how often each was put in the training set (before dedup)
    labels: np.ndarray  # (N,) the person (faces) or class (CIFAR-10)
    held_out: np.ndarray  # (M, 32, 32, C) uint8: never trained on
    held_out_labels: np.ndarray  # (M,)
    classes: tuple[str, ...]
    canary: np.ndarray | None = None  # (N,) bool: a planted canary (label -1); None: no canaries
    held_out_canary: np.ndarray | None = None  # (M,) bool: a canary made the same way, never planted

    def trained_on(self, *, dedup: bool) -> np.ndarray:
        """(N') indices into `images`, one per copy the generator trains on."""
        return np.arange(len(self.images)) if dedup else np.repeat(np.arange(len(self.images)), self.copies)


def training_set(config: GeneratorConfig) -> TrainingSet:
    ts = _natural(config)
    if not config.canaries:
        return ts
    made = canary_images(2 * config.canaries, ts.images.shape[-1], seed=config.seed)
    planted, spare = made[: config.canaries], made[config.canaries :]
    n, m = config.canaries, len(ts.held_out)
    return TrainingSet(
        np.concatenate([ts.images, planted]),
        np.r_[ts.copies, np.full(n, config.canary_copies)],
        np.r_[ts.labels, np.full(n, -1)],
        np.concatenate([ts.held_out, spare]),
        np.r_[ts.held_out_labels, np.full(n, -1)],
        ts.classes,
        np.r_[np.zeros(len(ts.images), bool), np.ones(n, bool)],
        np.r_[np.zeros(m, bool), np.ones(n, bool)],
    )


def canary_images(count: int, channels: int, *, seed: int) -> np.ndarray:
    """Canaries: mosaics of 4x4 random tiles, 8 pixels each, as unlike a photo as an image can be, so that a sample
    near one can only have come from the canary itself. uint8 (count, 32, 32, channels)."""
    tiles = np.random.default_rng([seed, 1]).integers(0, 256, (count, 4, 4, channels), dtype=np.uint8)
    return tiles.repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)


def _natural(config: GeneratorConfig) -> TrainingSet:
    rng = np.random.default_rng(config.seed)
    if config.data == "faces":
        splits = [data.load("att_faces", split) for split in ("train", "test")]
        images = data.resize(np.concatenate([s.images for s in splits]), SIZE, 1)
        labels = np.concatenate([s.labels for s in splits])
        people = rng.permutation(len(splits[0].classes))
        trained = np.isin(labels, people[: len(people) // 2])
        return TrainingSet(
            images[trained],
            np.ones(trained.sum(), np.int64),
            labels[trained],
            images[~trained],
            labels[~trained],
            splits[0].classes,
        )
    source = data.load("cifar10", "train")
    count = sum(config.per_copy)
    if 2 * count > len(source):
        raise ValueError(f"cifar10 has {len(source)} training images: {count} trained and {count} held out do not fit")
    order = rng.permutation(len(source))
    chosen, held = order[:count], order[count : 2 * count]
    copies = np.repeat(np.array(config.copies, np.int64), config.per_copy)
    images = data.resize(source.images, SIZE, 3)
    return TrainingSet(images[chosen], copies, source.labels[chosen], images[held], source.labels[held], source.classes)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C)."""
    return x.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def augmented(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, brightness shifts of up to 10% of the range and Gaussian noise of 2.5% of it."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = x + (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5) * 0.4
    return (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


@dataclass
class Trained:
    config: GeneratorConfig
    model: nn.Module  # the diffusion model's averaged (EMA) U-Net, or the GAN's generator
    step: int
    seconds: float  # training time over every session, without saving
    history: list[dict[str, float]]


def path_of(config: GeneratorConfig) -> Path:
    return data.cache_dir() / "generators" / f"{config.name()}.pt"


def _build(config: GeneratorConfig, channels: int) -> dict[str, nn.Module]:
    torch.manual_seed(config.seed)
    if config.kind == "diffusion":
        unet = diffusion.UNet(channels, config.width)
        ema = diffusion.UNet(channels, config.width)
        ema.load_state_dict(unet.state_dict())
        return {"model": unet, "ema": ema.requires_grad_(False)}
    return {"model": gan.generator(channels, config.width), "discriminator": gan.discriminator(channels, config.width)}


def _optimisers(config: GeneratorConfig, nets: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
    if config.kind == "diffusion":
        return {"optimiser": torch.optim.Adam(nets["model"].parameters(), lr=config.lr)}
    betas = (0.5, 0.999)
    return {
        "optimiser": torch.optim.Adam(nets["model"].parameters(), lr=config.lr, betas=betas),
        "d_optimiser": torch.optim.Adam(nets["discriminator"].parameters(), lr=config.lr, betas=betas),
    }


def train(
    config: GeneratorConfig, *, save_every: int = 250, progress: Callable[[int, dict], None] | None = None
) -> Path:
    """Train `config` to `config.steps`, from its last save if there is one; returns the checkpoint's path."""
    path = path_of(config)
    ts = training_set(config)
    x = to_unit(ts.images)
    index = torch.from_numpy(ts.trained_on(dedup=config.dedup))
    nets = _build(config, x.shape[1])
    optimisers = _optimisers(config, nets)
    step, seconds, history = 0, 0.0, []
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        for key, module in (*nets.items(), *optimisers.items()):
            module.load_state_dict(saved[key])
        step, seconds, history = saved["step"], saved["seconds"], saved["history"]
    for net in nets.values():
        net.train()
    nets.get("ema", nn.Identity()).eval()
    start = time.perf_counter()
    while step < config.steps:
        # Seeded by the step, so a resumed run draws what an uninterrupted one would have.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        batch = x[index[torch.randint(0, len(index), (config.batch_size,), generator=generator)]]
        if config.augment:
            batch = augmented(batch, generator)
        if config.kind == "diffusion":
            loss = diffusion.training_loss(nets["model"], batch, generator)
            optimisers["optimiser"].zero_grad(set_to_none=True)
            loss.backward()
            optimisers["optimiser"].step()
            _update_ema(nets["ema"], nets["model"], decay=min(0.999, (1 + step) / (10 + step)))
            record = {"loss": loss.item()}
        else:
            record = gan.train_step(
                nets["model"],
                nets["discriminator"],
                optimisers["optimiser"],
                optimisers["d_optimiser"],
                batch,
                generator,
            )
        step += 1
        if step % 50 == 0 or step == config.steps:
            history.append({"step": step, **record})
            if progress:
                progress(step, record)
        if step % save_every == 0 or step == config.steps:
            seconds += time.perf_counter() - start
            _save(path, config, nets, optimisers, step, seconds, history)
            start = time.perf_counter()
    return path


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, *, decay: float) -> None:
    for e, m in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(m, 1 - decay)


def _save(path, config, nets, optimisers, step, seconds, history) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {"config": asdict(config), "step": step, "seconds": seconds, "history": history}
    raw |= {key: module.state_dict() for key, module in (*nets.items(), *optimisers.items())}
    tmp = path.with_suffix(".tmp")
    torch.save(raw, tmp)
    tmp.replace(path)  # whole or not at all: a stop mid-write keeps the last save


def load(config: GeneratorConfig) -> Trained:
    """The cached run of `config` as it last saved (which may be short of `config.steps`)."""
    path = path_of(config)
    if not path.exists():
        raise FileNotFoundError(
            f"no generator at {path}: train one with `splitleak generators train --kind {config.kind} "
            f"--data {config.data}`"
        )
    saved = torch.load(path, map_location="cpu", weights_only=False)
    channels = 1 if config.data == "faces" else 3
    nets = _build(config, channels)
    key = "ema" if config.kind == "diffusion" else "model"
    nets[key].load_state_dict(saved[key])
    return Trained(
        replace(config, steps=saved["step"]), nets[key].eval(), saved["step"], saved["seconds"], saved["history"]
    )


@torch.no_grad()
def sample(trained: Trained, count: int, *, seed: int = 1, ddim_steps: int = 50, batch: int = 250) -> np.ndarray:
    """`count` generated images, uint8 (count, 32, 32, C)."""
    generator = torch.Generator().manual_seed(seed)
    channels = 1 if trained.config.data == "faces" else 3
    out = []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        if trained.config.kind == "diffusion":
            noise = torch.randn(n, channels, SIZE, SIZE, generator=generator)
            out.append(to_uint8(diffusion.ddim(trained.model, noise, steps=ddim_steps)))
        else:
            out.append(to_uint8(gan.sample(trained.model, n, generator)))
    return np.concatenate(out)


def export(trained: Trained, out: Path) -> Path:
    """The generator's network as ONNX, for ONNX Runtime as the project's other models are shipped: the GAN's
    generator (`latent` (B, 64, 1, 1) -> `image` in [-1, 1]), or the diffusion model's averaged U-Net (`image` x_t,
    `step` t (B,) int64 -> `noise`, the eps it predicts; DDIM runs outside it). Returns the file's path."""
    import warnings

    from splitleak.model.export import OPSET

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{trained.config.name()}.onnx"
    channels = 1 if trained.config.data == "faces" else 3
    if trained.config.kind == "gan":
        example, inputs, outputs = (torch.zeros(2, gan.LATENT, 1, 1),), ["latent"], ["image"]
    else:
        example = (torch.zeros(2, channels, SIZE, SIZE), torch.zeros(2, dtype=torch.long))
        inputs, outputs = ["image", "step"], ["noise"]
    with warnings.catch_warnings():  # the TorchScript exporter, as splitleak.model.export uses it
        warnings.simplefilter("ignore", DeprecationWarning)
        # GroupNorm's check that a group holds more than one value, traced as a constant: true for any batch.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            trained.model.eval(),
            example,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            opset_version=OPSET,
            dynamo=False,
        )
    meta = {"config": asdict(trained.config), "step": trained.step, "inputs": inputs, "outputs": outputs}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return path
