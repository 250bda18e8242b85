"""`splitleak canaries`: how much a model remembers of images planted in its training set (Carlini et al., USENIX
Security 2019, "The Secret Sharer").

A canary here is an image of uniform noise with a label drawn at random: nothing in the data set teaches it, so a
model can only get it right by remembering it. A run draws `candidates` such canaries from one seed; the first
`per_repeat` x len(`repeats`) of them are planted in the training set, `per_repeat` of them once, 4 times, 16 times
(`repeats`), and the rest are never trained on. The model is trained with splitleak's recipe (splitleak.model.train)
on a random `pool` of the training split plus the planted copies, then scored on every candidate with its own label.

Exposure (the paper's section 4, with the rank measured directly rather than estimated): a planted canary's rank r
among itself and the candidates never planted, ordered by the model's loss (r = 1: the lowest loss of all), gives
exposure = log2(R) - log2(r), where R is the number ranked. A canary the model does not remember sits at a random rank
(about 1 bit on average); one it remembers perfectly has the lowest loss (log2(R) bits).

Deduplication (`--dedup`) keeps one copy of each training image that appears more than once (exact bytes and label):
the defence the paper and Carlini et al. 2023 weigh against memorisation of repeated data. It is measured by training
again on the deduplicated set, everything else equal.

Each trained run is cached (CACHE/canaries/KEY.npz: the repeats, the losses, the accuracy), so a second call reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from splitleak.core import data
from splitleak.model import train
from splitleak.model.checkpoint import TrainConfig, recipe_record, to_tensor

REPEATS = (1, 4, 16)


@dataclass(frozen=True)
class Plan:
    config: TrainConfig  # the recipe: model, dataset, epochs, seed...
    pool: int  # training images drawn at random from the train split
    repeats: tuple[int, ...] = REPEATS  # how often each group of canaries is planted
    per_repeat: int = 10  # canaries planted at each repeat count
    candidates: int = 1000  # canaries drawn in all: the planted ones and those never trained on
    dedup: bool = False  # train on the deduplicated set

    def key(self) -> str:
        # recipe_record: the recipe's later fields (DP-SGD, group norm, no augmentation) change the key only when set
        text = json.dumps(asdict(self) | {"config": recipe_record(self.config)}, sort_keys=True, default=str)
        return f"{self.config.model}-{self.config.dataset}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def draw(plan: Plan, shape: tuple[int, int, int], classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (candidates, H, W, C), labels, repeats (candidates,): how often each is planted, 0 for never)."""
    planted = plan.per_repeat * len(plan.repeats)
    if planted >= plan.candidates:
        raise ValueError(f"{plan.candidates} candidates leave none unplanted beside {planted} planted canaries")
    rng = np.random.default_rng([plan.config.seed, 2019])
    images = rng.integers(0, 256, (plan.candidates, *shape), dtype=np.uint8)
    labels = rng.integers(0, classes, plan.candidates)
    repeats = np.zeros(plan.candidates, np.int64)
    repeats[:planted] = np.repeat(plan.repeats, plan.per_repeat)
    return images, labels, repeats


