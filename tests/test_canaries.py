"""`splitleak canaries`: planted noise images, exposure by rank, deduplication; a tiny real training run."""

from __future__ import annotations

import numpy as np
import pytest

from splitleak.attacker import canaries
from splitleak.model.checkpoint import TrainConfig

TINY = TrainConfig(model="resnet20", dataset="cifar10", epochs=1, seed=3)


def test_exposure_is_log2_of_the_candidates_for_the_lowest_loss_and_near_zero_for_the_highest():
    repeats = np.array([16, 4, 1] + [0] * 1023)
    losses = np.concatenate([[0.0, 9.0, 2.5], np.linspace(0.01, 5, 1023)])
    bits = canaries.exposure(losses, repeats)
    assert bits[0] == pytest.approx(10.0)  # lowest of 1,024 ranked: log2(1024)
    assert bits[1] == pytest.approx(np.log2(1024 / 1024))  # above every candidate: ranked last
    assert bits[2] == pytest.approx(1.0, abs=0.01)  # in the middle: one bit


def test_deduplication_keeps_the_first_copy_of_each_image_and_label():
    images = np.zeros((5, 2, 2, 1), np.uint8)
    images[1] = images[3] = 7
    labels = np.array([0, 1, 0, 1, 1])
    assert canaries.deduplicate(images, labels).tolist() == [
        0,
        1,
        4,
    ]  # 2 repeats 0; 3 repeats 1; 4 is 0's image, labelled 1


def test_planted_copies_follow_the_repeats_and_deduplication_leaves_one_of_each():
    plan = canaries.Plan(TINY, pool=200, per_repeat=2, candidates=50)
    planted, _, (images, labels, repeats) = canaries.training_set(plan)
    assert sorted(np.bincount(repeats)[[1, 4, 16]].tolist()) == [2, 2, 2] and (repeats > 0).sum() == 6
    assert len(planted) == 200 + 2 * (1 + 4 + 16)
    for i in np.flatnonzero(repeats):  # each canary is in the training set as often as planned
        assert (planted.images == images[i]).all((1, 2, 3)).sum() == repeats[i]
    deduplicated, _, _ = canaries.training_set(canaries.Plan(TINY, pool=200, per_repeat=2, candidates=50, dedup=True))
    assert len(deduplicated) == 200 + 6


@pytest.mark.slow
def test_a_tiny_run_trains_scores_every_planted_canary_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    plan = canaries.Plan(TINY, pool=200, per_repeat=2, candidates=50)
    result = canaries.run(plan, progress=False)
    assert result["training_images"] == 242 and set(result["exposure"]) == {1, 4, 16}
    assert all(0 <= b <= result["max_exposure"] for each in result["exposure_each"].values() for b in each)
    (cached,) = (tmp_path / "canaries").glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    assert canaries.run(plan, progress=False) == result and cached.stat().st_mtime_ns == stamp
