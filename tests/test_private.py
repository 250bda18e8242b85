"""DP-SGD (splitleak.model.private), group norm and training without augmentation, on a handful of real images."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch

from splitleak import cli
from splitleak.attacker.attacks import build
from splitleak.core import data, manifest
from splitleak.model import private, train, zoo
from splitleak.model.checkpoint import TrainConfig, checkpoint_path, load_checkpoint, load_model, recipe_record
from splitleak.model.export import export_checkpoint

HANDFUL = TrainConfig(norm="group", dp_epsilon=3.0, epochs=1, batch_size=8, lr=0.1, seed=1)


def handful(images: int = 8) -> train.TrainingData:
    """The first `images` of the sample's CIFAR-10 train split, and 16 of its test split."""
    train_set, test_set = data.load("cifar10", "train"), data.load("cifar10", "test")
    mean, std = train.channel_mean_std(train_set.images)
    return train.training_data(train_set.take(np.arange(images)), test_set.take(np.arange(16)), mean, std)


def test_one_dp_sgd_step_on_a_handful_of_images_trains_and_the_accountant_reports_epsilon():
    prepared = handful()
    training = train.build_training(HANDFUL, prepared, None)
    before = {k: v.clone() for k, v in training.model.state_dict().items()}
    assert training.privacy_record(HANDFUL)["steps"] == 0

    train.train_one_epoch(training, prepared, torch.Generator().manual_seed(0), 0, HANDFUL, progress=False)

    after = training.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the step changed no weight"
    record = training.privacy_record(HANDFUL)
    # batch 8 of 8 images: a sample rate of 1, so one epoch is one step, which spends the whole budget
    assert record["steps"] == 1 and record["sample_rate"] == 1.0
    assert 0 < record["epsilon"] <= HANDFUL.dp_epsilon * 1.01
    assert record["noise_multiplier"] > 0 and record["max_grad_norm"] == HANDFUL.dp_clip


def test_dp_sgd_spends_less_than_its_budget_before_the_last_epoch():
    prepared = handful()
    config = replace(HANDFUL, epochs=4)
    training = train.build_training(config, prepared, None)
    train.train_one_epoch(training, prepared, torch.Generator().manual_seed(0), 0, config, progress=False)
    assert 0 < training.privacy_record(config)["epsilon"] < config.dp_epsilon


class Recorder:
    """An objective that keeps what the loop feeds the model, and trains nothing."""

    def __init__(self) -> None:
        self.fed: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        self.fed.append(x.clone())
        return torch.zeros((), requires_grad=True), {}


@pytest.mark.parametrize("augment", [True, False])
def test_no_augment_feeds_the_training_images_as_they_are_and_augment_does_not(augment):
    prepared = handful(16)
    config = TrainConfig(epochs=1, batch_size=16, augment=augment)
    training = train.build_training(config, prepared, None)
    training.objective = recorder = Recorder()

    train.train_one_epoch(training, prepared, torch.Generator().manual_seed(0), 0, config, progress=False)

    (fed,) = recorder.fed
    # one batch of all 16, in a random order: compare as sets of images
    as_they_are = sorted(prepared.x_train.flatten(1).tolist())
    assert (sorted(fed.flatten(1).tolist()) == as_they_are) is not augment


