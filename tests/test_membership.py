"""Membership inference: the ROC against a brute-force count, the attacks on Gaussian toys whose answer is known, and
`splitleak shadows` + `splitleak membership` on tiny real models (trained, cached, resumed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from splitleak import cli
from splitleak.attacker import membership
from splitleak.model import shadows as shadow_models


def brute_force_tpr_at(scores: np.ndarray, members: np.ndarray, fpr: float) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        flagged = scores >= threshold
        if flagged[~members].mean() <= fpr:
            best = max(best, flagged[members].mean())
    return best


def test_the_roc_equals_a_brute_force_count_at_every_threshold():
    rng = np.random.default_rng(0)
    members = rng.random(400) < 0.5
    scores = np.round(rng.normal(members * 0.5, 1.0), 1)  # rounded: many ties, which must stay together
    roc = membership.Roc.of(scores, members)
    for fpr in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
        assert roc.tpr_at(fpr) == pytest.approx(brute_force_tpr_at(scores, members, fpr))
    # The AUC is the chance that a member outscores a non-member, ties counting half.
    pairs = scores[members][:, None] - scores[~members][None, :]
    assert roc.auc == pytest.approx(((pairs > 0) + 0.5 * (pairs == 0)).mean())


def toy(count: int, pool: int, shift: float, seed: int = 0) -> shadow_models.Shadows:
    """Two-class models whose scaled logit for an example is its own difficulty, plus `shift` if the model trained on
    it, plus each model's noise: what LiRA assumes, with the answer known."""
    rng = np.random.default_rng(seed)
    masks = shadow_models.masks(count, pool, seed)
    difficulty = rng.normal(0, 3, pool)  # some examples are easy for every model, some hard: a global threshold fails
    phi = difficulty + shift * masks[:, None, :] + rng.normal(0, 0.3, (count, 2, pool))
    logits = np.stack([np.zeros_like(phi), phi], -1)  # label 1: phi is exactly logit_1 - logit_0
    population = rng.normal(0, 3, (count, 2, 200))
    return shadow_models.Shadows(
        labels=np.ones(pool, np.int64),
        masks=masks,
        logits=logits,
        population_labels=np.ones(200, np.int64),
        population_logits=np.stack([np.zeros_like(population), population], -1),
    )


def test_the_scaled_logit_is_the_log_odds_of_the_label():
    logits = np.random.default_rng(1).normal(size=(3, 5, 4))
    labels = np.array([0, 3, 1, 2, 0])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p_y = p[:, np.arange(5), labels]
    np.testing.assert_allclose(membership.scaled_logit(logits, labels), np.log(p_y / (1 - p_y)), rtol=1e-9)
    np.testing.assert_allclose(membership.log_softmax_at(logits, labels), np.log(p_y), rtol=1e-9)


def test_on_models_that_learned_nothing_every_attack_is_at_chance():
    shadows = toy(count=8, pool=1000, shift=0.0)
    for attack in membership.ATTACKS:
        scores, members = membership.leave_one_out(shadows, attack)
        roc = membership.Roc.of(scores, members)
        assert 0.45 < roc.auc < 0.55, attack
        assert roc.tpr_at(0.01) < 0.03, attack
        assert np.abs(roc.tpr - roc.fpr).max() < 0.06, attack  # the whole curve hugs the diagonal


def test_lira_finds_the_members_a_global_loss_threshold_misses_and_the_shuffled_control_finds_none():
    shadows = toy(count=16, pool=1000, shift=1.0)
    tpr = {}
    for attack in membership.ATTACKS:
        scores, members = membership.leave_one_out(shadows, attack)
        tpr[attack] = membership.Roc.of(scores, members).tpr_at(0.01)
    assert tpr["lira-online"] > 0.3 and tpr["lira-online"] > 10 * max(tpr["loss"], 0.01)
    assert min(tpr["lira-offline"], tpr["lira-fixed"], tpr["lira-offline-fixed"]) > 0.1
    assert tpr["rmia"] > tpr["loss"]
    scores, members = membership.leave_one_out(shadows, "lira-online", shuffled=True)
    assert membership.Roc.of(scores, members).tpr_at(0.01) < 0.03


def test_fewer_references_judge_the_same_targets_and_find_fewer_members():
    shadows = toy(count=16, pool=1000, shift=1.0)
    tpr = {}
    for references in (3, 7, None):
        scores, members = membership.leave_one_out(shadows, "lira-offline-fixed", references=references)
        tpr[references] = membership.Roc.of(scores, members).tpr_at(0.01)
    assert tpr[3] < tpr[7] <= tpr[None] * 1.05  # noise aside, more reference models fit each example better
    with pytest.raises(ValueError, match="references must be between 1 and 15"):
        membership.leave_one_out(shadows, "loss", references=16)


def test_masks_put_every_example_in_exactly_half_the_models():
    masks = shadow_models.masks(6, 500, seed=3)
    assert (masks.sum(0) == 3).all()
    with pytest.raises(ValueError, match="even number"):
        shadow_models.masks(5, 10, seed=0)


@pytest.mark.slow
def test_shadows_train_once_resume_where_they_stopped_and_feed_splitleak_membership(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path / "cache"))
    command = ["shadows", "--dataset", "cifar10", "--pool", "200", "--count", "4", "--population", "100"]
    command += ["--epochs", "1", "--batch-size", "64"]
    assert cli.main(command) == 0
    folder = next((tmp_path / "cache" / "shadows").iterdir())
    first = {f.name: np.load(f)["logits"] for f in sorted(folder.glob("shadow-*.npz"))}
    assert len(first) == 4 and json.loads((folder / "recipe.json").read_text())["count"] == 4

    (folder / "shadow-002.npz").unlink()  # as if the run had stopped before the third model was saved
    kept = (folder / "shadow-000.npz").stat().st_mtime_ns
    assert cli.main(command) == 0
    assert (folder / "shadow-000.npz").stat().st_mtime_ns == kept  # not trained again
    np.testing.assert_allclose(np.load(folder / "shadow-002.npz")["logits"], first["shadow-002.npz"], atol=1e-4)

    capsys.readouterr()
    assert cli.main(["membership", "--shadows", str(folder), "--resamples", "20"]) == 0
    table = (folder / "membership" / "4-models" / "membership.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| attack",
        *(f"| {a}" for a in membership.ATTACKS),
        "| shuffled control",
    ]
    assert (folder / "membership" / "4-models" / "roc.png").stat().st_size > 1000
    assert "Leave one out over 4 shadow models" in capsys.readouterr().out


def test_a_shadow_model_is_trained_by_one_run_at_a_time_and_a_dead_run_s_lock_is_taken_over(tmp_path):
    lock = tmp_path / "shadow-000.lock"
    assert shadow_models._lock(lock) and not shadow_models._lock(lock)  # held by a live run: this one
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # a run that died holding it
    assert shadow_models._lock(lock) and lock.read_text() == str(os.getpid())
