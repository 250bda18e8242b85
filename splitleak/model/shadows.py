"""`splitleak shadows`: K models of the target's recipe, each trained on a random half of a pool, for membership tests.

As LiRA sets them up (Carlini et al., S&P 2022, section VI): a pool of N training images, and K masks such that every
image is in the training half of exactly K/2 models, so that for every image there are models trained with it (IN)
and without it (OUT). Each model is trained with splitleak's own recipe (splitleak.model.train: the same
architecture, augmentation, schedule and normalisation as the shipped models, on its half), then queried on the whole
pool, each image as it is and flipped, and on population images from the test split that no model trained on.

Each model is cached as it finishes, in CACHE/shadows/KEY/shadow-NNN.npz (its mask and the logits), so a run that
stops (a session, a reboot) resumes with the next model; the recipe is in recipe.json beside them. A model trains
in a process of one thread, and runs started side by side share the models out, so two runs use two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from splitleak.core import data
from splitleak.core.process import alive
from splitleak.model import train
from splitleak.model.checkpoint import TrainConfig, recipe_record, to_tensor


@dataclass(frozen=True)
class Recipe:
    config: TrainConfig  # model, dataset, epochs, ...: the target's training recipe
    pool: int  # training images in the pool, drawn at random from the train split
    count: int  # shadow models, an even number
    population: int  # test-split images no model trains on (RMIA's population; the audit's non-members)

    def key(self) -> str:
        # recipe_record: the recipe's later fields (DP-SGD, group norm, no augmentation) change the key only when set
        text = json.dumps(asdict(self) | {"config": recipe_record(self.config)}, sort_keys=True, default=str)
        return f"{self.config.model}-{self.config.dataset}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Shadows:
    """What the shadow models give a membership attack, stacked over the K models that have finished."""

    labels: np.ndarray  # (N,) the pool's labels
    masks: np.ndarray  # (K, N) bool: model k trained on pool image n
    logits: np.ndarray  # (K, Q, N, C): Q = 2 queries, the image and its flip
    population_labels: np.ndarray  # (P,)
    population_logits: np.ndarray  # (K, Q, P, C)

    @classmethod
    def load(cls, folder: Path, models: int | None = None) -> Shadows:
        """The first `models` finished shadow models in `folder` (default: all of them)."""
        files = sorted(folder.glob("shadow-[0-9][0-9][0-9].npz"))[:models]
        if len(files) < 2:
            raise FileNotFoundError(f"{folder} holds {len(files)} finished shadow models; membership needs at least 2")
        pool = np.load(folder / "pool.npz")
        models = [np.load(f) for f in files]
        return cls(
            labels=pool["labels"],
            masks=np.stack([m["mask"] for m in models]),
            logits=np.stack([m["logits"] for m in models]),
            population_labels=pool["population_labels"],
            population_logits=np.stack([m["population_logits"] for m in models]),
        )


def masks(count: int, pool: int, seed: int) -> np.ndarray:
    """(count, pool) bool: every pool image in exactly count/2 of the models' training halves."""
    if count < 2 or count % 2:
        raise ValueError(f"shadow models come in an even number, at least 2, not {count}")
    order = np.random.default_rng(seed).random((count, pool)).argsort(0)
    return order < count // 2


def folder_of(recipe: Recipe) -> Path:
    return data.cache_dir() / "shadows" / recipe.key()


def prepare(recipe: Recipe) -> tuple[Path, data.Dataset, data.Dataset]:
    """The run's folder with its recipe and pool written (once), the pool and the population."""
    folder = folder_of(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    c = recipe.config
    train_set, test_set = train.load_splits(replace(c, limit=None))
    if recipe.pool > len(train_set) or recipe.population > len(test_set):
        raise ValueError(
            f"{c.dataset} has {len(train_set)} train and {len(test_set)} test images: a pool of {recipe.pool} and a "
            f"population of {recipe.population} do not fit"
        )
    pool_indices, population_indices = draw(c.seed, recipe.pool, recipe.population, len(train_set), len(test_set))
    pool, population = train_set.take(pool_indices), test_set.take(population_indices)
    if not (folder / "pool.npz").exists():
        np.savez(folder / "pool.npz", labels=pool.labels, population_labels=population.labels)
        (folder / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1, default=str) + "\n")
    return folder, pool, population


def draw(seed: int, pool: int, population: int, train_count: int, test_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The pool's indices in the train split and the population's in the test split, sorted: a function of the
    recipe's seed and sizes and the splits' sizes alone, so that whoever reads the models' logits can tell which
    images they are (`frame_ids`)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(train_count)[:pool]), np.sort(rng.permutation(test_count)[:population])