def test_a_group_norm_model_has_no_batch_norm_and_the_same_split_points():
    model = zoo.build("resnet20", "group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {16}
    assert [name for name, _ in model.named_children()][:4] == list(zoo.ZOO["resnet20"].split_points)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--dp-epsilon", "0"], "--dp-epsilon is the privacy budget, a number > 0, not 0.0"),
        (["--dp-epsilon", "-1"], "--dp-epsilon is the privacy budget, a number > 0, not -1.0"),
        (["--dp-epsilon", "3", "--dp-delta", "1"], "--dp-delta is a probability in (0, 1)"),
        (["--dp-epsilon", "3", "--dp-clip", "0"], "--dp-clip is the per-example gradient norm"),
        (["--dp-epsilon", "3", "--norm", "batch"], "DP-SGD cannot train resnet20 with batch norm"),
        (["--dp-epsilon", "3", "--defence", "nopeek", "--strength", "1"], "no --defence (a loss over the whole batch)"),
        (["--dp-clip", "2"], "--dp-delta and --dp-clip go with --dp-epsilon"),
    ],
)
def test_a_bad_dp_sgd_setting_fails_with_one_clear_line(flags, expected, capsys):
    assert cli.main(["train", "--limit", "100", "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitleak train: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_opacus_refuses_a_batch_norm_model_even_when_the_config_is_not_checked_first():
    model = zoo.build("resnet20")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Opacus cannot train this model privately: .*BatchNorm"):
        private.make_private(replace(HANDFUL, norm="group"), model, optimizer, 8)


def test_new_recipe_fields_at_their_defaults_leave_cache_keys_as_they_were():
    assert "dp_epsilon" not in recipe_record(TrainConfig()) and "norm" not in recipe_record(TrainConfig())
    assert recipe_record(HANDFUL)["dp_epsilon"] == 3.0 and recipe_record(HANDFUL)["norm"] == "group"


@pytest.fixture(scope="module")
def dp_model_dir(isolated_cache, tmp_path_factory):
    """A DP-SGD ResNet-20 trained from the command line for one epoch on 100 images, and exported."""
    assert cli.main(["train", "--limit", "100", "--epochs", "1", "--dp-epsilon", "8"]) == 0
    checkpoint = load_checkpoint(checkpoint_path(TrainConfig(limit=100, epochs=1, norm="group", dp_epsilon=8.0)))
    out = tmp_path_factory.mktemp("dp-model")
    export_checkpoint(checkpoint, out, calibration_images=0)
    return checkpoint, out


@pytest.mark.slow
def test_a_dp_checkpoint_records_the_accountants_epsilon_and_exports_it(dp_model_dir):
    checkpoint, out = dp_model_dir
    assert checkpoint.name == "resnet20-cifar10-gn-dp8.0" and checkpoint.config.norm == "group"
    assert 0 < checkpoint.privacy["epsilon"] <= 8.0 * 1.01 and checkpoint.privacy["delta"] == 1e-5
    written = json.loads((out / "manifest.json").read_text())
    assert written["training_privacy"] == checkpoint.privacy and written["norm"] == "group"
    assert manifest.load(out).name == "resnet20-cifar10-gn-dp8.0"


@pytest.mark.slow
def test_the_exported_group_norm_head_and_tail_in_onnx_runtime_match_pytorch(dp_model_dir):
    checkpoint, out = dp_model_dir
    model = load_model(checkpoint)
    m = manifest.load(out)
    x = torch.randn(5, 3, 32, 32)
    for split in m.splits:
        head = ort.InferenceSession(str(m.split(split).head), providers=["CPUExecutionProvider"])
        tail = ort.InferenceSession(str(m.split(split).tail), providers=["CPUExecutionProvider"])
        activation = head.run(["activation"], {"image": x.numpy()})[0]
        logits = tail.run(["logits"], {"activation": activation})[0]
        torch_head, _ = zoo.split(model, split)
        with torch.no_grad():
            np.testing.assert_allclose(activation, torch_head(x).numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_data_free_attack_refuses_a_group_norm_model_with_a_clear_message(dp_model_dir):
    _, out = dp_model_dir
    with pytest.raises(ValueError, match="has no BatchNormalization nodes, so the data-free attack has no statistics"):
        build("datafree", manifest=manifest.load(out), split="layer1")


@pytest.mark.slow
def test_canaries_take_the_dp_sgd_recipe_under_a_key_of_its_own(tmp_path, monkeypatch):
    from splitleak.attacker import canaries

    monkeypatch.setenv("SPLITLEAK_CACHE", str(tmp_path))
    plain = canaries.Plan(TrainConfig(epochs=1, batch_size=32), pool=40, per_repeat=1, candidates=20)
    private_plan = replace(plain, config=replace(plain.config, norm="group", dp_epsilon=8.0))
    assert private_plan.key() != plain.key()
    result = canaries.run(private_plan, progress=False)
    assert result["training_images"] == 40 + 1 + 4 + 16 and set(result["exposure"]) == {1, 4, 16}
