"""DP-SGD: training a model with differential privacy for its training examples (`splitleak train --dp-epsilon EPS`).

Abadi et al., "Deep learning with differential privacy" (CCS 2016), Algorithm 1, as Opacus implements it (Yousefpour
et al., "Opacus: user-friendly differential privacy library in PyTorch", 2021): every step draws a batch by Poisson
sampling (each training example independently, with probability batch_size / N), clips each example's gradient to
norm `dp_clip`, sums them, adds Gaussian noise of std noise_multiplier * dp_clip and divides by the expected batch
size. Opacus picks the noise multiplier that spends exactly (dp_epsilon, dp_delta) over the run's epochs, and its
accountant (Rényi DP, Mironov 2017) says what was spent; the checkpoint keeps that figure (`privacy`).

What it protects is the training set: a model trained so is (epsilon, delta)-DP with respect to adding or removing one
training example, which bounds any membership attack (Kairouz et al. 2015): TPR <= e^epsilon * FPR + delta at every
FPR. It does nothing for the device's input, whose activation the split still sends in the clear.

Batch norm mixes the examples of a batch, so an example's gradient is not its own to clip: DP-SGD takes group norm in
its place (`--norm group`, splitleak.model.zoo.group_norm). A loss over the batch as a whole (NoPeek's distance
correlation, adversarial training's decoder) is not a sum of per-example terms either, so those defences do not
combine with DP-SGD, and neither does fine-tuning a batch-norm checkpoint.
"""

from __future__ import annotations

import warnings

import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from splitleak.model.checkpoint import TrainConfig

ACCOUNTANT = "rdp"


def check(config: TrainConfig) -> None:
    """Refuse a DP-SGD config that cannot be trained privately, with what was expected."""
    if config.dp_epsilon is None:
        return
    if not config.dp_epsilon > 0:
        raise ValueError(f"--dp-epsilon is the privacy budget, a number > 0, not {config.dp_epsilon}")
    if not 0 < config.dp_delta < 1:
        raise ValueError(
            f"--dp-delta is a probability in (0, 1), well below 1 / training images, not {config.dp_delta}"
        )
    if not config.dp_clip > 0:
        raise ValueError(f"--dp-clip is the per-example gradient norm to clip to, a number > 0, not {config.dp_clip}")
    if config.norm != "group":
        raise ValueError(
            f"DP-SGD cannot train {config.model} with batch norm, which mixes the examples of a batch: "
            "train with --norm group"
        )
    if config.defence or config.from_checkpoint:
        raise ValueError(
            "DP-SGD clips each example's gradient, so it trains from scratch with the plain loss: "
            "no --defence (a loss over the whole batch) and no --from-checkpoint"
        )


def make_private(
    config: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_size: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, PrivacyEngine]:
    """The model wrapped to compute per-example gradients, the optimizer that clips and noises them, a loader of
    Poisson-sampled batches of training indices (N / batch_size of them an epoch, of varying size), and the engine
    whose accountant says what was spent."""
    check(config)
    if errors := ModuleValidator.validate(model, strict=False):
        raise ValueError(f"Opacus cannot train this model privately: {'; '.join(map(str, errors))}")
    indices = TensorDataset(torch.arange(train_size))
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(indices, batch_size=config.batch_size, generator=generator)
    with warnings.catch_warnings():
        # Opacus warns that its noise is not from a cryptographically secure generator: right for a measurement, and
        # said in docs/membership.md; a deployment would pass secure_mode=True.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        private_model, private_optimizer, private_loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=config.dp_epsilon,
            target_delta=config.dp_delta,
            epochs=config.epochs,
            max_grad_norm=config.dp_clip,
        )
    return private_model, private_optimizer, private_loader, engine


def spent(config: TrainConfig, engine: PrivacyEngine, optimizer: torch.optim.Optimizer) -> dict:
    """The checkpoint's `privacy` record: the epsilon the accountant reports for the steps taken, and the knobs."""
    history = engine.accountant.history  # [(noise_multiplier, sample_rate, steps)]
    return {
        "mechanism": "dp-sgd",
        "epsilon": float(engine.get_epsilon(config.dp_delta)),
        "target_epsilon": float(config.dp_epsilon),
        "delta": float(config.dp_delta),
        "max_grad_norm": float(config.dp_clip),
        "noise_multiplier": float(optimizer.noise_multiplier),
        "sample_rate": float(history[0][1]) if history else None,
        "steps": int(sum(steps for _, _, steps in history)),
        "accountant": ACCOUNTANT,
    }
