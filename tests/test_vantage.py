"""Membership from the split channel, on real processes: a device streams a mix of training and test frames of the
shipped model through the proxy to the cloud, and each vantage point's scores from the capture are checked against
scores computed directly from the ONNX head and tail on the same images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from splitleak import cli
from splitleak.attacker import membership, proxy, vantage
from splitleak.core import capture, data
from splitleak.core.process import stop
from splitleak.device.head import Head
from splitleak.model import shadows as shadow_models

FRAMES = 400  # half from the sample's 1,000 training images, half from its 400 test images
TEST_IMAGES = 400  # the sample's test split: frame ids from here on are training images


@pytest.fixture(scope="module")
def mix(shipped_cloud, shipped_model_dir, tmp_path_factory):
    """A proxy's capture of `splitleak device --frames mix`, and the device's own record of what it sent."""
    folder = tmp_path_factory.mktemp("mix")
    tap, port = proxy.start_process(f"127.0.0.1:{shipped_cloud}", folder / "capture", dataset="cifar10")
    try:
        cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{port}", "--dataset", "cifar10"]
        cmd += ["--frames", "mix", "--limit", str(FRAMES), "--json", str(folder / "device.json")]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    finally:
        assert stop(tap) == 0
    return folder / "capture", json.loads((folder / "device.json").read_text())


def direct(model_dir, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, true labels, members) of frames `ids` computed here, not by splitleak: the sample's files read by
    hand, and the ONNX head and tail run one frame at a time, as the device and the cloud run them."""
    test, train = (np.load(f"tests/data/cifar10/{split}.npz") for split in ("test", "train"))
    members = ids >= TEST_IMAGES
    images, labels = np.empty((len(ids), 32, 32, 3), np.uint8), np.empty(len(ids), np.int64)
    images[~members], labels[~members] = test["images"][ids[~members]], test["labels"][ids[~members]]
    images[members] = train["images"][ids[members] - TEST_IMAGES]
    labels[members] = train["labels"][ids[members] - TEST_IMAGES]
    head = Head(model_dir)
    tail = onnxruntime.InferenceSession(str(head.split.tail), providers=["CPUExecutionProvider"])
    x = head.manifest.preprocess(images)
    logits = np.concatenate([tail.run(["logits"], {"activation": head.run(x[i : i + 1])})[0] for i in range(len(x))])
    return logits, labels, members


def test_the_tap_s_roc_from_a_real_capture_equals_the_direct_roc_on_the_same_frames(mix, shipped_model_dir):
    folder, device = mix
    tap = vantage.frames(capture.read(folder), shipped_model_dir, vantage.VANTAGES["tap"])
    assert sorted(tap.ids.tolist()) == sorted(f["frame"] for f in device["frames"])
    assert tap.members.sum() == FRAMES // 2 and (~tap.members).sum() == FRAMES // 2

    logits, labels, members = direct(shipped_model_dir, tap.ids)
    np.testing.assert_array_equal(tap.members, members)
    np.testing.assert_array_equal(tap.labels, logits.argmax(1))  # the tap's label is the model's prediction
    here = vantage.Frames(tap.ids, logits, logits.argmax(1), members)
    for attack in ("loss", "entropy"):
        from_capture, computed = vantage.scores(attack, tap), vantage.scores(attack, here)
        np.testing.assert_allclose(from_capture, computed, rtol=1e-4, atol=1e-5)
        a, b = membership.Roc.of(from_capture, tap.members), membership.Roc.of(computed, members)
        np.testing.assert_allclose(a.tpr, b.tpr)
        np.testing.assert_allclose(a.fpr, b.fpr)

    # The app user reads the same answers with the true labels; the owner gets the same from its own model.
    app = vantage.frames(capture.read(folder), shipped_model_dir, vantage.VANTAGES["app"])
    audit = vantage.frames(capture.read(folder), shipped_model_dir, vantage.VANTAGES["audit"])
    np.testing.assert_array_equal(app.labels, labels)
    np.testing.assert_allclose(vantage.scores("loss", app), vantage.scores("loss", audit), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        vantage.scores("loss", app), membership.log_softmax_at(logits, labels), rtol=1e-4, atol=1e-5
    )


def test_the_shuffled_control_sits_on_the_diagonal(mix, shipped_model_dir):
    report = vantage.run(mix[0], shipped_model_dir, "tap", resamples=50)
    control = report.results[-1]
    assert control.attack == "shuffled control"
    assert control.auc[1] <= 0.5 <= control.auc[2]
    low, high = control.tpr["10%"][1:]
    assert low <= 0.10 <= high
    # Over many shuffles the curve is the diagonal itself, whatever the scores.
    scores = report.scores["loss"]
    rng = np.random.default_rng(1)
    rocs = [membership.Roc.of(scores, rng.permutation(report.frames.members)) for _ in range(200)]
    assert np.mean([r.tpr_at(0.1) for r in rocs]) == pytest.approx(0.1, abs=0.02)
    assert np.mean([r.auc for r in rocs]) == pytest.approx(0.5, abs=0.01)