def deduplicate(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of the first copy of every distinct (image, label), in their order."""
    seen, keep = set(), []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        digest = hashlib.sha1(image.tobytes() + int(label).to_bytes(8, "little")).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return np.asarray(keep, np.int64)


def exposure(losses: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """Each planted canary's exposure in bits, ranked by loss among itself and the never-planted candidates."""
    reference = np.sort(losses[repeats == 0])
    planted = losses[repeats > 0]
    rank = 1 + np.searchsorted(reference, planted, side="left")  # ties go to the canary's favour
    return np.log2(len(reference) + 1) - np.log2(rank)


def training_set(plan: Plan) -> tuple[data.Dataset, data.Dataset, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pool plus every planted copy (deduplicated if the plan says so), the test split, and the candidates."""
    train_set, test_set = train.load_splits(replace(plan.config, limit=None))
    if plan.pool > len(train_set):
        raise ValueError(
            f"{plan.config.dataset} has {len(train_set)} training images, fewer than a pool of {plan.pool}"
        )
    rng = np.random.default_rng(plan.config.seed)
    pool = train_set.take(np.sort(rng.permutation(len(train_set))[: plan.pool]))
    candidates = draw(plan, pool.images.shape[1:], len(pool.classes))
    images, labels, repeats = candidates
    copies = np.repeat(np.arange(len(repeats)), repeats)
    planted = replace(
        pool,
        images=np.concatenate([pool.images, images[copies]]),
        labels=np.concatenate([pool.labels, labels[copies]]),
    )
    if plan.dedup:
        planted = planted.take(deduplicate(planted.images, planted.labels))
    return planted, test_set, candidates


@torch.no_grad()
def losses_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> np.ndarray:
    """The cross-entropy of each image with its label (no smoothing)."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    return torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()


def run(plan: Plan, *, progress: bool = True) -> dict:
    """Train on the planted set (or read the cached run); the candidates' losses and the exposure by repeat count."""
    folder = data.cache_dir() / "canaries"
    path = folder / f"{plan.key()}.npz"
    if not path.exists():
        start = time.perf_counter()
        train_set, test_set, (images, labels, repeats) = training_set(plan)
        mean, std = train.channel_mean_std(train_set.images)
        prepared = train.training_data(train_set, test_set, mean, std)
        model = train.fit(plan.config, prepared, progress=progress)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{plan.key()}.tmp.npz"
        np.savez(
            tmp,
            repeats=repeats,
            losses=losses_of(model, to_tensor(images, mean, std), torch.from_numpy(labels)),
            test_accuracy=np.float64(train.evaluate(model, prepared.x_test, prepared.y_test)),
            training_images=np.int64(len(train_set)),
            seconds=np.float64(time.perf_counter() - start),
        )
        tmp.replace(path)
    saved = np.load(path)
    planted = saved["repeats"][saved["repeats"] > 0]
    bits = exposure(saved["losses"], saved["repeats"])
    return {
        "dedup": plan.dedup,
        "test_accuracy": float(saved["test_accuracy"]),
        "training_images": int(saved["training_images"]),
        "seconds": float(saved["seconds"]),
        "max_exposure": float(np.log2((saved["repeats"] == 0).sum() + 1)),
        "exposure": {int(r): float(bits[planted == r].mean()) for r in plan.repeats},
        "exposure_each": {int(r): bits[planted == r].tolist() for r in plan.repeats},
    }


def markdown(results: list[dict]) -> str:
    repeats = list(results[0]["exposure"])
    head = "| training set | images | test accuracy | " + " | ".join(f"exposure, {r}x" for r in repeats) + " |"
    lines = [head, "|" + "---|" * (3 + len(repeats))]
    for r in results:
        cells = " | ".join(f"{r['exposure'][k]:.2f} bits" for k in repeats)
        name = "deduplicated" if r["dedup"] else "as planted"
        lines.append(f"| {name} | {r['training_images']:,} | {r['test_accuracy']:.2%} | {cells} |")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = train.get_args_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--pool", type=int, default=10_000, help="training images drawn from the train split")
    parser.add_argument("--per-repeat", type=int, default=10, help="canaries planted at each repeat count")
    parser.add_argument("--candidates", type=int, default=1000, help="canaries drawn in all, planted or not")
    parser.add_argument(
        "--dedup", choices=("off", "on", "both"), default="both", help="train on the deduplicated set too"
    )
    parser.add_argument("--json", type=argparse.FileType("w"), help="write the results here as JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    config = train.config_from_args(args)
    if config.defence or config.from_checkpoint or config.limit:
        raise ValueError("canaries take the plain recipe: no --defence, --from-checkpoint or --limit (use --pool)")
    dedups = {"off": [False], "on": [True], "both": [False, True]}[args.dedup]
    results = [
        run(Plan(config, args.pool, per_repeat=args.per_repeat, candidates=args.candidates, dedup=d)) for d in dedups
    ]
    print(markdown(results))
    if args.json:
        json.dump(results, args.json, indent=1)
    return 0
