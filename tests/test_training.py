"""Training: plain cross-entropy is the `none` objective, picked by name like every defence; checkpoints in the dict
format `splitleak train` has always written still load; runs of one batch train; unlabelled data is refused in one
line; the channel statistics are exact."""

from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitleak import cli
from splitleak.model import objectives, train, zoo
from splitleak.model.checkpoint import TrainConfig, checkpoint_path, load_checkpoint, load_model, save_checkpoint


def objective_on_resnet20(name: str) -> tuple[torch.nn.Sequential, objectives.Objective]:
    torch.manual_seed(0)
    model = zoo.build("resnet20", num_classes=10)
    knobs = {"label_smoothing": 0.1, "mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25)}
    split = None if name == "none" else "layer1"
    return model, objectives.build(name, model, split=split, strength=0.0, input_shape=(3, 32, 32), **knobs)


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_every_objective_at_strength_zero_is_plain_cross_entropy_on_a_batch(name):
    model, objective = objective_on_resnet20(name)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, logged = objective(x, labels)
    assert torch.equal(loss, F.cross_entropy(model(x), labels, label_smoothing=0.1))
    assert (logged == {}) == (name == "none")  # a defence logs its own term, even at no weight


def test_an_unknown_objective_is_refused_with_the_names_there_are():
    with pytest.raises(KeyError, match="none, nopeek, adversarial"):
        objective_on_resnet20("dropout")


def first_format_checkpoint(path, model: torch.nn.Sequential) -> dict:
    """Save `model` as the first `splitleak train` did: no name, and no size or defence in the config."""
    raw = {
        "config": {
            "model": "resnet20",
            "dataset": "cifar10",
            "epochs": 15,
            "batch_size": 128,
            "lr": 0.2,
            "weight_decay": 5e-4,
            "label_smoothing": 0.1,
            "limit": None,
            "flip": True,
            "seed": 0,
        },
        "state_dict": model.state_dict(),
        "classes": [f"class {i}" for i in range(10)],
        "input": {"size": 32, "channels": 3, "mean": [0.5, 0.25, 0.75], "std": [0.25, 0.125, 0.5]},
        "test_accuracy": 0.5,
        "test_images": 100,
        "history": [{"epoch": 1, "test_accuracy": 0.5, "seconds": 1.0}],
    }
    torch.save(raw, path)
    return raw


def test_a_checkpoint_in_the_first_dict_format_loads_its_model_and_saves_back_unchanged(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("resnet20", num_classes=10).eval()
    raw = first_format_checkpoint(tmp_path / "old.pt", model)
    checkpoint = load_checkpoint(tmp_path / "old.pt")
    assert checkpoint.config == TrainConfig() and checkpoint.name == "resnet20-cifar10"
    assert checkpoint.training_defence is None and checkpoint.mean.tolist() == [0.5, 0.25, 0.75]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(checkpoint)(x), model(x))
    save_checkpoint(checkpoint, tmp_path / "new.pt")
    again = torch.load(tmp_path / "new.pt", weights_only=False)
    assert again.pop("name") == "resnet20-cifar10" and again.pop("config") == asdict(TrainConfig())
    assert {k: v for k, v in again.items() if k != "state_dict"} == {
        k: v for k, v in raw.items() if k not in {"state_dict", "config"}
    }


def test_exporting_a_checkpoint_that_is_not_there_names_it_in_one_line(tmp_path, capsys):
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nowhere.pt")]) == 2
    assert capsys.readouterr().err == f"splitleak export: no checkpoint at {tmp_path / 'nowhere.pt'}\n"


@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_the_one_cycle_schedule_takes_every_step_of_a_run_however_short(steps):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    schedule = train.one_cycle(optimizer, 0.2, steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(0 <= rate <= 0.2 for rate in rates)


@pytest.mark.slow
def test_training_on_one_batch_of_a_hundred_images_works_from_the_command_line(capsys):
    assert cli.main(["train", "--limit", "100", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "resnet20 on cifar10: test accuracy" in out and "on 100 images after 1 epochs" in out
    assert load_checkpoint(checkpoint_path(TrainConfig(limit=100))).history[0]["epoch"] == 1


def test_training_on_unlabelled_photos_fails_with_one_clear_line(capsys):
    assert cli.main(["train", "--dataset", "embedded", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitleak train: embedded (train) has 40 of 45 images without a label")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_channel_statistics_of_two_million_pixels_a_channel_are_exact():
    images = np.empty((2000, 32, 32, 3), np.uint8)  # 2,048,000 values a channel: past float32's exact running sum
    images[..., 0] = 200
    images[..., 1] = np.arange(32)[:, None] % 2 * 255  # alternate rows black and white
    images[..., 2] = 77
    mean, std = train.channel_mean_std(images)
    assert mean.dtype == std.dtype == np.float32
    np.testing.assert_allclose(mean, [200 / 255, 0.5, 77 / 255], rtol=1e-6)
    np.testing.assert_allclose(std, [0, 0.5, 0], atol=1e-6)