def test_a_top1_answer_leaves_the_tap_at_chance_and_the_app_user_only_whether_the_model_was_right(
    mix, shipped_model_dir
):
    tap = vantage.run(mix[0], shipped_model_dir, "tap", answers="top1", resamples=20)
    for attack in ("loss", "entropy"):
        assert np.unique(tap.scores[attack]).size == 1  # every frame's answer is as confident as every other's
        roc = membership.Roc.of(tap.scores[attack], tap.frames.members)
        assert roc.auc == 0.5 and roc.tpr_at(0.1) == 0.0

    app = vantage.run(mix[0], shipped_model_dir, "app", answers="top1", resamples=20)
    logits, labels, members = direct(shipped_model_dir, app.frames.ids)
    right = logits.argmax(1) == labels
    assert np.unique(app.scores["loss"]).size == 2
    assert (app.scores["loss"][right] > app.scores["loss"][~right].max()).all()
    # Ranking by right-or-wrong: the AUC of the gap attack, half a point for each tie.
    gap = (1 + right[members].mean() - right[~members].mean()) / 2
    assert membership.Roc.of(app.scores["loss"], members).auc == pytest.approx(gap)


def test_a_calibrated_attack_without_reference_models_is_refused_in_one_line(mix, capsys):
    assert cli.main(["vantage", "--capture", str(mix[0]), "--attack", "rmia"]) == 2
    assert "rmia cannot run here: they take --shadows" in capsys.readouterr().err


def test_a_capture_that_names_no_data_set_is_refused_in_one_line(tmp_path, capsys):
    capture.CaptureWriter(tmp_path, tap="proxy", dataset=None, cloud=None).close()
    assert cli.main(["vantage", "--capture", str(tmp_path), "--vantage", "audit"]) == 2
    assert "capture with splitleak attacker proxy --dataset cifar10" in capsys.readouterr().err


def test_shadows_trained_on_another_copy_of_the_data_set_are_refused_rather_than_misread(tmp_path):
    recipe = {"config": {"dataset": "cifar10", "seed": 0}, "pool": 10, "count": 2, "population": 5}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    pool, population = shadow_models.draw(0, 10, 5, 1000, TEST_IMAGES)
    train, test = data.load("cifar10", "train"), data.load("cifar10", "test")
    np.savez(tmp_path / "pool.npz", labels=train.labels[pool], population_labels=test.labels[population])
    ids = shadow_models.frame_ids(tmp_path)
    assert ids[0].tolist() == (TEST_IMAGES + pool).tolist() and ids[1].tolist() == population.tolist()

    np.savez(tmp_path / "pool.npz", labels=(train.labels[pool] + 1) % 10, population_labels=test.labels[population])
    with pytest.raises(ValueError, match="another copy of cifar10"):
        shadow_models.frame_ids(tmp_path)


@pytest.mark.slow
def test_lira_and_rmia_from_the_capture_score_the_frames_the_shadows_hold_as_they_score_the_direct_logits(
    mix, shipped_model_dir, tmp_path, capsys
):
    command = ["shadows", "--dataset", "cifar10", "--pool", "200", "--count", "4", "--population", "100"]
    assert cli.main([*command, "--epochs", "1", "--batch-size", "64"]) == 0
    shadows = capsys.readouterr().out.split()[-1]
    refs = vantage.References.load(Path(shadows))
    assert refs.logits.shape[:2] == (4, 300) and (refs.trained.sum(0)[:200] == 2).all()
    assert not refs.trained[:, 200:].any()  # the population: test frames, in no model's training half
    pool_labels = np.load(f"{shadows}/pool.npz")["labels"]
    np.testing.assert_array_equal(data.frames("cifar10", refs.frame_ids[:200]).labels, pool_labels)

    assert cli.main(["vantage", "--capture", str(mix[0]), "--shadows", shadows, "--out", str(tmp_path)]) == 0
    table = (tmp_path / "membership.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| attack", *(f"| {a}" for a in vantage.ATTACKS), "| shuffled control"]
    got = np.load(tmp_path / "scores.npz")
    captured = capture.read(mix[0]).logits(Head(shipped_model_dir).served_name)[0]
    assert sorted(got["frame_ids"].tolist()) == sorted(set(captured.tolist()) & set(refs.frame_ids.tolist()))
    assert got["members"].any() and not got["members"].all()

    logits, _, members = direct(shipped_model_dir, got["frame_ids"])
    here = vantage.Frames(got["frame_ids"], logits, logits.argmax(1), members)
    for attack in vantage.CALIBRATED:
        np.testing.assert_allclose(got[attack], vantage.scores(attack, here, refs), rtol=1e-3, atol=1e-4)