def frame_ids(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The frame ids (splitleak.core.data) of the pool's and the population's images of the shadow models in `folder`:
    the images whose logits they hold, as a device streaming the same data set names them. Drawn again from the
    recipe, and checked against the labels the run saved, so that a data root other than the run's is caught."""
    recipe = json.loads((folder / "recipe.json").read_text())
    dataset, seed = recipe["config"]["dataset"], recipe["config"]["seed"]
    test, train_set = data.load(dataset, "test"), data.load(dataset, "train")
    pool, population = draw(seed, recipe["pool"], recipe["population"], len(train_set), len(test))
    saved = np.load(folder / "pool.npz")
    if not (
        np.array_equal(saved["labels"], train_set.labels[pool])
        and np.array_equal(saved["population_labels"], test.labels[population])
    ):
        raise ValueError(
            f"the shadow models in {folder} were trained on another copy of {dataset} than the data root holds now "
            f"({data.data_root()}): their pool's labels differ"
        )
    return data.frame_ids(dataset, "train", pool), data.frame_ids(dataset, "test", population)


def train_shadow(recipe: Recipe, index: int, pool: data.Dataset, population: data.Dataset) -> dict[str, np.ndarray]:
    """Train shadow model `index` on its half of the pool; its mask and logits on the pool and the population."""
    c = replace(recipe.config, seed=recipe.config.seed + 1 + index)
    mask = masks(recipe.count, recipe.pool, recipe.config.seed)[index]
    mean, std = train.channel_mean_std(pool.images)  # the pool's, fixed for every model, as a target's would be
    prepared = train.training_data(pool.take(np.flatnonzero(mask)), population, mean, std)
    model = train.fit(c, prepared, progress=False)
    return {
        "mask": mask,
        "logits": _queries(model, to_tensor(pool.images, mean, std)),
        "population_logits": _queries(model, prepared.x_test),
        "test_accuracy": np.float64(train.evaluate(model, prepared.x_test, prepared.y_test)),
    }


@torch.no_grad()
def _queries(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """(2, N, C) float32 logits: each image as it is, and flipped left to right."""
    model.eval()
    return np.stack(
        [torch.cat([model(v[i : i + batch]) for i in range(0, len(v), batch)]).numpy() for v in (x, x.flip(-1))]
    )


def run(recipe: Recipe, *, progress: bool = True) -> Path:
    """Train every shadow model not yet cached; returns the folder. Safe to stop and start again at any moment, and
    to run more than once at a time: each run takes the next model no other live run holds (a lock file with its
    process id), so two runs use two cores."""
    from tqdm import tqdm

    folder, pool, population = prepare(recipe)
    torch.set_num_threads(1)
    todo = [i for i in range(recipe.count) if not (folder / f"shadow-{i:03d}.npz").exists()]
    for index in tqdm(todo, desc="shadow models", unit="model", disable=not progress):
        done = folder / f"shadow-{index:03d}.npz"
        if done.exists() or not _lock(folder / f"shadow-{index:03d}.lock"):
            continue  # finished or being trained by another run
        try:
            start = time.perf_counter()
            shadow = train_shadow(recipe, index, pool, population)
            tmp = folder / f"shadow-{index:03d}.tmp.npz"
            np.savez(tmp, **shadow, seconds=np.float64(time.perf_counter() - start))
            os.replace(tmp, done)  # whole or not at all: a stop mid-write loses nothing
        finally:
            (folder / f"shadow-{index:03d}.lock").unlink(missing_ok=True)
    return folder


def _lock(path: Path) -> bool:
    """Take `path` for this process; False if a live process holds it (a dead one's lock is taken over)."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = path.read_text()
            except FileNotFoundError:
                continue  # let go just now: try again
            if not holder or (holder.isdigit() and alive(int(holder))):
                return False  # held by a live run (one that has not written its id yet, too)
            path.unlink(missing_ok=True)  # its run died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def get_args_parser() -> argparse.ArgumentParser:
    parser = train.get_args_parser()
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--pool", type=int, default=10_000, help="training images in the pool (default 10,000)")
    parser.add_argument("--count", type=int, default=16, help="shadow models, an even number (default 16)")
    parser.add_argument("--population", type=int, default=2_000, help="test-split images no model trains on")
    return parser


def main(args: argparse.Namespace) -> int:
    config = train.config_from_args(args)
    if config.defence or config.from_checkpoint or config.limit:
        raise ValueError("shadow models take the plain recipe: no --defence, --from-checkpoint or --limit")
    recipe = Recipe(config, args.pool, args.count, args.population)
    masks(recipe.count, recipe.pool, config.seed)  # an odd count fails before any training
    folder = run(recipe)
    print(folder)
    return 0
