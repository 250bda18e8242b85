"""What inverting costs: the attacks' time per frame, side by side with the head that made the activations.

1. `decoder` (InverseNetwork), and on ResNet-20 `datafree` (its inverse blocks, run one after another): one batched
   forward pass over BATCH intercepted 32x32 frames, against the head's own forward pass (ONNX Runtime, what the
   device runs) on the same frames; reports frames/s and the ratio. The target is at least 500 frames/s on a 2-core
   laptop CPU at every split point. Each is timed twice: in PyTorch (`Attack.invert`), and exported to ONNX and run
   with ONNX Runtime on one thread (`decoder.onnx`, `datafree.onnx`), as `splitleak attacker train-decoder` exports
   it and the live attacker runs it.
2. `rmle` (RegularizedMLE): RMLE_STEPS Adam steps on RMLE_BATCH frames, extrapolated linearly to the paper's 5000
   steps per frame (every step costs the same: one forward and one backward pass of the head), against the decoder.

Timing does not depend on the weights, so the models here are random-initialised ResNet-20 (bench/conftest.py) and
He et al.'s CNN, the decoder is trained for one epoch on a handful of random images, and `datafree` synthesises 8
images in one step and trains on them for one epoch, at its default width (quality is not measured).

    .venv/bin/pytest bench/bench_attacks.py --benchmark-enable

On a machine shared with other work, wall-clock medians swing with the load; `--benchmark-timer time.process_time`
counts CPU time instead (all threads together, so frames/s on N idle cores is at most N times what it reports).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_random

from splitleak.attacker.attacks import build
from splitleak.attacker.attacks.base import model_input, session
from splitleak.attacker.live import ExportedInverse
from splitleak.attacker.train_decoder import ChannelsLast
from splitleak.core import manifest
from splitleak.model import zoo
from splitleak.model.export import export_onnx

BATCH = 256
RMLE_BATCH = 32
RMLE_STEPS = 5
PAPER_STEPS = 5000
ROUNDS = 10
SEED = 0

CASES = [("resnet20", s) for s in zoo.ZOO["resnet20"].split_points] + [
    ("hecnn", s) for s in zoo.ZOO["hecnn"].split_points
]
# He et al.'s CNN has no batch norm for the data-free attack to start from.
# "X.onnx": attack X exported as `splitleak attacker train-decoder` exports it, run as the live attacker runs it;
# "datafree-w32": with `--width 32`, inverse blocks half as wide as the default's 64 channels.
RUNNERS = [
    (*case, r)
    for case in CASES
    for r in ("head", "decoder", "decoder.onnx", "datafree", "datafree.onnx", "datafree-w32.onnx")
    if not (r.startswith("datafree") and case[0] == "hecnn")
]
DATAFREE_TINY = dict(synthetic_images=8, synthesis_steps=1, batch_size=8, epochs=1, adapt_epochs=1)


@pytest.fixture(scope="module")
def model_dirs(model_dir, tmp_path_factory) -> Iterator[dict[str, Path]]:
    # Decoders trained here are worthless: keep them out of the user's cache.
    cache, os.environ["SPLITLEAK_CACHE"] = os.environ.get("SPLITLEAK_CACHE"), str(tmp_path_factory.mktemp("cache"))
    torch.manual_seed(SEED)
    out = export_random("hecnn", tmp_path_factory.mktemp("hecnn-random"))
    yield {"resnet20": model_dir, "hecnn": out}
    if cache is None:
        del os.environ["SPLITLEAK_CACHE"]
    else:
        os.environ["SPLITLEAK_CACHE"] = cache


def frames(n: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def intercepted(m: manifest.Manifest, split: str, n: int) -> np.ndarray:
    return session(m.split(split).head).run(["activation"], {"image": model_input(m, frames(n))})[0]


# The head runs first in each case: it is the baseline the decoder's ratio is taken against.
@pytest.mark.parametrize(("model", "split", "runner"), RUNNERS)
def test_decoder_inverts_a_batch_against_the_head_that_made_it(
    benchmark, ratios, model_dirs, tmp_path, model, split, runner
):
    m = manifest.load(model_dirs[model])
    if runner == "head":
        head, x = session(m.split(split).head), model_input(m, frames(BATCH))
        run, args = (lambda image: head.run(["activation"], {"image": image})), (x,)
    else:
        if runner.startswith("decoder"):
            attack = build("decoder", manifest=m, split=split, auxiliary=frames(64), epochs=1)
        else:
            width = 32 if runner.startswith("datafree-w32") else 64  # datafree-w32: inverses half as wide
            attack = build("datafree", manifest=m, split=split, **DATAFREE_TINY, width=width)
        run, args = attack.invert, (intercepted(m, split, BATCH),)
        if runner.endswith(".onnx"):
            path = tmp_path / f"{split}.{attack.name}.onnx"
            export_onnx(ChannelsLast(attack.network()), torch.zeros(2, *attack.split.activation_shape), path,
                        "activation", "reconstruction")  # fmt: skip
            run = ExportedInverse(path).invert
    benchmark.group = f"{model}.{split}, {BATCH} frames of 32x32"
    benchmark.pedantic(run, args=args, rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["frames_per_s"] = round(BATCH / benchmark.stats.stats.median)
    ratios.record(
        benchmark, f"{model}.{split} {runner}", baseline=None if runner == "head" else f"{model}.{split} head"
    )


@pytest.mark.parametrize(("model", "split"), CASES)
def test_rmle_time_per_frame_at_the_papers_5000_steps(benchmark, ratios, model_dirs, model, split):
    m = manifest.load(model_dirs[model])
    attack = build("rmle", manifest=m, split=split, steps=RMLE_STEPS, batch_size=RMLE_BATCH)
    benchmark.group = f"{model}.{split}, rmle: {RMLE_STEPS} steps on {RMLE_BATCH} frames"
    benchmark.pedantic(attack.invert, args=(intercepted(m, split, RMLE_BATCH),), rounds=3, warmup_rounds=1)
    if benchmark.stats is None:
        return
    per_frame = benchmark.stats.stats.median / RMLE_BATCH / RMLE_STEPS * PAPER_STEPS  # extrapolated, see above
    benchmark.extra_info["seconds_per_frame_at_5000_steps"] = round(per_frame, 2)
    decoder = ratios.medians.get(f"{model}.{split} decoder")
    if decoder is not None:
        benchmark.extra_info["ratio_to_decoder"] = round(per_frame / (decoder / BATCH))
    print(f"\nrmle at {model}.{split}: {per_frame:.2f} s per frame at {PAPER_STEPS} steps (extrapolated)")
